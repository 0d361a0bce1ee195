"""``python -m tfbackend ...``: the same as the ``tfbackend`` command."""

import sys

from tfbackend.entrypoints.cli import main

sys.exit(main())
