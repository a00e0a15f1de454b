"""DiffAugment translation: each image is its own shifted copy, gradients reach the input."""
from __future__ import annotations

import pytest
import torch

from stackgan.augment import translate


def _expected(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """One image shifted by (dy, dx) with replicated borders, by explicit clamped indexing."""
    _, h, w = x.shape
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return x[:, rows][:, :, cols]


def test_each_image_is_shifted_by_its_own_offset():
    x = torch.randn(6, 3, 9, 7)
    shift = 2
    g = torch.Generator().manual_seed(3)
    off = torch.randint(0, 2 * shift + 1, (2, 6, 1), generator=torch.Generator().manual_seed(3))
    y = translate(x, shift, generator=g)
    assert y.shape == x.shape
    for i in range(6):
        dy, dx = shift - int(off[0, i]), shift - int(off[1, i])
        assert torch.equal(y[i], _expected(x[i], dy, dx)), f"image {i} is not x shifted by ({dy}, {dx})"
    assert len({(int(a), int(b)) for a, b in zip(off[0, :, 0], off[1, :, 0])}) > 1  # not one shift for all


def test_zero_shift_is_identity_and_gradients_flow():
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    assert translate(x, 0) is x
    w = torch.randn(3, 3, 8, 8)
    (translate(x, 3, generator=torch.Generator().manual_seed(0)) * w).sum().backward()
    # every output pixel comes from exactly one input pixel: the gradients add up to w's sum
    assert torch.allclose(x.grad.sum(), w.sum(), atol=1e-4)
    assert (x.grad != 0).any()


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="expected \\(B, C, H, W\\)"):
        translate(torch.randn(3, 8, 8), 2)
