"""`python -m quantfx`: the `quantfx` command line."""

from quantfx.cli import console

console()
