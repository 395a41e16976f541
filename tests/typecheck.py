"""The run-time type checker the test run applies to both packages (pyproject.toml's addopts):
beartype with PEP 484's numeric tower, so an `int` is a valid `float` and a `float` a valid
`complex`, as for a static checker."""

from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
