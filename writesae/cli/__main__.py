"""`python -m writesae.cli`: the `writesae` command line."""

from writesae.cli import main

main()
