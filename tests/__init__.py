# `tests.typecheck.typechecker` is named in pyproject.toml's addopts: make it an attribute path
from tests import typecheck  # noqa: F401
