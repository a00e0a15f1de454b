"""Metric registry, evaluation context, rank slicing and the shared generation loop.

A metric is a function ``fn(G, ctx) -> dict[str, float | int | str]`` registered under a
name. It takes the generator *module* (not an export path), so the trainer can call it at
snapshot time on its EMA generator, and ``stackgan.evaluate`` can call it on an export.

Every metric runs on all ranks: work is cut into global batches of ``ctx.batch_size``
items, rank r takes batches r, r + W, r + 2W, ..., and partial sums are added with
``torch.distributed.all_reduce`` when a process group is initialised. Noise and the CA-Net's
own randomness are seeded per global batch, so a result does not depend on the number of
ranks (up to float summation order); single-process runs need no process group.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stackgan.data.meta import ShardError, ShardMeta, load_metadata


class MetricError(RuntimeError):
    """Bad metric input (unknown name, mismatched shards, missing weights), raised early."""


MetricFn = Callable[[nn.Module, "EvalContext"], dict]


@dataclass
class _Entry:
    fn: MetricFn
    requires: tuple[str, ...]  # "attributes", "inception": checked before any work


_REGISTRY: dict[str, _Entry] = {}
# modules that register metrics
_BUILTIN = ("stackgan.metrics.scores", "stackgan.metrics.inception", "stackgan.metrics.stage2")


def _load_builtin() -> None:
    """Import the built-in metric modules on first use (keeps ``import stackgan.metrics``
    light, and ``python -m stackgan.metrics.judge`` free of double imports)."""
    import importlib

    for mod in _BUILTIN:
        importlib.import_module(mod)


def register(name: str, requires: tuple[str, ...] = ()) -> Callable[[MetricFn], MetricFn]:
    """Decorator: make ``fn(G, ctx) -> dict`` available as metric ``name``."""

    def deco(fn: MetricFn) -> MetricFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"metric {name!r} registered twice")
        _REGISTRY[name] = _Entry(fn, tuple(requires))
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
# Ranks
# --------------------------------------------------------------------------------------
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
    """Cached networks (judges, the detail net): when ``path`` does not exist yet, rank 0 calls
    ``make`` (which trains and writes it atomically) while the other ranks wait for it."""
    if not Path(path).is_file():
        if rank_world()[0] == 0:
            make()
        barrier()


# --------------------------------------------------------------------------------------
# Context
# --------------------------------------------------------------------------------------
@dataclass
class EvalContext:
    """What the metrics need besides the generator; build once, reuse at every snapshot.

    ``cache`` keeps generator-independent work (real-image statistics, loaded splits, the
    judge, the Inception net) across calls of :func:`compute`.
    """

    shards: str  # prepared shard folder (metadata.json)
    image_size: int  # generator output side: 64 (stage I) or 256 (stage II)
    z_dim: int
    text_encoder: str  # encoder the generator was trained with (must match the shards)
    text_dim: int
    device: str | torch.device = "cpu"
    seed: int = 0
    batch_size: int = 64
    judge: str = ""  # "parts", "species" or a judge file; "" = the shards' default (judge.choose_judge)
    inception: str = ""  # torchvision Inception-v3 state_dict (IS / FID); never downloaded
    fid_inception: str = ""  # FID-Inception weights (fid_inception); "" = the torch hub cache; no download
    detail_net: str = ""  # 256-px feature net (fd256); "" = <shards>/detail256.pt, trained there on first use
    num_samples: int = 30000  # generated images for IS / FID (the papers' test protocol)
    judge_samples: int = 1000  # generated images per split for the judge metrics
    judge_scope: str = "caption"  # score the groups the caption states, or all the "image"'s
    diversity_captions: int = 32
    diversity_z: int = 8
    is_splits: int = 10
    inception_size: int = 299  # input side of the Inception net
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
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def stored_size(self) -> int:
        """Stored real-image size whose centre crop matches the generator output."""
        return 76 if self.image_size == 64 else 304

    @property
    def judge_path(self) -> Path:
        """The file of the judge ``judge`` selects (see :func:`stackgan.metrics.judge.choose_judge`)."""
        from .judge import choose_judge

        return choose_judge(self.shards, self.judge, self.meta).path

    def check(self, requires: set[str]) -> None:
        """Refuse, before generating anything, what cannot give a meaningful number."""
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
        if "attributes" in requires and not meta.attributes:
            raise MetricError(
                f"{self.shards}: the shards carry no attributes (attr.npy); the attribute judge needs the "
                "embedded bird set or CUB prepared with its attribute labels"
            )
        if "attributes" in requires:
            from .judge import JudgeError, choose_judge

            try:
                choose_judge(self.shards, self.judge, meta)  # a kind these shards cannot have is refused here
            except JudgeError as e:
                raise MetricError(str(e)) from e
        if "stage2" in requires and self.image_size != 256:
            raise MetricError(f"stage-II metrics compare a stage-II generator's 256px images with its "
                              f"stage-I input; this generator makes {self.image_size}px images (stage I): "
                              "evaluate a stage-II export, or leave the stage-II metrics out")
        if "inception" in requires:
            if not self.inception:
                raise MetricError(
                    "IS / FID need Inception-v3 weights: pass --inception PATH (a torchvision inception_v3 "
                    "state_dict, e.g. inception_v3_google-0cc3c7bd.pth); nothing is downloaded"
                )
            if not Path(self.inception).is_file():
                raise MetricError(f"Inception-v3 weights not found: {self.inception}")
            if self.num_samples < self.is_splits:
                raise MetricError(f"num_samples ({self.num_samples}) must be >= is_splits ({self.is_splits})")
        if "fid_inception" in requires:
            from .fid_inception import weights_path

            weights_path(self.fid_inception)  # raises, naming the path or the hub cache
            if self.num_samples < 2:
                raise MetricError(f"FID needs num_samples >= 2, got {self.num_samples}")


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------
def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, np.uint64)[0] >> 2)


def noise(n: int, z_dim: int, *seed: int) -> torch.Tensor:
    """(n, z_dim) standard normal noise, a pure function of ``seed`` (CPU, then moved)."""
    g = torch.Generator().manual_seed(_seed(*seed))
    return torch.randn(n, z_dim, generator=g)


def run_generator(G: nn.Module, emb: torch.Tensor, z: torch.Tensor, seed: int) -> torch.Tensor:
    """G(emb, z) images with the CA-Net noise drawn from a global RNG seeded with ``seed``
    inside ``fork_rng`` (the caller's RNG state is left as it was)."""
    dev = emb.device
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        out = G(emb, z)
    img = out[0] if isinstance(out, (tuple, list)) else out
    return img.float()


def generate(
    G: nn.Module, ctx: EvalContext, emb: np.ndarray | torch.Tensor, tag: int, batch_size: int = 0
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """This rank's share of G's images for ``emb`` (N, D): yields ``(lo, hi, images)`` per
    global batch, images on ``ctx.device`` in [-1, 1]. Noise for item i is row i of a table
    seeded by (ctx.seed, tag); the CA noise by (ctx.seed, tag, lo). ``batch_size`` overrides
    ``ctx.batch_size`` (the batch cut is global, so it must be the same on every rank)."""
    n = len(emb)
    z_all = noise(n, ctx.z_dim, ctx.seed, tag)
    dev = ctx.torch_device
    for lo, hi in my_batches(n, batch_size or ctx.batch_size):
        e = torch.as_tensor(np.asarray(emb[lo:hi]) if not torch.is_tensor(emb) else emb[lo:hi])
        img = run_generator(G, e.to(dev, torch.float32), z_all[lo:hi].to(dev), _seed(ctx.seed, tag, lo, 1))
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


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downsample (or bilinear-upsample) square images to ``size``."""
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


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
    ctx.cache["call"] = {"metrics": tuple(todo)}  # per-call cache (depends on G); what this call runs
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
        ctx.cache.pop("call", None)
    if jsonl is not None and rank_world()[0] == 0:
        now = time.time()
        append_jsonl(jsonl, [{"metric": n, "step": step, "time": now, **r, **(extra or {})}
                             for n, r in results.items()])
    return results
