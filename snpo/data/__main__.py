"""``python -m snpo.data synth DIR``: a tiny model and synthetic Pick-a-Pic pairs for trying the trainer."""

import sys

from snpo.data.synthetic import main

sys.exit(main())
