"""Sample-diversity score: a cheap, model-free warning sign of mode collapse.

For every caption, ``k`` images are drawn with different noise (and different CA
samples); the score is the mean pairwise per-pixel L1 distance between images of the
same caption, divided by 2/3 -- the expected |x - y| of two independent uniform values in
[-1, 1] (the generator's tanh range). So identical samples score 0, and two independent
uniform-noise images score about 1; natural images of different birds score well below 1
(their pixels are correlated and not uniform). A collapsed generator drifts towards 0.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["UNIFORM_L1", "diversity_score", "pairwise_l1"]

UNIFORM_L1 = 2.0 / 3.0  # E|x - y| for x, y ~ U(-1, 1) independent


def pairwise_l1(imgs: Tensor) -> Tensor:
    """(n, k, ...) -> (n,) mean per-element L1 distance over the k*(k-1)/2 pairs of each row."""
    n, k = imgs.shape[:2]
    if k < 2:
        raise ValueError(f"pairwise_l1: need at least 2 samples per group, got {k}")
    flat = imgs.reshape(n, k, -1).float()
    d = torch.cdist(flat, flat, p=1.0) / flat.shape[-1]  # (n, k, k), zero diagonal
    return d.sum(dim=(1, 2)) / (k * (k - 1))


def _autocast_like(G: nn.Module, device: torch.device):
    """Autocast in G's own half dtype (inputs are fp32), or nothing for an fp32 G."""
    dtype = next(G.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def diversity_score(G: nn.Module, emb: Tensor, z_per_caption: int, generator: torch.Generator,
                    words=None) -> float:
    """Normalised mean pairwise L1 between ``z_per_caption`` samples of each caption.

    ``emb`` is (n, text_dim). Noise comes from ``generator``; the CA-Net's own noise is
    drawn from a global RNG seeded from ``generator`` inside ``torch.random.fork_rng``, so
    the call is reproducible and leaves the caller's global RNG state untouched. G runs in
    eval mode (BatchNorm running statistics, no updates) and its mode is restored. A generator
    held in half precision (DeepSpeed fp16 without EMA) runs under autocast of its dtype, as
    in training; noise is drawn on the host and moved once, so a CUDA G costs one copy in and
    one number out. ``words`` (:class:`stackgan.words.Words` of the captions): for a generator
    with ``model.word_attn``.
    """
    if z_per_caption < 2:
        raise ValueError(f"diversity_score: z_per_caption must be >= 2, got {z_per_caption}")
    if emb.dim() != 2 or emb.shape[0] == 0:
        raise ValueError(f"diversity_score: emb must be (n, text_dim) with n >= 1, got {tuple(emb.shape)}")
    z_dim = getattr(G, "z_dim", None) or getattr(getattr(G, "module", None), "z_dim", None)
    if z_dim is None:
        raise ValueError("diversity_score: G has no z_dim attribute")
    n, k = emb.shape[0], z_per_caption
    dev = emb.device
    z = torch.randn(n * k, z_dim, generator=generator, device=generator.device).to(dev)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    was_training = G.training
    G.eval()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            ctx = torch.cuda.device(cuda[0]) if cuda else contextlib.nullcontext()
            with ctx:
                if cuda:
                    torch.cuda.manual_seed(seed)
                with _autocast_like(G, dev):
                    more = {} if words is None else {"words": words.repeat_interleave(k)}
                    fake = G(emb.repeat_interleave(k, dim=0), z, **more)[0]
    finally:
        G.train(was_training)
    return float(pairwise_l1(fake.reshape(n, k, *fake.shape[1:])).mean() / UNIFORM_L1)
