"""Check the library's size rules: no file over 600 lines, no function over 80 lines.

    python scripts/check_sizes.py            # hooked_recurrent/ and writesae/; exit 1 on offenders

A function's length counts from its `def` line (decorators excluded) to its last line, docstring
included; nested functions count inside their parent too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
PACKAGES = ("hooked_recurrent", "writesae")


def offenders(root: Path) -> list[str]:
    """One line per file or function over its limit, under the packages of `root`."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text()
            rel = path.relative_to(root)
            n = len(text.splitlines())
            if n > MAX_FILE_LINES:
                found.append(f"{rel}: {n} lines (max {MAX_FILE_LINES})")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append(
                            f"{rel}:{node.lineno}: {node.name} is {length} lines "
                            f"(max {MAX_FUNCTION_LINES})"
                        )
    return found


def main() -> int:
    found = offenders(Path(__file__).resolve().parents[1])
    for line in found:
        print(line)
    print(f"check_sizes: {len(found)} over the limits")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
