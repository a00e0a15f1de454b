#!/usr/bin/env python3
"""Evaluation (python -m stackgan.evaluate ...) as a Slurm job.

The logic lives in stackgan/cluster/; cluster parameters in jobs/cluster.yaml. --help for usage,
--dry-run to see what would be submitted.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # works without `pip install -e .` too

from stackgan.cluster.cli import evaluate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_main())
