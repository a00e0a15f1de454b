"""``python -m stackgan.metrics.judges``: the judges' command line (:mod:`.cli`)."""
import sys

from .cli import main

sys.exit(main())
