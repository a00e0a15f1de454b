#!/usr/bin/env python
"""Pack CUB or the embedded bird set into webdataset shards (see stackgan/data/prepare.py).

    python shards/prepare.py                  # embedded default: data/birds-embedded -> shards/birds-embedded
    python shards/prepare.py --cub-root Data/birds/CUB_200_2011 --birds-root Data/birds --out shards/cub
    python shards/prepare.py --help
"""
import sys
from pathlib import Path

try:
    from stackgan.data.prepare import main
except ImportError:  # a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from stackgan.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
