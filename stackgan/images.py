"""Image conventions in one place: the stored sizes, the value range and layout, resizing.

* Stored sizes: shards hold each bbox crop at 76 and 304 px, the sizes StackGAN random-crops
  64 (stage I) and 256 (stage II) from (:data:`STORED`).
* Layout and range: networks see ``(N, 3, H, W)`` float tensors in ``[-1, 1]`` (the generator's
  tanh range); files and decoded JPEGs are ``(N, H, W, 3)`` uint8 arrays. :func:`to_unit` and
  :func:`from_hwc_uint8` go in, :func:`to_uint8` comes out (rounded the way PNG writers expect).
* Resizing: :func:`upsample` (bicubic by default, overshoot clamped back into range) and
  :func:`resize` (area down, bilinear up), both on ``[-1, 1]`` tensors.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

STORED = {64: 76, 256: 304}  # training size -> stored size: StackGAN random-crops 64 of 76, 256 of 304
CROP_OF = {stored: size for size, stored in STORED.items()}  # stored size -> training size
STORED_SIZES = tuple(STORED.values())  # what prepare writes: (76, 304)


def stored_size(image_size: int) -> int:
    """The stored size a training size is cropped from (64 -> 76, 256 -> 304)."""
    if image_size not in STORED:
        raise ValueError(f"image size {image_size}: no stored size (known: {sorted(STORED)})")
    return STORED[image_size]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) -> float32 in [-1, 1], any layout."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float().div(127.5).sub(1.0)


def from_hwc_uint8(images: np.ndarray) -> torch.Tensor:
    """(N,H,W,3) uint8 array -> (N,3,H,W) float tensor in [-1, 1]."""
    return to_unit(torch.from_numpy(images).permute(0, 3, 1, 2))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N,3,H,W) float in [-1,1] -> (N,H,W,3) uint8, rounding the way PNG writers expect.

    Quantised where the images are (a GPU's grid crosses to the host as one byte per pixel,
    not four)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N,3,H,W), got {tuple(images.shape)}")
    x = images.detach().float().clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def upsample(images: torch.Tensor, size: int = 256, mode: str = "bicubic") -> torch.Tensor:
    """Upsample square images in [-1, 1] to ``size`` (bicubic overshoot clamped back to range)."""
    out = F.interpolate(images, size=(size, size), mode=mode, align_corners=False)
    return out.clamp(-1.0, 1.0)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downsample (or bilinear-upsample) square images to ``size``."""
    if images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return F.interpolate(images, size=(size, size), mode="area")
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
