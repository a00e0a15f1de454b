#!/usr/bin/env python
"""Pack a data set into webdataset shards (see stackgan/data/prepare.py and docs/data.md).

    python shards/prepare.py                  # embedded default: data/birds-embedded -> shards/birds-embedded
    python shards/prepare.py --cub-root Data/birds/CUB_200_2011 --birds-root Data/birds --out shards/cub
    python shards/prepare.py --source flowers --root Data/flowers --out shards/flowers
    python shards/prepare.py --root /data/img2dataset-out --out shards/captions   # source auto-detected
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
