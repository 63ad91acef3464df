"""``python -m saal``: the ``saal`` command."""

import sys

from saal.cli import main

sys.exit(main())
