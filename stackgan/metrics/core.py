"""Metric registry, evaluation context, rank slicing and the shared generation loop.

A metric is a function ``fn(G, ctx) -> dict[str, float | int | str]`` registered under a
name. It takes the generator *module* (not an export path), so the trainer can call it at
snapshot time on its EMA generator, and ``stackgan.evaluate`` can call it on an export.

Every metric runs on all ranks: work is cut into global batches of ``ctx.batch_size``
items, rank r takes batches r, r + W, r + 2W, ..., and partial sums are added with
``torch.distributed.all_reduce`` when a process group is initialised. Noise and the CA-Net's
own randomness are seeded per global batch, so a result does not depend on the number of
ranks (up to float summation order); single-process runs need no process group.

This module is the ground floor of :mod:`stackgan.metrics`: it imports no other metrics
module. A metric module registers its metrics (:func:`register`) and the checks of what they
require (:func:`requirement`, e.g. ``"attributes"`` in :mod:`.judges.choice`); metrics that
measure the same generated images share one pass per call through :class:`GenerationPasses`
(:meth:`EvalContext.shared`).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterator, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stackgan.data.meta import ShardError, ShardMeta, load_metadata
from stackgan.errors import StackGANError
from stackgan.images import resize, stored_size  # noqa: F401 -- resize: the metrics import it from here
from stackgan.words import reads_words, word_vectors


class MetricError(StackGANError, RuntimeError):
    """Bad metric input (unknown name, mismatched shards, missing weights), raised early."""


MetricFn = Callable[[nn.Module, "EvalContext"], dict]


@dataclass
class _Entry:
    fn: MetricFn
    requires: tuple[str, ...]  # requirement names ("attributes", "inception"): checked before any work


_REGISTRY: dict[str, _Entry] = {}
RequirementCheck = Callable[["EvalContext"], None]
_CHECKS: dict[str, RequirementCheck] = {}  # requirement name -> check, registered by the module that owns it
# the modules that register the built-in metrics, imported on first use of the registry (a plugin list:
# this module does not depend on them, and ``python -m stackgan.metrics.detail`` is not imported twice)
_BUILTIN = ("stackgan.metrics.scores", "stackgan.metrics.inception", "stackgan.metrics.stage2",
            "stackgan.metrics.tf_inception")


def _load_builtin() -> None:
    for mod in _BUILTIN:
        importlib.import_module(mod)


def register(name: str, requires: tuple[str, ...] = ()) -> Callable[[MetricFn], MetricFn]:
    """Decorator: make ``fn(G, ctx) -> dict`` available as metric ``name``; ``requires`` names
    checks registered with :func:`requirement` that must pass before any work."""

    def deco(fn: MetricFn) -> MetricFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"metric {name!r} registered twice")
        _REGISTRY[name] = _Entry(fn, tuple(requires))
        return fn

    return deco


def requirement(name: str) -> Callable[[RequirementCheck], RequirementCheck]:
    """Decorator: ``check(ctx)`` raises :class:`MetricError` when the context cannot serve the
    metrics that require ``name`` (weights missing, shards without labels, ...). The module
    that owns what is required registers it, so this module knows no metric's needs."""

    def deco(fn: RequirementCheck) -> RequirementCheck:
        if name in _CHECKS and _CHECKS[name] is not fn:
            raise ValueError(f"requirement {name!r} registered twice")
        _CHECKS[name] = fn
        return fn

    return deco


def get(name: str) -> MetricFn:
    _load_builtin()
    if name not in _REGISTRY:
        raise MetricError(f"unknown metric {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].fn


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------
# Ranks and devices
# --------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    """``"auto"``: CUDA when this machine has a GPU, else the CPU; any other name as given,
    refused (ValueError naming it) when it is not a device or names CUDA on a machine without."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine "
                         "(use --device auto or cpu)")
    return device


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def my_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """This rank's global batches ``[lo, hi)`` of ``n`` items (round-robin by batch index)."""
    rank, world = rank_world()
    starts = range(0, n, batch_size)
    return [(s, min(s + batch_size, n)) for k, s in enumerate(starts) if k % world == rank]


def all_sum(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum float64 tensors over ranks (identity in a single process). Returns CPU tensors."""
    out = {k: v.detach().to(torch.float64) for k, v in parts.items()}
    rank, world = rank_world()
    if world == 1:
        return {k: v.cpu() for k, v in out.items()}
    nccl = torch.distributed.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    for k in sorted(out):  # same order on every rank
        t = out[k].to(dev)
        torch.distributed.all_reduce(t)
        out[k] = t.cpu()
    return out


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()


# --------------------------------------------------------------------------------------
# Shared generation passes
# --------------------------------------------------------------------------------------
T = TypeVar("T")


class GenerationPasses:
    """What the metrics of one :func:`compute` call measured on G's images, keyed by what was
    generated and measured (a frozen dataclass of the module that makes the pass, e.g.
    ``scores.JudgeImages("test")``). A metric asks for a pass with :meth:`EvalContext.shared`;
    the first to ask makes it, later ones reuse it. A pass may measure more at once for other
    metrics of the same call (:meth:`asks`), but what a key's figures are never depends on who
    shares the call: the same items, noise and accumulators give the same numbers alone.
    Lives for one call, because G changes between calls."""

    def __init__(self, metrics: tuple[str, ...] = ()):
        self.metrics = frozenset(metrics)
        self._done: dict[Hashable, object] = {}

    def asks(self, *names: str) -> bool:
        """Whether this call runs any of the metrics ``names``."""
        return bool(self.metrics & set(names))

    def find(self, key: Hashable):
        """The pass made for ``key``, or None."""
        return self._done.get(key)

    def keep(self, key: Hashable, value: T) -> T:
        """Keep ``value`` as the pass for ``key`` (replacing a narrower one); returns it."""
        self._done[key] = value
        return value


# --------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------
@dataclass
class EvalContext:
    """What the metrics need besides the generator; build once, reuse at every snapshot.

    ``cache`` keeps generator-independent work (real-image statistics, loaded splits, the
    judge, the Inception net) across calls of :func:`compute`, and during a call that call's
    shared generation passes (:attr:`passes`, a :class:`GenerationPasses`).
    """

    shards: str  # prepared shard folder (metadata.json)
    image_size: int  # generator output side: 64 (stage I) or 256 (stage II)
    z_dim: int
    text_encoder: str  # encoder the generator was trained with (must match the shards)
    text_dim: int
    device: str | torch.device = "cpu"
    seed: int = 0
    batch_size: int = 64
    judge: str = ""  # "parts", "species" or a judge file; "" = the shards' default (judges.choose_judge)
    inception: str = ""  # torchvision Inception-v3 state_dict (IS / FID); never downloaded
    fid_inception: str = ""  # FID-Inception weights (fid_inception); "" = the torch hub cache; no download
    paper_inception: str = ""  # converted StackGAN CUB Inception (inception_score_paper), tf_inception
    detail_net: str = ""  # 256-px feature net (fd256); "" = detail256.pt in the shard or cache folder
    cache_dir: str = ""  # measuring nets of read-only shard sets ("" = $XDG_CACHE_HOME/stackgan), netcache
    num_samples: int = 30000  # generated images for IS / FID (the papers' test protocol)
    judge_samples: int = 1000  # generated images per split for the judge metrics
    judge_scope: str = "caption"  # score the groups the caption states, or all the "image"'s
    diversity_captions: int = 32
    diversity_z: int = 8
    is_splits: int = 10
    inception_size: int = 299  # input side of the Inception net
    progress: bool = False  # progress bars for generation passes (rank 0, on a terminal)
    log: Callable[[str], None] = print
    cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_export(cls, info, shards: str, **kwargs) -> "EvalContext":
        """Context for an :class:`stackgan.export.ExportInfo` (or anything with its fields)."""
        return cls(shards=str(shards), image_size=info.image_size, z_dim=info.z_dim,
                   text_encoder=info.text_encoder, text_dim=info.text_dim, **kwargs)

    @property
    def meta(self) -> ShardMeta:
        if "meta" not in self.cache:
            try:
                self.cache["meta"] = load_metadata(self.shards)
            except ShardError as e:
                raise MetricError(str(e)) from e
        return self.cache["meta"]

    @property
    def passes(self) -> GenerationPasses | None:
        """The running :func:`compute` call's shared passes (None outside a call)."""
        return self.cache.get(GenerationPasses)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def stored_size(self) -> int:
        """Stored real-image size whose centre crop matches the generator output."""
        return stored_size(self.image_size)

    def shared(self, key: Hashable, make: Callable[[], T]) -> T:
        """The current call's pass for ``key`` (:class:`GenerationPasses`), made by ``make``
        when no metric of the call has asked for it yet (outside a call: always made)."""
        if self.passes is None:
            return make()
        found = self.passes.find(key)
        return found if found is not None else self.passes.keep(key, make())

    def check(self, requires: set[str]) -> None:
        """Refuse, before generating anything, what cannot give a meaningful number: the
        checks every metric needs, then those registered for ``requires`` (:func:`requirement`)."""
        meta = self.meta
        if meta.encoder != self.text_encoder or meta.text_dim != self.text_dim:
            raise MetricError(
                f"the generator was trained on {self.text_encoder!r} embeddings ({self.text_dim}-d) but the "
                f"shards at {self.shards} hold {meta.encoder!r} ({meta.text_dim}-d); evaluate with the shard "
                "set it was trained on (or prepare shards with --reembed for that encoder)"
            )
        if self.image_size not in (64, 256):
            raise MetricError(f"image_size must be 64 or 256, got {self.image_size}")
        if self.stored_size not in meta.image_sizes:
            raise MetricError(
                f"{self.shards}: no {self.stored_size}px images for a {self.image_size}px generator")
        if "test" not in meta.splits:
            raise MetricError(f"{self.shards}: metrics need a 'test' split (has {sorted(meta.splits)})")
        for k, v in {"batch_size": self.batch_size, "num_samples": self.num_samples,
                     "judge_samples": self.judge_samples, "is_splits": self.is_splits,
                     "diversity_captions": self.diversity_captions}.items():
            if v <= 0:
                raise MetricError(f"{k} must be > 0, got {v}")
        if self.judge_scope not in ("caption", "image"):
            raise MetricError(f"judge_scope must be 'caption' or 'image', got {self.judge_scope!r}")
        if self.diversity_z < 2:
            raise MetricError(f"diversity_z must be >= 2, got {self.diversity_z}")
        for name in sorted(requires):
            if name not in _CHECKS:
                raise MetricError(f"no check registered for requirement {name!r} (known: {sorted(_CHECKS)})")
            _CHECKS[name](self)


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------
def seed_of(*parts: int) -> int:
    """A 62-bit seed that is a pure function of ``parts`` (noise tables, CA-Net noise)."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, np.uint64)[0] >> 2)


def noise(n: int, z_dim: int, *seed: int) -> torch.Tensor:
    """(n, z_dim) standard normal noise, a pure function of ``seed`` (CPU, then moved)."""
    g = torch.Generator().manual_seed(seed_of(*seed))
    return torch.randn(n, z_dim, generator=g)


def run_generator(G: nn.Module, emb: torch.Tensor, z: torch.Tensor, seed: int,
                  captions: list[str] | None = None) -> torch.Tensor:
    """G(emb, z) images with the CA-Net noise drawn from a global RNG seeded with ``seed``
    inside ``fork_rng`` (the caller's RNG state is left as it was). ``captions``: the texts of
    ``emb``'s rows, for a generator that reads their words (:func:`stackgan.words.reads_words`)."""
    dev = emb.device
    more = {}
    if reads_words(G):
        if captions is None:
            raise MetricError("this generator reads its captions' words (model.word_attn): pass the "
                              "caption texts of emb (captions=...)")
        more["words"] = word_vectors(captions, dev)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        out = G(emb, z, **more)
    img = out[0] if isinstance(out, (tuple, list)) else out
    return img.float()


def progress(batches: list[tuple[int, int]], ctx: EvalContext, what: str) -> Iterator[tuple[int, int]]:
    """``batches`` with a progress bar (images made) when ``ctx.progress`` is set, on rank 0, when
    stderr is a terminal (tqdm's rule: never into a log file)."""
    if not ctx.progress or rank_world()[0] != 0 or not batches:
        yield from batches
        return
    world = rank_world()[1]
    with tqdm(total=sum(hi - lo for lo, hi in batches) * world, desc=what, unit="img", file=sys.stderr,
              disable=None, leave=False, dynamic_ncols=True) as bar:
        for lo, hi in batches:
            yield lo, hi
            bar.update((hi - lo) * world)


def generate(
    G: nn.Module, ctx: EvalContext, emb: np.ndarray | torch.Tensor, tag: int, batch_size: int = 0,
    what: str = "generating", captions: list[str] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """This rank's share of G's images for ``emb`` (N, D): yields ``(lo, hi, images)`` per
    global batch, images on ``ctx.device`` in [-1, 1]. Noise for item i is row i of a table
    seeded by (ctx.seed, tag); the CA noise by (ctx.seed, tag, lo). ``batch_size`` overrides
    ``ctx.batch_size`` (the batch cut is global, so it must be the same on every rank);
    ``what`` labels the progress bar (:func:`progress`); ``captions``: ``emb``'s texts, for a
    generator that reads their words."""
    n = len(emb)
    z_all = noise(n, ctx.z_dim, ctx.seed, tag)
    dev = ctx.torch_device
    for lo, hi in progress(my_batches(n, batch_size or ctx.batch_size), ctx, what):
        e = torch.as_tensor(np.asarray(emb[lo:hi]) if not torch.is_tensor(emb) else emb[lo:hi])
        img = run_generator(G, e.to(dev, torch.float32), z_all[lo:hi].to(dev), seed_of(ctx.seed, tag, lo, 1),
                            None if captions is None else list(captions[lo:hi]))
        if img.shape[1:] != (3, ctx.image_size, ctx.image_size):
            raise MetricError(
                f"generator made images of shape {tuple(img.shape[1:])}, expected (3, {ctx.image_size}, "
                f"{ctx.image_size}) (is the context's image_size right for this stage?)"
            )
        yield lo, hi, img


def full_precision(device: str | torch.device):
    """Autocast off on ``device``: a measuring network (a judge, an Inception) gives the same
    numbers whatever precision its caller runs under (a bf16 run's snapshot metrics)."""
    return torch.autocast(torch.device(device).type, enabled=False)



# --------------------------------------------------------------------------------------
# Running metrics
# --------------------------------------------------------------------------------------
def _names(metrics: str | list[str] | tuple[str, ...]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m for m in (s.strip() for s in metrics.split(",")) if m]
    if not metrics:
        raise MetricError("no metrics asked for")
    return list(metrics)


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append records, one JSON line each, in a single write (readers never see half lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _clean(v):
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def check(metrics: str | list[str] | tuple[str, ...], ctx: EvalContext) -> list[str]:
    """Refuse (:class:`MetricError`) what :func:`compute` would refuse, without generating
    anything: a trainer checks its snapshot metrics before step 0. Returns the metric names."""
    _load_builtin()
    todo = _names(metrics)
    unknown = [n for n in todo if n not in _REGISTRY]
    if unknown:
        raise MetricError(f"unknown metric(s) {unknown}; known: {', '.join(sorted(_REGISTRY))}")
    ctx.check({r for n in todo for r in _REGISTRY[n].requires})
    return todo


def compute(
    metrics: str | list[str] | tuple[str, ...],
    G: nn.Module,
    ctx: EvalContext,
    *,
    step: int | None = None,
    jsonl: str | Path | None = None,
    extra: dict | None = None,
) -> dict[str, dict]:
    """Run the named metrics on generator module ``G`` (on every rank) and return
    ``{name: {key: value}}``. Rank 0 appends one JSON line per metric to ``jsonl``
    (``{"metric", "step", "time", **values, **extra}``). G is put in eval mode for the
    call and its mode restored; no gradients are recorded."""
    todo = check(metrics, ctx)
    entries = [(_n, _REGISTRY[_n]) for _n in todo]
    ctx.cache[GenerationPasses] = GenerationPasses(tuple(todo))  # this call's shared passes (depend on G)
    was_training = G.training
    G.eval()
    results: dict[str, dict] = {}
    try:
        with torch.no_grad():
            for name, entry in entries:
                t0 = time.perf_counter()
                res = entry.fn(G, ctx)
                res = {k: _clean(v) for k, v in res.items()}
                res["seconds"] = round(time.perf_counter() - t0, 3)
                results[name] = res
    finally:
        G.train(was_training)
        ctx.cache.pop(GenerationPasses, None)
    if jsonl is not None and rank_world()[0] == 0:
        now = time.time()
        append_jsonl(jsonl, [{"metric": n, "step": step, "time": now, **r, **(extra or {})}
                             for n, r in results.items()])
    return results
