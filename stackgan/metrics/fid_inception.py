"""The FID Inception: the Inception-v3 that literature FID values are computed with.

Why: FID figures in papers (StackGAN++, AttnGAN, DM-GAN, ...) come from the TensorFlow
Inception graph of 2015-12-05 (``pool_3``, 2048-d). The ``pytorch-fid`` package ships that
graph's weights converted to PyTorch (``pt_inception-2015-12-05-6726825d.pth``) together
with an Inception-v3 that reproduces the TF graph's two quirks, which torchvision's
Inception-v3 does not:

* the average pools inside the Inception blocks do not count the zero padding
  (``count_include_pad=False``) in the 35x35, 17x17 and first 8x8 blocks;
* the last block (``Mixed_7c``) pools its pool branch with a 3x3 *max* pool.

This module builds that architecture (parameter names as in torchvision's Inception-v3, which
is how the converted weights are keyed) and fills it from a file; it never downloads.
Weights come from a path the user gives, or from the torch hub cache where ``pytorch-fid``
puts them (``<torch hub dir>/checkpoints/pt_inception-2015-12-05-6726825d.pth``).

Input: images in [-1, 1] (the generator's range; ``pytorch-fid`` maps [0, 1] to it),
resized bilinearly (``align_corners=False``, no antialiasing, as ``pytorch-fid`` does) to
299. Output: the 2048-d average-pooled features FID is computed from.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .core import EvalContext, MetricError, full_precision, requirement
from .netcache import read_state_dict

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
_UNUSED = ("fc.", "AuxLogits.")  # classifier heads in some weight files: FID does not use them


class FIDInceptionError(MetricError):
    """FID-Inception weights that are missing, unreadable or of another architecture."""


class Conv(nn.Module):
    """Convolution (no bias) + batch norm (eps 0.001, TF's) + ReLU: Inception's unit."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TF's average pool: padding is not counted in the mean."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 1, 1)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)
        self.pool = _avg_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(self.pool(x)),
        ], 1)


class ReductionB(nn.Module):
    """35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, 2),
        ], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``c7`` inner channels)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)
        self.pool = _avg_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for k in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{k}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(self.pool(x)),
        ], 1)


class ReductionD(nn.Module):
    """17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs; ``pool`` is the pool branch's pooling."""

    def __init__(self, cin: int, pool):
        super().__init__()
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(self.pool(x)),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Images in [-1, 1] (B, 3, H, W) -> pool_3 features (B, 2048)."""

    def __init__(self, size: int = 299):
        super().__init__()
        if size < 75:
            raise ValueError(f"Inception-v3 needs inputs of at least 75 px, got {size}")
        self.size = size
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = BlockE(1280, _avg_pool)
        self.Mixed_7c = BlockE(2048, _max_pool)  # the TF graph's max pool

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = self.Conv2d_1a_3x3.conv.weight.device
        with full_precision(device):
            return self._pool3(images.to(device, torch.float32))

    def _pool3(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, 2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def hub_weights_path() -> Path:
    """Where ``pytorch-fid`` keeps the converted weights: the torch hub checkpoint cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME


def weights_path(path: str | Path = "") -> Path:
    """The weights file to use: ``path`` when given, else the hub cache's; an error naming
    both places (and how to fill them) when there is none. Nothing is downloaded."""
    p = Path(path) if path else hub_weights_path()
    if not p.is_file():
        where = f"{p}" if path else f"the torch hub cache ({p})"
        raise FIDInceptionError(
            f"FID-Inception weights not found: {where}. Give --fid-inception PATH to a copy of "
            f"{WEIGHTS_NAME} (the pytorch-fid package's converted TF Inception), or put it in the hub "
            "cache; nothing is downloaded")
    return p


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    sd = read_state_dict(path, FIDInceptionError, "FID-Inception")
    return {k: v for k, v in sd.items()
            if not k.startswith(_UNUSED) and not k.endswith("num_batches_tracked")}


def load_fid_inception(path: str | Path = "", device: str | torch.device = "cpu",
                       size: int = 299) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and fill it from ``path`` (or the hub cache). Every
    parameter must be in the file with its shape (classifier heads and batch-norm step
    counters are ignored)."""
    path = weights_path(path)
    sd = _state_dict(path)
    net = FIDInceptionV3(size)
    want = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(want.keys() - sd.keys())
    unexpected = sorted(sd.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & sd.keys() if tuple(sd[k].shape) != tuple(want[k]))
    if missing or unexpected or wrong:
        raise FIDInceptionError(
            f"{path}: not FID-Inception weights ({WEIGHTS_NAME}'s layout): {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong)} of another shape (e.g. {[(k, tuple(sd[k].shape)) for k in wrong[:2]]})")
    net.load_state_dict(sd, strict=False)  # only num_batches_tracked may be absent
    return net.to(device).eval()


@requirement("fid_inception")
def check_fid_inception(ctx: EvalContext) -> None:
    """FID with the FID Inception needs its weights (given, or in the hub cache) and >= 2 samples."""
    weights_path(ctx.fid_inception)  # raises, naming the path or the hub cache
    if ctx.num_samples < 2:
        raise MetricError(f"FID needs num_samples >= 2, got {ctx.num_samples}")
