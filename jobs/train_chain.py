#!/usr/bin/env python3
"""Stage I then stage II through submitit (stage II starts only after stage I succeeded).

The logic lives in stackgan/cluster/; cluster parameters in jobs/cluster.yaml. --help for usage,
--dry-run to see what would be submitted.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works without `pip install -e .` too

from stackgan.cluster.cli import chain_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(chain_main())
