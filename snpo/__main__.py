"""``python -m snpo …`` is the ``snpo`` console script (snpo.cli)."""

import sys

from snpo.cli import main

sys.exit(main())
