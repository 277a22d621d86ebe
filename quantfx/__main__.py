"""`python -m quantfx`: the `quantfx` command line."""

import sys

from quantfx.cli import main

sys.exit(main())
