"""``python -m preftune`` (and ``accelerate launch -m preftune``): the command line."""

import sys

from .cli import main

sys.exit(main())
