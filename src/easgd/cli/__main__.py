"""``python -m easgd.cli``: the command line."""

import sys

from easgd.cli import main

sys.exit(main())
