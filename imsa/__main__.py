"""Run the imsa CLI as ``python -m imsa``."""

import sys

from imsa.cli import main

sys.exit(main())
