"""Differentiable augmentation of D's inputs (DiffAugment, Zhao et al. 2020), translation only.

Why: D tells real from fake long before G draws clean parts (stage I of the quality recipe:
D(fake) 0.06 vs D(real) 0.95 after an hour), and a D that wins so early gives G little to
learn from. Shifting *every* image D sees (real, wrong and fake, in D's and G's step) by a
few pixels makes D's job harder without teaching G to shift its birds: the gradient flows
through the shift. Only translation: colour or cutout augmentations would change what a
caption says about the image ("a red crown"), which the matching-aware loss must keep.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def translate(x: Tensor, shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image of ``x`` (B, C, H, W) by its own random (dy, dx) in [-shift, shift],
    filling the border by replicating the edge pixels (the backgrounds are smooth)."""
    if shift <= 0:
        return x
    if x.dim() != 4:
        raise ValueError(f"translate: expected (B, C, H, W) images, got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    off = torch.randint(0, 2 * shift + 1, (2, b, 1), device=x.device, generator=generator)
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    rows = torch.arange(h, device=x.device) + off[0]  # (B, H)
    cols = torch.arange(w, device=x.device) + off[1]  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)
