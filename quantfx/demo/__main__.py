"""`python -m quantfx.demo`: the same as `quantfx demo`."""

import sys

from quantfx.demo.pipeline import main

sys.exit(main())
