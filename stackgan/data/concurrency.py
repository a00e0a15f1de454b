"""Worker processes, and one writer per folder: shared by the shard writer (prepare.py) and the
embedded bird set's renderer (birds.py)."""
from __future__ import annotations

import contextlib
import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable


@contextlib.contextmanager
def folder_lock(path: Path):
    """Hold an exclusive ``flock`` on ``path`` (created if missing), so that two runs aimed at
    the same folder take turns instead of interleaving. Filesystems without flock support
    (some network mounts) get no lock rather than an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


def parallel_map(fn: Callable, jobs: list, workers: int, ordered: bool = False):
    """Yield ``fn(job)`` from ``workers`` processes (completion order unless ``ordered``).

    Unlike ``multiprocessing.Pool``, a worker that dies (OOM killer, signal) raises
    ``BrokenProcessPool`` instead of hanging, and stopping early (an error, Ctrl-C) kills the
    workers at once instead of deadlocking in ``Pool.terminate``."""
    ex = ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=mp.get_context())
    futures = [ex.submit(fn, j) for j in jobs]
    try:
        if ordered:
            for f in futures:
                yield f.result()
        else:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    yield f.result()
    except BaseException:
        for f in futures:
            f.cancel()
        for proc in list(getattr(ex, "_processes", {}).values()):
            if proc.is_alive():
                proc.kill()  # a half-written temp file is all they leave behind
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown(wait=True)
