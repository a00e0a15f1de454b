"""Training stream: deterministic, resumable, rank-balanced batches from webdataset shards.

Why not a stock ``WebDataset`` pipeline: its shuffle buffer and shard split make batch ``k``
depend on everything read before it, ranks get unequal epochs when shards differ in size,
and a restart cannot land exactly where a run stopped. Here every batch is a *pure
function* of ``(seed, rank, world_size, batch_size, config, k)``; the loader only decides
who computes it. That gives exact restore in O(1), equal batch counts on every rank, and
the same batches whatever ``num_workers`` is.

The stream, stage by stage (see :meth:`_BatchMaker.make`):

1. **plan** (metadata only, no I/O): the infinite stream is cut into epochs of
   ``batches_per_epoch`` batches per rank. An epoch is one pass over the split (more passes
   when the split is smaller than one global batch): the shard order is permuted from the
   run seed *before* the node split, the samples of the shards in that order form one
   sequence, the sequence is shuffled within windows of ``shuffle_buffer`` samples, the
   tail that does not fill a global batch is dropped, and global batch ``j`` is the ``j``-th
   run of ``batch_size * world_size`` positions, of which rank ``r`` takes the ``r``-th slice.
   So each epoch is an exact partition of the split (minus the dropped remainder, which
   changes every epoch) across the ranks, and K processes see at step ``j`` the samples (and,
   augmentation being seeded by position, the crops) that one process with the whole global
   batch sees.
2. **worker split**: loader worker ``w`` of ``n`` computes batches ``start + w, start + w + n,
   ...``, which is the order in which ``torch.utils.data.DataLoader`` collects them.
3. **read**: raw fields of one sample by offset (``os.pread``) from an index of the tar's
   member headers (:mod:`.tario`), built once per shard and process; only the fields the
   stage needs; a batch's samples are read shard by shard.
4. **decode**: image (JPEG or PNG), embeddings, captions, class id; every field checked.
5. **repair** (``on_corrupt="skip"`` only): an unreadable sample is replaced by a readable
   one of the same batch (or of the nearest later batch), counted and logged.
6. **augment** (seeded per batch): StackGAN's random 64-of-76 / 256-of-304 crop, horizontal
   flip with p=0.5, one of the 10 caption embeddings or the mean of ``emb_k`` distinct ones.
7. **collate**: ``{"img", "emb", "cls", "caption", "key"}``; with ``attributes=True`` also
   ``"attr"`` (B, A) uint8, the image's attribute labels, and ``"stated"`` (B, A) bool, the
   groups its chosen caption(s) state (:mod:`.captions`), for D's attribute head.

Shards given as a URL (``https://``, ``pipe:CMD`` with ``{name}``; :mod:`.storage`) are read
from the node's bounded cache (:mod:`.shardcache`): fetched on demand, checked against the
sha256 in the metadata, held only while a batch reads them, evicted least recently used; the
shards the plan needs next are fetched by a background thread. Where bytes come from never
changes which samples form a batch.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import signal
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from ..images import STORED
from .captions import StatedGroups
from .meta import ShardError, ShardMeta, load_metadata
from .shardcache import DEFAULT_GB, Pin, Prefetcher, ShardFiles
from .storage import parse as parse_store
from .tario import TarIndex, decode_image, index_tar, load_npy, quiet_decoder, read_fields

log = logging.getLogger(__name__)

SOURCE_SIZE = STORED  # StackGAN random-crops 64 from 76 and 256 from 304 (stackgan/images.py)
EMB_MODES = ("one", "mean")
ON_CORRUPT = ("raise", "skip")
IMG_DTYPES = ("float32", "uint8")
_MASK = (1 << 63) - 1

# seed-sequence tags, so that the random streams of the stages never coincide
_T_ORDER, _T_WINDOW, _T_AUG, _T_FILL = 1, 2, 3, 4


# --------------------------------------------------------------------------------------
# Configuration that fixes the stream (picklable: sent to loader workers)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    root: str  # where metadata.json and the shards are: folder, file://, http(s):// or pipe:CMD
    split: str
    shards: tuple[tuple[str, int], ...]  # (file name, sample count) in metadata order
    image_size: int
    source_size: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    window: int  # shuffle window (samples)
    emb_mode: str
    emb_k: int
    on_corrupt: str
    captions: int  # captions (and embeddings) per image
    text_dim: int
    img_dtype: str = "float32"  # "float32": [-1, 1] as the trainer wants; "uint8": 0..255
    sha256: tuple[str, ...] = ()
    cache_dir: str = ""  # remote shards: the node's cache folder ("" = shardcache.default_folder())
    cache_gb: float = DEFAULT_GB  # remote shards: the cache's bound
    attributes: tuple[str, ...] = ()  # the shards' attribute names: read attr.npy (none: not read)

    @property
    def num_samples(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.num_samples // (self.batch_size * self.world_size))

    @property
    def fields(self) -> tuple[str, ...]:
        """Per-sample fields this stream reads (the other size's image is never read; ``76.jpg``
        also finds ``76.png``, see :func:`stackgan.data.tario.member_of`)."""
        fields = ("name.txt", f"{self.source_size}.jpg", "emb.npy", "txt.json", "cls")
        return fields + ("attr.npy",) if self.attributes else fields


def _rng(spec: StreamSpec, tag: int, *ints: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed & _MASK, tag, *(int(i) for i in ints)])


# --------------------------------------------------------------------------------------
# Stage 1: the plan -- which samples form batch k (pure function, metadata only)
# --------------------------------------------------------------------------------------
class _Plan:
    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.counts = np.array([n for _, n in spec.shards], dtype=np.int64)
        self.n = int(self.counts.sum())
        self.bpe = spec.batches_per_epoch
        self.per_rank = self.bpe * spec.batch_size
        self.per_epoch = self.per_rank * spec.world_size  # samples used per epoch (all ranks)
        self.passes = -(-self.per_epoch // self.n)  # passes over the split per epoch (>= 1)
        self._orders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _order(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard order of pass t and the start of each of its shards in the pass sequence."""
        if t not in self._orders:
            order = _rng(self.spec, _T_ORDER, t).permutation(len(self.counts))
            starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])
            self._orders[t] = (order, starts)
            if len(self._orders) > 4:
                self._orders.popitem(last=False)
        return self._orders[t]

    def _window(self, t: int, b: int) -> np.ndarray:
        key = (t, b)
        if key not in self._windows:
            w = self.spec.window
            size = min(w, self.n - b * w)
            self._windows[key] = _rng(self.spec, _T_WINDOW, t, b).permutation(size)
            if len(self._windows) > 8:
                self._windows.popitem(last=False)
        return self._windows[key]

    def refs(self, epoch: int, pos: np.ndarray) -> list[tuple[int, int]]:
        """(shard index, sample index in shard) at epoch-level positions ``pos``."""
        w = self.spec.window
        out = []
        for p in pos.tolist():
            t, q = epoch * self.passes + p // self.n, p % self.n  # pass, shuffled position
            b = q // w
            seq = b * w + int(self._window(t, b)[q - b * w])  # position in the shard sequence
            order, starts = self._order(t)
            i = int(np.searchsorted(starts, seq, side="right")) - 1
            out.append((int(order[i]), seq - int(starts[i])))
        return out

    def shards_from(self, k: int, count: int) -> list[int]:
        """Up to ``count`` distinct shards that batches k, k+1, ... of this rank may read, in
        the order they are first needed (a window may draw from every shard it overlaps)."""
        epoch, pos = self.batch_positions(k)
        p, w = int(pos[0]), self.spec.window
        lo_rank = self.spec.rank * self.per_rank
        out: list[int] = []
        for _ in range(4 * len(self.counts) + 8):
            t, q = epoch * self.passes + p // self.n, p % self.n
            lo, hi = q // w * w, min(q // w * w + w, self.n)  # the window of position q
            order, starts = self._order(t)
            first = int(np.searchsorted(starts, lo, side="right")) - 1
            last = int(np.searchsorted(starts, hi - 1, side="right")) - 1
            for s in order[first:last + 1].tolist():
                if s not in out:
                    out.append(s)
                    if len(out) == count:
                        return out
            p += hi - q
            if p >= lo_rank + self.per_rank:  # past this rank's slice: the next epoch's
                epoch, p = epoch + 1, lo_rank
        return out

    def batch_positions(self, k: int) -> tuple[int, np.ndarray]:
        """Epoch of batch k of this rank and the epoch-level positions of its samples."""
        epoch, j = divmod(k, self.bpe)
        first = (j * self.spec.world_size + self.spec.rank) * self.spec.batch_size  # rank r's part of batch j
        return epoch, np.arange(first, first + self.spec.batch_size)


# --------------------------------------------------------------------------------------
# Stage 3: reading raw fields (tar index and reads: tario; local or cached remote files: shardcache)
# --------------------------------------------------------------------------------------
class _Reader:
    """Raw sample fields by (shard, index); one per process (indexes, fds and pins are not shared).

    Local shards stay open (up to 64 fds). A remote shard is pinned in the cache only while a
    batch reads it (:meth:`pinned`), so that the cache can evict it afterwards; its index is
    kept (the bytes are verified by sha256, so a refetched copy has the same offsets)."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.store = parse_store(spec.root)
        self.files = ShardFiles(self.store, spec.cache_dir or None, spec.cache_gb)
        self.indexes: dict[int, TarIndex] = {}
        self.failed: dict[int, str] = {}  # shards that could not be opened or fetched: why
        self.fds: OrderedDict[int, Pin] = OrderedDict()  # local shards only
        self._where = [self.store.where(n) for n, _ in spec.shards]
        self.prefetch: Prefetcher | None = None
        if self.store.remote:
            self.prefetch = Prefetcher(self.files, [(n, h) for (n, _), h in zip(spec.shards, spec.sha256)])

    def close(self) -> None:
        for pin in self.fds.values():
            pin.close()
        self.fds.clear()
        if self.prefetch is not None:
            self.prefetch.close()

    def where(self, shard: int) -> str:
        """The shard as the user knows it (local path or URL), for messages."""
        return self._where[shard]

    @contextlib.contextmanager
    def pinned(self, shard: int) -> Iterator[int]:
        """An fd of the shard, held open (and, if remote, unevictable) for the ``with`` block."""
        if shard in self.fds:
            self.fds.move_to_end(shard)
            yield self.fds[shard].fd
            return
        if shard in self.failed:
            raise ShardError(self.failed[shard])
        try:
            pin = self.files.open(self.spec.shards[shard][0], self.spec.sha256[shard])
        except ShardError as e:  # remembered: a skipped shard is not fetched again every batch
            self.failed[shard] = str(e)
            raise
        if self.store.remote:
            with pin:
                yield pin.fd
            return
        self.fds[shard] = pin
        if len(self.fds) > 64:
            self.fds.popitem(last=False)[1].close()
        yield pin.fd

    def index(self, shard: int, fd: int) -> TarIndex:
        if shard not in self.indexes:
            self.indexes[shard] = index_tar(fd, self.where(shard), self.spec.shards[shard][1])
        return self.indexes[shard]

    def read(self, shard: int, i: int, fd: int) -> dict[str, bytes]:
        idx = self.index(shard, fd)
        if idx.problem and (self.spec.on_corrupt == "raise" or i >= len(idx.samples)):
            raise ShardError(f"{self.where(shard)}: {idx.problem}")
        return read_fields(fd, idx, i, self.spec.fields)



# --------------------------------------------------------------------------------------
# Stage 4: decoding one sample
# --------------------------------------------------------------------------------------
@dataclass
class _Sample:
    img: np.ndarray  # uint8 (3, src, src)
    emb: np.ndarray  # float32 (captions, text_dim)
    captions: list[str]
    cls: int
    name: str
    attr: np.ndarray | None = None  # uint8 (A,) when the stream reads attributes


def _decode(raw: dict[str, bytes], spec: StreamSpec, where: str) -> _Sample:
    key = raw["__key__"].decode()
    try:
        img = decode_image(raw[f"{spec.source_size}.jpg"], spec.source_size)
        emb = load_npy(raw["emb.npy"])
        if emb.shape != (spec.captions, spec.text_dim) or emb.dtype.kind != "f":
            raise ValueError(f"emb.npy is {emb.dtype} {emb.shape}, "
                             f"expected float ({spec.captions}, {spec.text_dim})")
        captions = json.loads(raw["txt.json"])
        if not (isinstance(captions, list) and len(captions) == spec.captions
                and all(isinstance(c, str) for c in captions)):
            raise ValueError(f"txt.json is not a list of {spec.captions} captions")
        cls = int(raw["cls"].decode("ascii").strip())
        name = raw["name.txt"].decode("utf-8").strip()
        attr = None
        if spec.attributes:
            attr = load_npy(raw["attr.npy"])
            if attr.shape != (len(spec.attributes),):
                raise ValueError(f"attr.npy has shape {attr.shape}, expected ({len(spec.attributes)},)")
            attr = attr.astype(np.uint8, copy=False)
    except (OSError, ValueError, EOFError, SyntaxError, UnicodeDecodeError) as e:
        raise ShardError(f"{where}: sample {key!r}: {e}") from e
    return _Sample(img, emb.astype(np.float32, copy=False), captions, cls, name, attr)


# --------------------------------------------------------------------------------------
# Stages 1-7 for one batch
# --------------------------------------------------------------------------------------
class _BatchMaker:
    def __init__(self, spec: StreamSpec, stride: int = 1):
        self.spec = spec
        self.plan = _Plan(spec)
        self.reader = _Reader(spec)
        self.stride = stride  # this maker computes batches k, k + stride, ... (loader workers)
        self.warned: set[str] = set()
        self.stated = StatedGroups(list(spec.attributes)) if spec.attributes else None

    def _load(self, epoch: int, pos: np.ndarray, notes: list[str]) -> list[_Sample | None]:
        with quiet_decoder():
            return self._load_all(epoch, pos, notes)

    def _load_all(self, epoch: int, pos: np.ndarray, notes: list[str]) -> list[_Sample | None]:
        refs = self.plan.refs(epoch, pos)  # 1. plan
        out: list[_Sample | None] = [None] * len(refs)
        by_shard: dict[int, list[tuple[int, int]]] = {}  # read shard by shard: one pinned at a time
        for j, (shard, i) in enumerate(refs):
            by_shard.setdefault(shard, []).append((j, i))
        for shard, items in by_shard.items():
            try:
                with self.reader.pinned(shard) as fd:
                    for j, i in items:
                        try:
                            raw = self.reader.read(shard, i, fd)  # 3. read
                            out[j] = _decode(raw, self.spec, self.reader.where(shard))  # 4. decode
                        except ShardError as e:
                            self._unreadable(e, notes)
            except ShardError as e:  # the shard itself: missing, unfetchable, sha256 mismatch
                self._unreadable(e, notes)
        return out

    def _unreadable(self, e: ShardError, notes: list[str]) -> None:
        if self.spec.on_corrupt == "raise":
            raise e
        msg = str(e)  # a bad shard gives the same message for all its samples: one note
        if msg not in self.warned:
            self.warned.add(msg)
            notes.append(msg)

    def _donors(self, epoch: int, pos: np.ndarray, notes: list[str]) -> list[_Sample]:
        """Readable samples from the nearest later batch of the epoch (any rank), wrapping."""
        plan, b = self.plan, self.spec.batch_size
        for step in range(1, plan.per_epoch // b + 1):
            found = [s for s in self._load(epoch, (pos + step * b) % plan.per_epoch, notes) if s]
            if found:
                return found
        raise ShardError(f"{self.spec.root}: no readable sample in split {self.spec.split!r}")

    def make(self, k: int) -> tuple[dict, int, list[str]]:
        spec, notes = self.spec, []
        epoch, pos = self.plan.batch_positions(k)  # 1-2. plan (workers pick k)
        if self.reader.prefetch is not None:  # remote shards: fetch what comes next meanwhile
            ahead = min(8, max(1, self.reader.files.capacity() // 4))
            self.reader.prefetch.want(self.plan.shards_from(k, 1 + ahead))
        samples = self._load(epoch, pos, notes)  # 3-4. read, decode
        holes = [i for i, s in enumerate(samples) if s is None]
        if holes:  # 5. repair
            donors = [s for s in samples if s] or self._donors(epoch, pos, notes)
            pick = _rng(spec, _T_FILL, epoch, int(pos[0])).integers(len(donors), size=len(holes))
            for h, d in zip(holes, pick):
                samples[h] = donors[d]
        # 6. augment: one generator per batch, seeded by its place in the epoch
        rng = _rng(spec, _T_AUG, epoch, int(pos[0]))
        n, s, src = spec.batch_size, spec.image_size, spec.source_size
        xs, ys = rng.integers(0, src - s + 1, size=(2, n))
        flips = rng.random(n) < 0.5
        k_emb = 1 if spec.emb_mode == "one" else spec.emb_k
        caps = np.argsort(rng.random((n, spec.captions)), axis=1)[:, :k_emb]  # distinct per row
        img_u8 = _new_batch_tensor((n, 3, s, s), torch.uint8, shared=spec.img_dtype == "uint8")
        img = img_u8.numpy()
        emb = np.empty((n, spec.text_dim), dtype=np.float32)
        for i, smp in enumerate(samples):
            crop = smp.img[:, ys[i]:ys[i] + s, xs[i]:xs[i] + s]
            img[i] = crop[:, :, ::-1] if flips[i] else crop
            emb[i] = smp.emb[caps[i]].mean(axis=0)
        # 7. collate
        batch = {
            "img": img_u8 if spec.img_dtype == "uint8" else to_unit_range(img_u8),
            "emb": torch.from_numpy(emb),
            "cls": torch.tensor([smp.cls for smp in samples], dtype=torch.int64),
            "caption": [smp.captions[c[0]] for smp, c in zip(samples, caps)],
            "key": [smp.name for smp in samples],
        }
        if spec.attributes:  # the mean of k embeddings carries what any of its k captions states
            batch["attr"] = torch.from_numpy(np.stack([smp.attr for smp in samples]))
            stated = [np.logical_or.reduce([self.stated(smp.captions[j]) for j in c])
                      for smp, c in zip(samples, caps)]
            batch["stated"] = torch.from_numpy(np.stack(stated))
        return batch, len(holes), notes


def _new_batch_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool) -> torch.Tensor:
    """A tensor that is handed to the trainer: in a loader worker it is allocated in shared
    memory at once (otherwise torch copies it there, 50 MB for a float 256px batch)."""
    t = torch.empty(shape, dtype=dtype)
    if shared and torch.utils.data.get_worker_info() is not None:
        t.share_memory_()
    return t


def to_unit_range(img: torch.Tensor,
                  memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 images (0..255) -> float32 in [-1, 1]; for ``img_dtype="uint8"`` batches, call it
    after moving them to the GPU (4x less to copy and no CPU conversion). ``memory_format``:
    the layout of the result (``torch.channels_last`` for a channels-last D: the conversion
    writes it directly, no second copy)."""
    if img.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {img.dtype}")
    if img.device.type == "cpu" and memory_format == torch.contiguous_format:
        out = _new_batch_tensor(tuple(img.shape), torch.float32, shared=True)
    else:
        out = torch.empty(img.shape, dtype=torch.float32, device=img.device, memory_format=memory_format)
    return out.copy_(img).div_(127.5).sub_(1.0)


def to_device(x, device: torch.device | str):
    """A host tensor, or a batch dict of them, on ``device`` without making the host wait.

    A host->GPU copy from pageable memory, or any copy with ``non_blocking=False``,
    synchronises the stream: the host waits until every queued kernel has run, so it cannot
    queue the next step meanwhile. From pinned memory with ``non_blocking=True`` the copy is
    queued like a kernel. Loader batches arrive pinned (``pin_memory=True``); small per-step
    tensors (noise, wrong-pair indices, class targets) are pinned here. Other devices: ``.to``.
    """
    if isinstance(x, dict):
        return {k: to_device(v, device) if torch.is_tensor(v) else v for k, v in x.items()}
    if not torch.is_tensor(x):
        raise TypeError(f"to_device: expected a tensor or a dict of tensors, got {type(x).__name__}")
    device = torch.device(device)
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    if not x.is_pinned():
        x = x.pin_memory()  # the caching host allocator reuses the block once the copy is done
    return x.to(device, non_blocking=True)


# Signals that ask the trainer to checkpoint and stop. Slurm sends them to every process of a
# job (preemption, requeue, time limit): a loader worker must outlive them, or the trainer
# fails on "DataLoader worker is killed" instead of checkpointing; it ends when the trainer
# closes the stream.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one thread per loader worker: more is slower under load
    for s in STOP_SIGNALS:  # blocked since the fork (see _start_workers); ignored from now on
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)`` (which starts the workers) with the stop signals blocked, so that a worker
    cannot die of one before :func:`_worker_init` ignores them; the trainer gets any that arrive
    meanwhile as soon as they are unblocked again."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Batches(torch.utils.data.IterableDataset):
    """Batches start, start+1, ... dealt round-robin to loader workers (DataLoader's order)."""

    def __init__(self, spec: StreamSpec, start: int):
        super().__init__()
        self.spec, self.start = spec, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        maker = _BatchMaker(self.spec, nw)
        try:
            for k in itertools.count(self.start + wid, nw):
                yield maker.make(k)
        finally:
            maker.reader.close()


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _check_args(meta: ShardMeta, split: str, image_size: int, batch_size: int, rank: int,
                world_size: int, num_workers: int, emb_mode: str, emb_k: int, on_corrupt: str) -> int:
    where = f"{meta.root}/metadata.json"
    if image_size not in SOURCE_SIZE:
        raise ValueError(f"image_size must be one of {sorted(SOURCE_SIZE)}, got {image_size}")
    src = SOURCE_SIZE[image_size]
    if src not in meta.image_sizes:
        raise ShardError(f"{where}: shards hold sizes {meta.image_sizes}, "
                         f"image_size {image_size} needs {src}")
    if split not in meta.splits:
        raise ShardError(f"{where}: no split {split!r} (has {sorted(meta.splits)})")
    info = meta.splits[split]
    if not info.shards or info.num_samples <= 0:
        raise ShardError(f"{where}: split {split!r} has no samples")
    if sum(s.num_samples for s in info.shards) != info.num_samples:
        raise ShardError(f"{where}: split {split!r} shard counts do not add up to num_samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if emb_mode not in EMB_MODES:
        raise ValueError(f"emb_mode must be one of {EMB_MODES}, got {emb_mode!r}")
    if emb_mode == "mean" and not 1 <= emb_k <= meta.captions_per_image:
        raise ValueError(f"emb_k must be in [1, {meta.captions_per_image}], got {emb_k}")
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
    return src


class TrainStream:
    """Infinite, deterministic, resumable training batches for one rank.

    Batch ``k`` depends only on (seed, rank, world_size, batch_size, image_size,
    shuffle_buffer, emb_mode, emb_k, the shard set) -- not on ``num_workers`` nor on what was
    read before -- so ``iterate(start=k)`` after a restart continues exactly. Every rank has
    ``batches_per_epoch`` batches per epoch; the stream never ends.

    ``shuffle_buffer`` is the shuffle window in samples (1 = no shuffle, 0 = the whole split,
    i.e. a full reshuffle every epoch as StackGAN does): no samples are held, so a large
    window costs no memory. ``on_corrupt="skip"`` replaces unreadable samples (counted in ``skipped``,
    logged once each). Extras: ``cache_dir`` and ``cache_gb``, the node's bounded cache of shards
    given as a URL (:mod:`stackgan.data.shardcache`); ``start_method`` of
    the loader workers ("fork" unless the platform lacks it); ``attributes=True`` adds each image's
    attribute labels and its caption's stated groups (D's attribute head); ``img_dtype="uint8"`` hands
    0..255 images to be normalised on the GPU with :func:`to_unit_range`.
    """

    def __init__(self, shard_dir: str, split: str, image_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 1000,
                 emb_mode: str = "one", emb_k: int = 4, on_corrupt: str = "raise",
                 pin_memory: bool = False, cache_dir: str | None = None, cache_gb: float = DEFAULT_GB,
                 start_method: str | None = "fork", img_dtype: str = "float32", attributes: bool = False):
        self.meta = load_metadata(shard_dir)
        src = _check_args(self.meta, split, image_size, batch_size, rank, world_size, num_workers,
                          emb_mode, emb_k, on_corrupt)
        if img_dtype not in IMG_DTYPES:
            raise ValueError(f"img_dtype must be one of {IMG_DTYPES}, got {img_dtype!r}")
        if not cache_gb > 0:
            raise ValueError(f"cache_gb must be > 0, got {cache_gb}")
        if attributes and not self.meta.attributes:
            raise ShardError(f"{self.meta.root}/metadata.json lists no attributes: these shards carry no "
                             "attribute labels (attr.npy) to stream")
        shards = self.meta.splits[split].shards
        total = self.meta.splits[split].num_samples
        self.spec = StreamSpec(
            root=str(self.meta.root), split=split, shards=tuple((s.name, s.num_samples) for s in shards),
            image_size=image_size, source_size=src, batch_size=batch_size, seed=seed, rank=rank,
            world_size=world_size, window=shuffle_buffer if shuffle_buffer > 0 else total,
            emb_mode=emb_mode,
            emb_k=emb_k if emb_mode == "mean" else 1, on_corrupt=on_corrupt,
            captions=self.meta.captions_per_image, text_dim=self.meta.text_dim,
            img_dtype=img_dtype, sha256=tuple(s.sha256 for s in shards), cache_dir=str(cache_dir or ""),
            cache_gb=float(cache_gb), attributes=tuple(self.meta.attributes) if attributes else (),
        )
        store = parse_store(self.spec.root)
        if not store.remote:  # local shards: a missing file is found now, before any training
            missing = [s.name for s in shards if not store.path(s.name).is_file()]
            if missing:
                msg = (f"{self.meta.root}: {len(missing)} shard(s) listed in metadata.json "
                       f"are missing: {missing[:5]}")
                if on_corrupt == "raise":
                    raise ShardError(msg)
                log.warning("%s (their samples will be skipped)", msg)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        # Loader workers are forked by default: they use no CUDA, and under torchrun/spawn the
        # inherited default ("spawn") re-imports torch in every worker at every iterate().
        self.start_method = start_method if start_method in mp.get_all_start_methods() else None
        self.batches_per_epoch = self.spec.batches_per_epoch
        self.num_samples = self.spec.num_samples
        self.skipped = 0  # samples replaced because they could not be read (this process)
        self.position = 0  # index of the next batch iterate() will yield
        self._warned: set[str] = set()

    def signature(self) -> dict:
        """Everything that fixes the batch sequence (store it next to ``position`` in a checkpoint)."""
        d = asdict(self.spec)
        for k in ("root", "on_corrupt", "sha256", "img_dtype", "cache_dir", "cache_gb", "attributes"):
            d.pop(k)
        d["shards"] = [list(s) for s in d["shards"]]
        return d

    def _batches(self, start: int) -> Iterator[tuple[dict, int, list[str]]]:
        if self.num_workers == 0:
            yield from _Batches(self.spec, start)
            return
        loader = torch.utils.data.DataLoader(
            _Batches(self.spec, start), batch_size=None, num_workers=self.num_workers,
            worker_init_fn=_worker_init, pin_memory=self.pin_memory and torch.cuda.is_available(),
            prefetch_factor=2, multiprocessing_context=self.start_method,
            generator=torch.Generator(),  # the loader's worker seed must not advance the global RNG
        )
        it = _start_workers(loader)
        try:
            yield from it
        finally:  # stop the workers now: an error's traceback keeps `it` alive, and shutting
            # them down later from the garbage collector waits out torch's 5 s timeouts
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            for w in getattr(it, "_workers", ()):  # one that did not join: torch's terminate() sends
                if w.is_alive():  # SIGTERM, which our workers ignore
                    w.kill()

    def iterate(self, start: int = 0) -> Iterator[dict]:
        """Batches ``start, start + 1, ...`` forever (``start`` = batches already consumed)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.position = start
        pin = self.pin_memory and self.num_workers == 0 and torch.cuda.is_available()
        for batch, skipped, notes in self._batches(start):
            for msg in notes:
                if msg not in self._warned:
                    self._warned.add(msg)
                    log.warning("skipping unreadable data: %s", msg)
            self.skipped += skipped
            if pin:
                batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
            self.position += 1
            yield batch


def load_fixed_samples(shard_dir: str, split: str, n: int, image_size: int, *, cache_dir: str | None = None,
                       cache_gb: float = DEFAULT_GB) -> dict:
    """``n`` samples spread evenly over a split (metadata shard order, so over its species):
    centre crop, no flip, caption 0.

    For sample grids and evaluation: always the same images and captions. Returns fewer than
    ``n`` when the split is smaller.
    """
    meta = load_metadata(shard_dir)
    src = _check_args(meta, split, image_size, 1, 0, 1, 0, "one", 1, "raise")
    shards = meta.splits[split].shards
    spec = StreamSpec(
        root=str(meta.root), split=split, shards=tuple((s.name, s.num_samples) for s in shards),
        image_size=image_size, source_size=src, batch_size=1, seed=0, rank=0, world_size=1, window=1,
        emb_mode="one", emb_k=1, on_corrupt="raise", captions=meta.captions_per_image,
        text_dim=meta.text_dim, sha256=tuple(s.sha256 for s in shards), cache_dir=str(cache_dir or ""),
        cache_gb=float(cache_gb),
    )
    total = sum(count for _, count in spec.shards)
    wanted = list(range(total)) if n >= total else [i * total // n for i in range(n)]  # spread over species
    reader, samples, first = _Reader(spec), [], 0
    try:
        with quiet_decoder():
            for shard, (_, count) in enumerate(spec.shards):
                mine = [g - first for g in wanted if first <= g < first + count]
                if mine:
                    with reader.pinned(shard) as fd:
                        where = reader.where(shard)
                        samples += [_decode(reader.read(shard, i, fd), spec, where) for i in mine]
                first += count
    finally:
        reader.close()
    o = (src - image_size) // 2
    img = np.stack([s.img[:, o:o + image_size, o:o + image_size] for s in samples])
    return {
        "img": to_unit_range(torch.from_numpy(img)),
        "emb": torch.from_numpy(np.stack([s.emb[0] for s in samples])),
        "cls": torch.tensor([s.cls for s in samples], dtype=torch.int64),
        "caption": [s.captions[0] for s in samples],
        "key": [s.name for s in samples],
    }
