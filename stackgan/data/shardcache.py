"""A bounded, node-wide cache of remote shards: fetched on demand, verified, evicted LRU.

Every process on a node that reads a remote shard set (ranks and their loader workers) shares
one folder (``data.cache_dir``) whose total size never exceeds ``data.cache_gb``. The rules,
all through ``flock`` so that the processes need no coordinator:

* a shard is fetched once (a per-entry lock; the others wait for it), into a temp file
  ``.part-*`` renamed into place only after its sha256 matched ``metadata.json``: a partial or
  wrong download is never visible under a shard's name;
* before bytes are written the space is reserved (the temp file is grown under the cache
  lock, evicting least recently used shards as needed), so the folder's total stays within
  the bound at every moment, downloads in flight included;
* a reader holds a shared lock on the shard while it reads it ("in use"); eviction takes an
  exclusive one without waiting, so a shard in use is never evicted;
* a temp file whose writer died (SIGKILL) holds no lock and is removed by the next eviction.

Entries are named by their sha256: a re-prepared set is fetched anew, an unchanged one is not.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from .storage import ShardError, Store, TransportError

log = logging.getLogger(__name__)

DEFAULT_GB = 20.0  # data.cache_gb's default (config.py holds the same number)
RESERVE_STEP = 16 << 20  # bytes reserved at a time when the size is not known in advance
WAIT_S = 600.0  # how long a reader waits for space held by shards in use before it gives up
TRIES = 3  # attempts of a transfer that failed in transport (not of a sha256 mismatch)


# Every fd this module opens is listed, so that a forked child (a DataLoader worker) closes its
# copies at once: a flock belongs to the open file, shared with the child by fork, and a copy
# that no thread of the child knows about would hold the parent's lock or pin forever. Opening and
# closing hold _FDS_LOCK, and so does fork: a fork between another thread's os.close and its discard
# (or os.open and add) would leave the child an unlisted copy (seen: two DataLoader workers each
# waiting for the cache lock that their own inherited copy held shared).
_FDS: set[int] = set()
_FDS_LOCK = threading.Lock()


def _open(path: str | Path, flags: int, mode: int = 0o644) -> int:
    with _FDS_LOCK:
        fd = os.open(path, flags | os.O_CLOEXEC, mode)
        _FDS.add(fd)
    return fd


def _close(fd: int) -> None:
    with _FDS_LOCK:
        _FDS.discard(fd)
        os.close(fd)


def _close_inherited() -> None:
    for fd in list(_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _FDS.clear()
    _FDS_LOCK.release()  # held by the forking thread across fork (a copy of it, in the child)


os.register_at_fork(before=_FDS_LOCK.acquire, after_in_parent=_FDS_LOCK.release,
                    after_in_child=_close_inherited)


def default_folder() -> Path:
    """``$STACKGAN_SHARD_CACHE``, else ``$TMPDIR/stackgan-shards`` (node-local on clusters)."""
    return Path(os.environ.get("STACKGAN_SHARD_CACHE") or Path(tempfile.gettempdir()) / "stackgan-shards")


class Pin:
    """An open, verified shard that cannot be evicted until :meth:`close`."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def close(self) -> None:
        if self.fd >= 0:
            _close(self.fd)  # releases the shared lock
            self.fd = -1

    def __enter__(self) -> "Pin":
        return self

    def __exit__(self, *_) -> None:
        self.close()


class ShardCache:
    """The cache folder ``folder`` holding at most ``bound`` bytes (sum of file sizes)."""

    def __init__(self, folder: str | Path | None, bound: int):
        self.folder = Path(folder) if folder else default_folder()
        self.bound = int(bound)
        if self.bound <= 0:
            raise ValueError(f"data.cache_gb must be > 0, got a bound of {self.bound} bytes")
        try:
            (self.folder / ".locks").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ShardError(f"data.cache_dir={self.folder}: cannot create the shard cache ({e})") from e
        self.fetched_bytes: list[int] = []  # sizes of the shards this process fetched
        with self._cache_lock():
            self._evict_locked(0)  # temp files left by killed writers

    # ---------------------------------------------------------------- locking helpers
    @contextlib.contextmanager
    def _locked(self, path: Path, mode: int) -> Iterator[None]:
        fd = _open(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            _close(fd)

    def _cache_lock(self, shared: bool = False):
        return self._locked(self.folder / ".lock", fcntl.LOCK_SH if shared else fcntl.LOCK_EX)

    def entry(self, name: str, sha256: str) -> Path:
        return self.folder / f"{sha256[:32]}-{name.replace('/', '_')}"

    # ---------------------------------------------------------------- size accounting
    def _files(self) -> list[os.DirEntry]:
        return [e for e in os.scandir(self.folder) if e.is_file(follow_symlinks=False) and e.name != ".lock"]

    def _usage_locked(self) -> int:
        total = 0
        for e in self._files():
            with contextlib.suppress(FileNotFoundError):
                total += e.stat(follow_symlinks=False).st_size
        return total

    def usage(self) -> int:
        """Bytes held now (shards, and downloads in flight with their reservations)."""
        with self._cache_lock(shared=True):
            return self._usage_locked()

    def _evict_locked(self, amount: int) -> int:
        """Free at least ``amount`` bytes if possible: dead temp files, then the least recently
        used shards that no process is reading. Returns the bytes freed."""
        freed, entries = 0, []
        for e in self._files():
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if e.name.startswith(".part-"):
                freed += self._drop_if_unlocked(Path(e.path), st.st_size)  # its writer is gone
            elif not e.name.startswith("."):
                entries.append((st.st_mtime_ns, Path(e.path), st.st_size))
        for _, path, size in sorted(entries):
            if freed >= amount:
                break
            freed += self._drop_if_unlocked(path, size)
        return freed

    @staticmethod
    def _drop_if_unlocked(path: Path, size: int) -> int:
        try:
            fd = _open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # in use (a reader) or being written
        else:
            path.unlink(missing_ok=True)
            return size
        finally:
            _close(fd)

    def _reserve(self, fd: int, want: int, wait: bool, where: str) -> bool:
        """Grow the temp file ``fd`` to ``want`` bytes once the bound allows it."""
        deadline = time.monotonic() + WAIT_S
        while True:
            with self._cache_lock():
                mine = os.fstat(fd).st_size
                usage = self._usage_locked()
                over = usage + (want - mine) - self.bound
                if over > 0:
                    over -= self._evict_locked(over)
                if over <= 0:
                    os.ftruncate(fd, want)
                    return True
                if usage - mine <= 0 or want > self.bound:
                    raise ShardError(f"{where}: needs at least {want / 1e9:.3g} GB, more than the whole "
                                     f"shard cache ({self.folder}, data.cache_gb={self.bound / 1e9:.3g}); "
                                     "raise data.cache_gb")
            if not wait:
                return False
            if time.monotonic() > deadline:
                raise ShardError(f"{where}: the shard cache {self.folder} (data.cache_gb="
                                 f"{self.bound / 1e9:.3g}) stayed full of shards in use for {WAIT_S:.0f} s; "
                                 "raise data.cache_gb (every reading process holds one shard and prefetches "
                                 "a few)")
            time.sleep(0.2)

    # ---------------------------------------------------------------- the public calls
    def _try_pin(self, path: Path) -> Pin | None:
        try:
            fd = _open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out an eviction in progress
        st = os.fstat(fd)
        try:
            cur = os.stat(path)
        except FileNotFoundError:
            cur = None
        if cur is None or (cur.st_ino, cur.st_dev) != (st.st_ino, st.st_dev):
            _close(fd)  # evicted between open and lock
            return None
        os.utime(path)  # most recently used
        return Pin(fd, path)

    def open(self, store: Store, name: str, sha256: str, *, wait: bool = True,
             stop: threading.Event | None = None) -> Pin | None:
        """The verified local copy of ``name``, pinned; fetched first if it is not here.
        ``wait=False`` (prefetch): ``None`` instead of waiting for space; ``stop`` set: ``None``
        as soon as possible (the temp file removed)."""
        if not sha256:
            raise ShardError(f"{store.where(name)}: metadata.json lists no sha256 for it; a remote shard "
                             "is only used once verified (prepare the set again)")
        path = self.entry(name, sha256)
        pin = self._try_pin(path)
        if pin is not None:
            return pin
        for attempt in range(TRIES):
            with self._locked(self.folder / ".locks" / path.name, fcntl.LOCK_EX):  # one fetcher per entry
                pin = self._try_pin(path)
                if pin is not None:
                    return pin
                try:
                    return self._fetch(store, name, sha256, path, wait, stop)
                except TransportError as e:
                    if attempt == TRIES - 1:
                        raise
                    log.warning("%s; trying again", e)
            time.sleep(2.0 * (attempt + 1))
        raise AssertionError("unreachable")

    def _fetch(self, store: Store, name: str, sha256: str, path: Path, wait: bool,
               stop: threading.Event | None) -> Pin | None:
        where = store.where(name)
        tmp = self.folder / f".part-{os.getpid()}-{threading.get_ident()}-{path.name}"
        with self._cache_lock():  # created and locked at once: eviction removes unlocked temp files
            fd = _open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            fcntl.flock(fd, fcntl.LOCK_EX)
        done = False
        try:
            h, written, reserved = hashlib.sha256(), 0, 0
            with store.open(name) as src:
                hint = getattr(src, "length", None) or 0  # HTTP Content-Length
                step = min(RESERVE_STEP, max(1 << 16, self.bound // 16))  # overshoot at most 1/16
                while True:
                    try:
                        chunk = src.read(1 << 20)
                    except OSError as e:
                        raise TransportError(f"{where}: transfer failed ({e})") from e
                    if not chunk:
                        break
                    if stop is not None and stop.is_set():
                        return None
                    if written + len(chunk) > reserved:  # the announced size, else a step at a time
                        want = written + len(chunk)
                        want = hint if hint >= want else max(want, reserved + step)
                        if not self._reserve(fd, want, wait, where):
                            return None
                        reserved = want
                    os.pwrite(fd, chunk, written)
                    written += len(chunk)
                    h.update(chunk)
            if h.hexdigest() != sha256:
                raise ShardError(f"{where}: sha256 {h.hexdigest()[:16]}... does not match metadata.json "
                                 f"({sha256[:16]}...): the shard is corrupt or was replaced")
            with self._cache_lock():
                os.ftruncate(fd, written)
                fcntl.flock(fd, fcntl.LOCK_SH)  # pinned from the moment it has its name
                os.rename(tmp, path)
            os.utime(path)
            self.fetched_bytes.append(written)
            done = True
            return Pin(fd, path)
        finally:
            if not done:
                tmp.unlink(missing_ok=True)
                _close(fd)


class ShardFiles:
    """The files of one shard set, local or remote: ``open(name, sha256)`` gives a pinned fd."""

    def __init__(self, store: Store, cache_dir: str | Path | None = None, cache_gb: float = DEFAULT_GB):
        self.store = store
        self.cache = ShardCache(cache_dir, int(cache_gb * 1e9)) if store.remote else None

    def open(self, name: str, sha256: str, *, wait: bool = True,
             stop: threading.Event | None = None) -> Pin | None:
        if self.cache is not None:
            return self.cache.open(self.store, name, sha256, wait=wait, stop=stop)
        path = self.store.path(name)
        try:
            return Pin(_open(path, os.O_RDONLY), path)
        except FileNotFoundError:
            raise ShardError(f"{path}: shard listed in metadata.json is missing") from None
        except OSError as e:
            raise ShardError(f"{path}: cannot open ({e})") from e

    def cached(self, name: str, sha256: str) -> bool:
        return self.cache is None or self.cache.entry(name, sha256).is_file()

    def capacity(self) -> int:
        """Shards the cache holds at once, estimated from the shards fetched so far (1 before any)."""
        if self.cache is None or not self.cache.fetched_bytes:
            return 1
        mean = sum(self.cache.fetched_bytes) / len(self.cache.fetched_bytes)
        return max(1, int(self.cache.bound // max(mean, 1)))


class Prefetcher:
    """A background thread that fetches, in order, the shards a reader will need next.

    :meth:`want` replaces the list (called once per batch); shards already cached are skipped.
    Prefetching never waits for space: a full cache of shards in use leaves the fetch to the
    reader. Errors are left to the reader too (it fetches again and names the shard)."""

    def __init__(self, files: ShardFiles, shards: list[tuple[str, str]]):
        self.files, self.shards = files, shards  # (name, sha256) per shard index
        self._want: list[int] = []
        self._cv = threading.Condition()
        self._stop = False
        self._abort = threading.Event()  # ends a download in flight (its temp file removed)
        self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self._thread.start()

    def want(self, shards: list[int]) -> None:
        with self._cv:
            self._want = list(shards)
            self._cv.notify()

    def close(self) -> None:
        """Stop, and wait for a download in flight to be abandoned (no temp file outlives us)."""
        self._abort.set()
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._want and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                todo, self._want = self._want, []
            for s in todo:
                with self._cv:
                    if self._stop or self._want:  # a newer list arrived: start over with it
                        break
                name, sha = self.shards[s]
                if self.files.cached(name, sha):
                    continue
                try:
                    pin = self.files.open(name, sha, wait=False, stop=self._abort)
                except Exception as e:  # noqa: BLE001 -- the reader fetches again and reports it
                    log.debug("prefetch of %s failed: %s", name, e)
                    continue
                if pin is None:
                    break  # no room now: the reader will fetch on demand
                pin.close()
