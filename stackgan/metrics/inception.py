"""Inception Score and FID with Inception-v3 weights from a file the user gives.

The network is torchvision's ``inception_v3`` architecture built empty
(``weights=None, init_weights=False``) and filled with ``load_state_dict`` from the
given path; nothing is ever downloaded. torchvision's ImageNet weights
(``inception_v3_google-0cc3c7bd.pth``) fit, and so does any state_dict with the same
parameter names (the number of classes and the auxiliary head are read from the file).

Images in [-1, 1] (the generator's range, which is also the input scaling of Google's
Inception weights, so ``transform_input`` stays off) are resized bilinearly to 299.
IS uses the softmax of the logits, FID the 2048-d pool features.

These are **monitoring figures**: a PyTorch port of Inception with PyTorch resizing does
not reproduce the TensorFlow Inception graph the StackGAN papers scored with, so the
numbers are not directly comparable with published IS / FID values.

For FID figures comparable with the literature, ``fid_inception`` computes FID with the
FID Inception (:mod:`.fid_inception`, the network ``pytorch-fid`` and the papers use) under
the same protocol; when a compute call asks for several of these metrics, one generation
pass feeds every network.

Protocol defaults (the papers'): ``num_samples`` = 30000 generated images over the
test split's captions (every test image with its caption 0, then caption 1, ...), IS
over 10 splits, FID against all real test images.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .core import (EvalContext, MetricError, full_precision, generate, rank_world, register, requirement,
                   resize)
from .evalset import iter_images, to_tensor
from .fid_inception import load_fid_inception
from .netcache import read_state_dict
from .scores import split_data
from .stats import GaussianSums, ISSums, frechet_distance, frechet_distance_of_samples

NOTE = ("monitoring figure (torchvision Inception-v3 in PyTorch); not directly comparable with the "
        "papers' TensorFlow Inception IS/FID (for FID use fid_inception)")
FID_NOTE = ("FID Inception (pytorch-fid's port of the TF 2015-12-05 graph), the papers' protocol; comparable "
            "with published CUB FIDs up to PyTorch/TF numerics and the real-image set")
TAG = 14

_TRUNK = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool",
)


class InceptionError(MetricError):
    """Inception weights that are missing, unreadable or of another architecture."""


class InceptionV3(nn.Module):
    """Inception-v3 returning (pool features (B, 2048), logits (B, classes))."""

    def __init__(self, net: nn.Module, size: int = 299):
        super().__init__()
        if size < 75:
            raise ValueError(f"Inception-v3 needs inputs of at least 75 px, got {size}")
        self.net = net.eval()
        self.size = size

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.net.parameters()).device
        with full_precision(device):
            x = resize(images.to(device, torch.float32), self.size)
            for name in _TRUNK:
                x = getattr(self.net, name)(x)
            pool = torch.flatten(x, 1)
            return pool, self.net.fc(pool)


def load_inception(path: str | Path, device: str | torch.device = "cpu", size: int = 299) -> InceptionV3:
    """Build torchvision's Inception-v3 empty and load the state_dict at ``path`` into it."""
    from torchvision.models import inception_v3

    path = Path(path)
    if not path.is_file():
        raise InceptionError(
            f"Inception-v3 weights not found: {path} (give a torchvision inception_v3 state_dict, e.g. "
            "inception_v3_google-0cc3c7bd.pth; nothing is downloaded)"
        )
    sd = read_state_dict(path, InceptionError, "Inception")
    fc = sd.get("fc.weight")
    if fc is None or fc.ndim != 2 or fc.shape[1] != 2048:
        raise InceptionError(f"{path}: no fc.weight of shape (classes, 2048): not an Inception-v3 state_dict")
    aux = any(k.startswith("AuxLogits.") for k in sd)
    net = inception_v3(weights=None, aux_logits=aux, init_weights=False, num_classes=fc.shape[0],
                       transform_input=False)
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise InceptionError(f"{path}: weights do not fit torchvision's inception_v3: {str(e)[:600]}") from e
    if missing or unexpected:
        raise InceptionError(
            f"{path}: weights do not fit torchvision's inception_v3: {len(missing)} missing "
            f"(e.g. {missing[:4]}), {len(unexpected)} unexpected (e.g. {unexpected[:4]})"
        )
    return InceptionV3(net, size).to(device).eval()


@torch.no_grad()
def features(net: InceptionV3, images: torch.Tensor,
             batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool features, logits) of a set of images in [-1, 1], batched, on the CPU."""
    pools, logits = [], []
    for i in range(0, len(images), batch_size):
        p, lg = net(images[i : i + batch_size])
        pools.append(p.cpu())
        logits.append(lg.cpu())
    return torch.cat(pools), torch.cat(logits)


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets held in memory (single process)."""
    return frechet_distance_of_samples(a.numpy(), b.numpy())


# --------------------------------------------------------------------------------------
# Registered metrics: one generation pass per compute call feeds every Inception they need
# --------------------------------------------------------------------------------------
NET_OF = {"inception_score": "torchvision", "fid": "torchvision", "fid_inception": "fid_inception"}


def _net(ctx: EvalContext, kind: str):
    """The feature net ``kind`` (cached): images -> (pool features, logits or None)."""
    key = ("inception", kind, ctx.inception if kind == "torchvision" else ctx.fid_inception,
           ctx.inception_size, str(ctx.device))
    if key not in ctx.cache:
        if kind == "torchvision":
            ctx.cache[key] = load_inception(ctx.inception, ctx.device, ctx.inception_size)
        else:
            fid_net = load_fid_inception(ctx.fid_inception, ctx.device, ctx.inception_size)
            ctx.cache[key] = lambda images: (fid_net(images), None)
    return ctx.cache[key]


def _real(ctx: EvalContext, kind: str) -> GaussianSums:
    """Pool-feature statistics of all real test images (centre crops at the generator's
    size), this rank's share summed over ranks; cached on the context."""
    key = ("inception_real", kind, ctx.inception if kind == "torchvision" else ctx.fid_inception,
           ctx.inception_size, ctx.image_size)
    if key not in ctx.cache:
        net = _net(ctx, kind)
        rank, world = rank_world()
        sums = GaussianSums(2048)
        buf: list[np.ndarray] = []
        for img in iter_images(ctx.meta, "test", ctx.stored_size, rank=rank, world=world):
            buf.append(img)
            if len(buf) == ctx.batch_size:
                sums.add(net(to_tensor(np.stack(buf)))[0])
                buf = []
        if buf:
            sums.add(net(to_tensor(np.stack(buf)))[0])
        ctx.cache[key] = sums.reduce()
    return ctx.cache[key]


@dataclass(frozen=True)
class InceptionImages:
    """Shared-pass key: G's ``ctx.num_samples`` images over the test captions (tag :data:`TAG`)
    seen by the Inception nets ``kinds`` (:func:`inception_pass`)."""

    kinds: tuple[str, ...]


def inception_pass(G, ctx: EvalContext, need: str) -> dict:
    """Generated images' statistics for feature net ``need`` and every other Inception the
    current compute call asks for, from one pass of ``ctx.num_samples`` images over the test
    captions (every test image with its caption 0, then caption 1, ...; this rank's share)."""
    asked = {NET_OF[m] for m in NET_OF if ctx.passes is not None and ctx.passes.asks(m)}
    kinds = tuple(sorted({need} | asked))

    def make() -> dict:
        nets = {k: _net(ctx, k) for k in kinds}
        data = split_data(ctx, "test")
        s, c, n = len(data), data.emb.shape[1], ctx.num_samples
        perm = np.random.default_rng([ctx.seed, TAG]).permutation(s)
        i = np.arange(n)
        rows, caps = perm[i % s], (i // s) % c
        emb, texts = data.emb[rows, caps], data.texts(rows, caps)
        feats = {k: GaussianSums(2048) for k in kinds}
        tv = nets.get("torchvision")
        is_sums = ISSums(ctx.is_splits, tv.net.fc.out_features) if tv is not None else None
        for lo, hi, img in generate(G, ctx, emb, TAG, what="Inception samples", captions=texts):
            for k, net in nets.items():
                pool, logits = net(img)
                feats[k].add(pool)
                if k == "torchvision":
                    is_sums.add(logits, torch.arange(lo, hi) * ctx.is_splits // n)
        return {"feats": {k: f.reduce() for k, f in feats.items()}, "real": {k: _real(ctx, k) for k in kinds},
                "is": is_sums.reduce() if is_sums else None, "n": n}

    return ctx.shared(InceptionImages(kinds), make)


@requirement("inception")
def check_inception(ctx: EvalContext) -> None:
    """IS / FID with torchvision's Inception need its weights, given by path, and enough samples."""
    if not ctx.inception:
        raise MetricError(
            "IS / FID need Inception-v3 weights: pass --inception PATH (a torchvision inception_v3 "
            "state_dict, e.g. inception_v3_google-0cc3c7bd.pth); nothing is downloaded")
    if not Path(ctx.inception).is_file():
        raise MetricError(f"Inception-v3 weights not found: {ctx.inception}")
    if ctx.num_samples < ctx.is_splits:
        raise MetricError(f"num_samples ({ctx.num_samples}) must be >= is_splits ({ctx.is_splits})")


@register("inception_score", requires=("inception",))
def inception_score_metric(G, ctx: EvalContext) -> dict:
    p = inception_pass(G, ctx, "torchvision")
    mean, std = p["is"].score()
    return {"mean": mean, "std": std, "splits": ctx.is_splits, "n": p["n"], "note": NOTE}


def _fid(p: dict, kind: str) -> float:
    return frechet_distance(*p["feats"][kind].mean_cov(), *p["real"][kind].mean_cov())


@register("fid", requires=("inception",))
def fid_metric(G, ctx: EvalContext) -> dict:
    p = inception_pass(G, ctx, "torchvision")
    return {"fid": _fid(p, "torchvision"), "n_gen": p["n"], "n_real": int(p["real"]["torchvision"].n),
            "note": NOTE}


@register("fid_inception", requires=("fid_inception",))
def fid_inception_metric(G, ctx: EvalContext) -> dict:
    """FID with the FID Inception (:mod:`.fid_inception`): the literature's network and
    protocol (``ctx.num_samples`` = 30000 generated images over the test captions against
    all real test images)."""
    p = inception_pass(G, ctx, "fid_inception")
    return {"fid": _fid(p, "fid_inception"), "n_gen": p["n"], "n_real": int(p["real"]["fid_inception"].n),
            "note": FID_NOTE}
