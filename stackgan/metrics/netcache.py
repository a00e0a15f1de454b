"""The life of a measuring net's file: where it is cached, how it is written, read and made once.

Measuring nets (the attribute judges, the 256-px detail net) are trained on a shard set on
first use and cached for later runs; the Inceptions are only read. All of them go through
this module:

* **where** (:func:`cache_path`): an explicit path when the user gives one; else the net's
  default file in the shard folder when it is there already (earlier runs) or the folder is
  writable; else, for read-only dataset storage, the user cache folder
  ``<cache_dir>/<shard fingerprint>/<file>`` (``cache_dir``: ``--cache-dir`` /
  ``EvalContext.cache_dir``, else ``$XDG_CACHE_HOME/stackgan``, else ``~/.cache/stackgan``),
  keyed by the sha256 of the shards' ``metadata.json`` (:func:`metadata_fingerprint`), so two
  shard sets never share a net.
* **writing** (:func:`save_net`): a plain payload (tensors, str, numbers, lists, dicts) with
  its ``format`` and the shards' fingerprint, to a temporary name renamed into place.
* **reading** (:func:`load_net`, :func:`read_state_dict`): ``torch.load(weights_only=True)``,
  which runs no code from the file; files written before this module (numpy scalars in
  their reports) are admitted with exactly the numpy scalar types allowed.
* **making once** (:func:`make_once`): rank 0 trains and writes while the other ranks wait.

Why one module: the judges, the detail net and both Inceptions used to each carry their own
copy of these rules, and the read-only-storage rule must hold for all of them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stackgan.data.meta import ShardMeta

from .core import barrier, rank_world

_NP_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
# numpy scalars in the reports of files written before this module: the only globals admitted
_OLD_FILE_TYPES = [_NP_CORE.multiarray.scalar, np.dtype, *(type(np.dtype(t)) for t in (np.float64, np.float32,
                                                                                       np.int64))]


def user_cache_dir(cache_dir: str | Path = "") -> Path:
    """The cache folder for measuring nets of read-only shard sets (see the module docstring)."""
    if cache_dir:
        return Path(cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stackgan"


def metadata_fingerprint(meta: ShardMeta) -> str:
    """A shard set's identity for the cache folder: sha256 of its ``metadata.json`` (16 hex)."""
    return hashlib.sha256((Path(meta.root) / "metadata.json").read_bytes()).hexdigest()[:16]


def shard_fingerprint(meta: ShardMeta) -> str:
    """Identity of a shard set's training data (its train shards' sha256 values), recorded in
    the nets trained on it and checked when they are used."""
    return hashlib.sha256("".join(s.sha256 for s in meta.splits["train"].shards).encode()).hexdigest()[:16]


def writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (false on read-only mounts, for other users' data)."""
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def cache_path(meta: ShardMeta, filename: str, explicit: str | Path = "", cache_dir: str | Path = "") -> Path:
    """Where the measuring net ``filename`` of the shard set ``meta`` is read from or trained to."""
    if explicit:
        return Path(explicit)
    in_shards = Path(meta.root) / filename
    in_cache = user_cache_dir(cache_dir) / metadata_fingerprint(meta) / filename
    if in_shards.is_file():
        return in_shards
    if in_cache.is_file() or not writable(Path(meta.root)):
        return in_cache
    return in_shards


def plain(value):
    """``value`` with numpy scalars and paths turned into Python ones and tensors moved to the
    CPU: what ``torch.load(weights_only=True)`` reads back."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def save_net(path: str | Path, fmt: str, payload: dict, meta: ShardMeta | None = None) -> Path:
    """Write a measuring net's ``payload`` as format ``fmt`` (with ``meta``: the shards'
    fingerprint too) to ``path`` atomically; the folder is created. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = plain({"format": fmt, **payload})
    if meta is not None:
        data["fingerprint"] = shard_fingerprint(meta)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return path


def load_net(path: str | Path, formats: tuple[str, ...], error: type[Exception], what: str) -> dict:
    """The payload of a measuring-net file of one of ``formats`` (read with weights_only=True),
    or ``error`` naming the file and why not."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_OLD_FILE_TYPES):
            d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(f"{path}: cannot read {what} file ({e})") from e
    if not isinstance(d, dict) or d.get("format") not in formats:
        raise error(f"{path}: not a {what} file ({' or '.join(formats)})")
    return d


def read_state_dict(path: Path, error: type[Exception], what: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a state_dict, bare or under ``state_dict``, DataParallel's
    ``module.`` prefix dropped), or ``error`` saying why not: for networks built empty here."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(f"{path}: cannot read {what} weights ({e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise error(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def make_once(path: Path, make: Callable[[], None]) -> None:
    """When ``path`` does not exist yet, rank 0 calls ``make`` (which trains and writes it with
    :func:`save_net`) while the other ranks wait for it."""
    if not Path(path).is_file():
        if rank_world()[0] == 0:
            make()
        barrier()
