"""The package version (both `hooked_recurrent` and `writesae`), read by pyproject.toml."""

__version__ = "0.2.0.dev0"
