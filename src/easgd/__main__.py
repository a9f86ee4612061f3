"""``python -m easgd``: the command line."""

import sys

from easgd.cli import main

sys.exit(main())
