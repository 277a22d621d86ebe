"""`python -m quantfx`: the `quantfx` command line."""

from quantfx.app.cli import console

console()
