"""Image grids with a caption written under each row (sampling, training sample grids).

A grid is for looking at: which caption produced which row matters more than pixel
fidelity, so small images are enlarged (nearest neighbour) until a cell is at least
``min_cell`` pixels wide, and long captions wrap to the row's width.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_path
from .images import to_uint8


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write one (H,W,3) uint8 image atomically; PNG bytes depend on the pixels only."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(path)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a single over-long word is cut)."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        cur = ""
        for word in para.split():
            trial = f"{cur} {word}".strip()
            if font.getlength(trial) <= width or not cur:
                cur = trial
            else:
                lines.append(cur)
                cur = word
            while font.getlength(cur) > width and len(cur) > 1:  # one word wider than the row
                cut = len(cur) - 1
                while cut > 1 and font.getlength(cur[:cut]) > width:
                    cut -= 1
                lines.append(cur[:cut])
                cur = cur[cut:]
        lines.append(cur)
    return lines


def make_grid(
    images: torch.Tensor,
    nrow: int,
    captions: list[str] | None = None,
    *,
    pad: int = 2,
    min_cell: int = 128,
    font_size: int = 12,
) -> Image.Image:
    """Lay out ``images`` ``nrow`` per row; ``captions`` (one per row) go under each row."""
    if nrow <= 0:
        raise ValueError(f"nrow must be > 0, got {nrow}")
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    rows = max(1, -(-n // nrow))
    if captions is not None and len(captions) != rows:
        raise ValueError(f"captions: expected one per row ({rows} rows of {nrow}), got {len(captions)}")
    scale = max(1, -(-min_cell // w))
    ch, cw = h * scale, w * scale
    ncol = min(nrow, n) if n else nrow
    width = ncol * cw + (ncol + 1) * pad
    font = _font(font_size)
    line_h = font_size + 3
    wrapped = [_wrap(c, font, width - 2 * pad) for c in captions] if captions is not None else [[]] * rows
    text_h = [len(lines) * line_h + (pad if lines else 0) for lines in wrapped]
    height = pad + sum(ch + pad + t for t in text_h)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for r in range(rows):
        for c in range(ncol):
            i = r * nrow + c
            if i >= n:
                break
            cell = Image.fromarray(arr[i])
            if scale > 1:
                cell = cell.resize((cw, ch), Image.NEAREST)
            canvas.paste(cell, (pad + c * (cw + pad), y))
        y += ch + pad
        for k, line in enumerate(wrapped[r]):
            draw.text((pad, y + k * line_h), line, fill=(0, 0, 0), font=font)
        y += text_h[r]
    return canvas


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int,
    captions: list[str] | None = None,
    **kwargs,
) -> Path:
    """Write a captioned grid as PNG (atomic: temp file + rename). See :func:`make_grid`."""
    grid = make_grid(images, nrow, captions, **kwargs)
    return save_png(np.asarray(grid), path)
