"""The `writesae` command line: extract, train, sweep, evaluate, demo, dashboard (one module per
command).

Every option that sets a `WriteSAEConfig` or `TrainConfig` field takes its default and its help
text from that field, so the CLI and the library say the same thing.
"""

from writesae.cli import dashboard, demo, evaluate, extract, sweep, train  # noqa: F401  (register)
from writesae.cli.app import app

__all__ = ["app", "main"]

# the order --help lists them in
_ORDER = ("extract", "train", "sweep", "evaluate", "demo", "dashboard")
app.registered_commands.sort(key=lambda c: _ORDER.index(c.name or c.callback.__name__))


def main() -> None:
    """Entry point: the `writesae` app."""
    app()
