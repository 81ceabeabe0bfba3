"""``python -m isvit`` (and ``torchrun ... -m isvit``): the command line."""

import sys

from .cli import main

sys.exit(main())
