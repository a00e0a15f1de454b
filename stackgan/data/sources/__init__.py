"""Data sources beyond CUB: one small reader per layout, all feeding the same shard writer.

Why: the trainer and the metrics read one shard format (:mod:`stackgan.data.meta`); a new
data set only needs a reader that lists its samples. A reader returns a :class:`SourceSet`
(no image decoded yet; every required file checked, missing ones named); the writer in
:mod:`stackgan.data.prepare` fits each image to a square, resizes it, and packs it.

    cub         CUB-200-2011 + StackGAN's birds files (:mod:`stackgan.data.cub`, not here)
    flowers     Oxford-102 in StackGAN's layout (:mod:`.flowers`)
    coco        COCO 2014 + captions json, optionally StackGAN-Pytorch's pickles (:mod:`.coco`)
    webdataset  img2dataset-style tar shards, local or URLs (:mod:`.webdataset`)
    folder      images + name.txt captions, or a CSV/JSONL table (:mod:`.folder`)
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SOURCES = ("cub", "flowers", "coco", "webdataset", "folder")
FITS = ("squash", "center", "pad")  # how a whole image becomes square (CUB: its bbox rule)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_TEST_FRACTION = 0.05  # held out by key hash where a source has no split of its own


@dataclass
class Item:
    """One source sample. ``member``: (offset, size) of the image inside the tar ``path``."""

    key: str  # stored as name.txt; unique within the source
    path: str
    captions: list[str]
    cls: int | None = None  # None: the source has no classes
    emb: np.ndarray | None = None  # (C, D) shipped embeddings, else None (embedded at prepare time)
    member: tuple[int, int] | None = None


@dataclass
class SourceSet:
    kind: str
    root: str
    splits: dict[str, list[Item]]
    fit: str  # one of FITS
    encoder: str | None  # encoder of the shipped embeddings; None = embed the captions
    text_dim: int  # of the shipped embeddings (0 when encoder is None)
    class_names: dict[int, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # left out while reading, by reason
    info: dict = field(default_factory=dict)  # recorded in metadata.json's "source"

    @property
    def has_classes(self) -> bool:
        return all(it.cls is not None for items in self.splits.values() for it in items)


def count(skipped: dict[str, int], reason: str, n: int = 1) -> None:
    skipped[reason] = skipped.get(reason, 0) + n


def caption_lines(text: str) -> list[str]:
    """Non-empty, stripped lines (StackGAN's text files: one caption a line)."""
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def held_out(key: str, fraction: float) -> bool:
    """Whether ``key`` belongs to the test split: a stable hash, so adding samples never moves
    an existing one between splits."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h < fraction * 2.0**64


def split_by_hash(items: list[Item], fraction: float) -> dict[str, list[Item]]:
    return {"train": [it for it in items if not held_out(it.key, fraction)],
            "test": [it for it in items if held_out(it.key, fraction)]}


def natural_key(s: str):
    """Sort key that orders "img2" before "img10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def fit_square(img: Image.Image, fit: str) -> Image.Image:
    """The whole image as a square: ``squash`` (resize later, aspect not kept: StackGAN's
    flowers and COCO), ``center`` (largest centred square), ``pad`` (black borders)."""
    w, h = img.size
    if fit == "squash" or w == h:
        return img
    if fit == "center":
        s = min(w, h)
        x, y = (w - s) // 2, (h - s) // 2
        return img.crop((x, y, x + s, y + s))
    if fit == "pad":
        s = max(w, h)
        out = Image.new("RGB", (s, s))
        out.paste(img, ((s - w) // 2, (s - h) // 2))
        return out
    raise ValueError(f"fit must be one of {FITS}, got {fit!r}")


def fixed_captions(caps: list[str], n: int) -> list[str]:
    """Exactly ``n`` captions (the shard format has a fixed count): the first n, or the list
    repeated in order when shorter (so every caption keeps the same share of draws +-1)."""
    return [caps[i % len(caps)] for i in range(n)]
