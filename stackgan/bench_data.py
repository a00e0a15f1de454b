"""Old name of the data benchmark, kept so that ``python -m stackgan.bench_data`` still works:
the command is :mod:`stackgan.bench.data` now (``python -m stackgan.bench.data``)."""
from __future__ import annotations

import sys

from .bench.data import FolderDataset, main, run, table  # noqa: F401 -- the old module's names

if __name__ == "__main__":
    print("note: stackgan.bench_data is now stackgan.bench.data (python -m stackgan.bench.data)",
          file=sys.stderr)
    sys.exit(main())
