"""Deprecated name of the GPU check, which moved to the tests (``tests/gpu/check.py``): it drives a
checkout's command lines and test suite, so it is a test harness, not library code.

    bash tests/gpu/check.sh            # from a checkout, as before
    python -m tests.gpu.check --smoke  # was: python -m stackgan.gpucheck --smoke
"""
from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    print("stackgan.gpucheck is deprecated: run `bash tests/gpu/check.sh` or `python -m tests.gpu.check` "
          "from a checkout", file=sys.stderr)
    try:  # the harness lives in the checkout's tests/, importable only from its root
        check = importlib.import_module("tests.gpu.check")
    except ImportError:
        print("error: tests/gpu/check.py not found (run from the root of a checkout)", file=sys.stderr)
        return 2
    return check.main(argv)


if __name__ == "__main__":
    sys.exit(main())
