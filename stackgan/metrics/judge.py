"""Deprecated alias: the attribute judges live in :mod:`stackgan.metrics.judges`.

``python -m stackgan.metrics.judge train|show ...`` still works (with a note) and runs
``python -m stackgan.metrics.judges``; the names below are forwarded for old imports.
"""
import sys

from .judges import *  # noqa: F401,F403 (forwarding for old imports)
from .judges import cli

NOTE = "note: `python -m stackgan.metrics.judge` is deprecated; use `python -m stackgan.metrics.judges`"


def main(argv: list[str] | None = None) -> int:
    print(NOTE, file=sys.stderr)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
