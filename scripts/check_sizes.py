"""List library files over 600 lines and library functions over 80 lines; exit 1 if any.

    python scripts/check_sizes.py                  # hooked_recurrent/ and writesae/
    python scripts/check_sizes.py writesae         # one package

A function's length is counted from its `def` line (decorators excluded) to its last line, nested
functions included in their parent's count and also checked on their own.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hooked_recurrent", "writesae")


def offenders(package_dir: Path) -> list[str]:
    """One line per file or function of `package_dir` over its limit."""
    out = []
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        n_lines = len(text.splitlines())
        if n_lines > MAX_FILE_LINES:
            out.append(f"{rel}: {n_lines} lines (max {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(
                        f"{rel}:{node.lineno}: {node.name} has {length} lines "
                        f"(max {MAX_FUNCTION_LINES})"
                    )
    return out


def main(argv: list[str]) -> int:
    """Print the offenders of the packages named in `argv` (default: both); 1 if any."""
    found = [line for name in (argv or PACKAGES) for line in offenders(ROOT / name)]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
