#!/usr/bin/env python3
"""A grid of overrides as one Slurm job array, one run folder per point, and a summary table.

The logic lives in stackgan/cluster/; cluster parameters in jobs/cluster.yaml. --help for usage,
--dry-run to see what would be submitted.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works without `pip install -e .` too

from stackgan.cluster.cli import sweep_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(sweep_main())
