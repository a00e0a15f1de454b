"""The project's error base class and exit statuses, defined once.

Every error a command line reports without a traceback derives from :class:`StackGANError`
and carries the exit status it ends the process with, so each ``main`` maps errors in one
``except`` clause (:func:`report`). The statuses are also what ``slurm/common.sh`` and the
submitit jobs act on (``python -m stackgan.cluster env`` prints them for the shell).
"""
from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # a bad config, input file or argument: rerunning the same command will not help
EXIT_REQUEUE = 3  # stopped on a signal after a checkpoint: run the same command again
EXIT_NONFINITE = 4  # a NaN/Inf loss: the last good checkpoint is kept, the run needs a change

EXIT_CODES = {"ok": EXIT_OK, "bad_input": EXIT_BAD_INPUT, "requeue": EXIT_REQUEUE,
              "nonfinite": EXIT_NONFINITE}


class StackGANError(Exception):
    """An error a command reports in one line; ``exit_code`` is the process's exit status."""

    exit_code: int = EXIT_BAD_INPUT
    prefix: str = "error: "  # printed before the message; a requeue is not an error


def report(e: StackGANError, prog: str) -> int:
    """Print ``e`` as ``prog: error: message`` on stderr and return its exit status."""
    note = f"; exiting with status {e.exit_code} (requeue)" if e.exit_code == EXIT_REQUEUE else ""
    print(f"{prog}: {e.prefix}{e}{note}", file=sys.stderr, flush=True)
    return e.exit_code
