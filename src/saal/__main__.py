import sys

from saal.cli import main

sys.exit(main())
