"""The `writesae` command line: extract, train, evaluate, demo, dashboard (one module per
command).

Every option that sets a `WriteSAEConfig` or `TrainConfig` field takes its default and its help
text from that field, so the CLI and the library say the same thing.
"""

from writesae.cli import dashboard, demo, evaluate, extract, train  # noqa: F401  (they register)
from writesae.cli.app import app

__all__ = ["app", "main"]

_ORDER = ("extract", "train", "evaluate", "demo", "dashboard")  # the order --help lists them in
app.registered_commands.sort(key=lambda c: _ORDER.index(c.name or c.callback.__name__))


def main() -> None:
    """Entry point: the `writesae` app."""
    app()
