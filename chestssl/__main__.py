"""``python -m chestssl`` runs the ``chestssl`` command."""

import sys

from chestssl.cli import main

sys.exit(main())
