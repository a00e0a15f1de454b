"""Whole-split readers for evaluation: captions, embeddings, attributes and real images.

Training streams shards endlessly and shuffled; evaluation instead needs every sample of a
split exactly once, in a fixed order, so that each rank can take a disjoint slice and the
result does not depend on the number of ranks. Shards are read by the training stream's
reader (:mod:`stackgan.data.tario`, webdataset's layout, see :mod:`stackgan.data.meta`), from a
folder or, through the shard cache, from a URL.
"""
from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from stackgan.data import tario
from stackgan.data.meta import ShardError, ShardMeta
from stackgan.data.shardcache import ShardFiles
from stackgan.data.storage import parse as parse_store
from stackgan.data.tario import index_tar, quiet_decoder, read_fields
from stackgan.images import CROP_OF
from stackgan.images import from_hwc_uint8 as to_tensor  # noqa: F401 -- the metrics import it from here


def iter_split(meta: ShardMeta, split: str, fields: tuple[str, ...]) -> Iterator[dict[str, bytes]]:
    """Raw samples of ``split`` in shard order: dicts ``{"__key__", "__shard__", field: bytes}``.

    Only the members named in ``fields`` (e.g. ``"emb.npy"``, ``"76.jpg"``; an image field
    also finds the image of that size stored as PNG) are read, through the training stream's
    tar reader; remote shards come through the shard cache (``$STACKGAN_SHARD_CACHE`` or
    ``$TMPDIR/stackgan-shards``, its default bound).
    A sample missing one of them is an error that names the shard and the key.
    """
    if split not in meta.splits:
        raise ShardError(f"{meta.root}/metadata.json has no split {split!r} (has {sorted(meta.splits)})")
    files = ShardFiles(parse_store(meta.root))
    for info, where in zip(meta.splits[split].shards, meta.urls(split)):
        with files.open(info.name, info.sha256) as pin:
            idx = index_tar(pin.fd, where)
            if idx.problem:
                raise ShardError(f"{where}: corrupt shard ({idx.problem})")
            rows = [read_fields(pin.fd, idx, i, fields) for i in range(len(idx.samples))]
        for raw in rows:  # yielded once the shard is released: a slow consumer pins nothing
            raw["__key__"] = raw["__key__"].decode()
            raw["__shard__"] = where
            yield raw


def decode_image(data: bytes, size: int, crop: int | None = None) -> np.ndarray:
    """Image bytes -> (crop, crop, 3) uint8, centre-cropped (the eval counterpart of random crops).
    Decoded by the training stream's decoder (:func:`stackgan.data.tario.decode_image`)."""
    with quiet_decoder():
        arr = tario.decode_image(data).transpose(1, 2, 0)
    if arr.shape[:2] != (size, size):
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((size, size), Image.BICUBIC))
    if crop is not None and crop < size:
        o = (size - crop) // 2
        arr = arr[o : o + crop, o : o + crop]
    return np.ascontiguousarray(arr)


def center_crop(images: np.ndarray, crop: int) -> np.ndarray:
    """(N,S,S,3) -> (N,crop,crop,3) centre crops."""
    o = (images.shape[1] - crop) // 2
    return np.ascontiguousarray(images[:, o : o + crop, o : o + crop])


def is_holdout(key: str, mod: int) -> bool:
    """A fixed 1-in-``mod`` subset of keys, the same for judge training and evaluation."""
    return mod > 0 and zlib.crc32(key.encode()) % mod == 0


@dataclass
class SplitData:
    """A split (or a subset of it) held in memory; row i of every array is sample i."""

    keys: list[str]
    captions: list[list[str]]
    emb: np.ndarray  # (N, C, D) float32
    cls: np.ndarray  # (N,) int64
    attr: np.ndarray | None  # (N, A) uint8, None when the shards carry no attributes
    img: np.ndarray | None  # (N, S, S, 3) uint8 centre crops, None unless asked for

    def __len__(self) -> int:
        return len(self.keys)

    def texts(self, sample, cap) -> list[str]:
        """The caption texts of ``emb[sample, cap]`` (index arrays of equal length)."""
        return [self.captions[s][c] for s, c in zip(sample, cap)]


def load_split(
    meta: ShardMeta,
    split: str,
    *,
    image: int | None = None,
    attributes: bool = True,
    select: Callable[[str], bool] | None = None,
    crop: bool = True,
) -> SplitData:
    """Read a split into memory. ``image``: stored size to decode (76 or 304), centre-cropped
    to the training size unless ``crop`` is false; ``select(key)`` keeps a subset (e.g. the
    judge's held-out keys)."""
    if image is not None and image not in meta.image_sizes:
        raise ShardError(f"{meta.root}: no {image}px images (has {meta.image_sizes})")
    attributes = attributes and bool(meta.attributes)
    fields = ["emb.npy", "txt.json", "cls"]
    if attributes:
        fields.append("attr.npy")
    if image is not None:
        fields.append(meta.image_field(image))
    keys, caps, embs, clss, attrs, imgs = [], [], [], [], [], []
    for s in iter_split(meta, split, tuple(fields)):
        if select is not None and not select(s["__key__"]):
            continue
        where = f"{s['__shard__']}:{s['__key__']}"
        try:
            emb = np.load(io.BytesIO(s["emb.npy"]), allow_pickle=False).astype(np.float32, copy=False)
            cap = json.loads(s["txt.json"])
            cls = int(s["cls"].decode().strip())
            at = np.load(io.BytesIO(s["attr.npy"]), allow_pickle=False) if attributes else None
        except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"{where}: cannot decode sample ({e})") from e
        if emb.ndim != 2 or emb.shape[1] != meta.text_dim:
            raise ShardError(f"{where}: emb.npy has shape {emb.shape}, expected (C, {meta.text_dim})")
        if not isinstance(cap, list) or len(cap) != emb.shape[0]:
            raise ShardError(f"{where}: txt.json must list one caption per embedding ({emb.shape[0]})")
        if at is not None and at.shape != (len(meta.attributes),):
            raise ShardError(f"{where}: attr.npy has shape {at.shape}, expected ({len(meta.attributes)},)")
        keys.append(s["__key__"])
        caps.append([str(c) for c in cap])
        embs.append(emb)
        clss.append(cls)
        if at is not None:
            attrs.append(at.astype(np.uint8, copy=False))
        if image is not None:
            imgs.append(decode_image(s[meta.image_field(image)], image, CROP_OF.get(image) if crop else None))
    if not keys:
        where = " in the selection" if select else ""
        raise ShardError(f"{meta.root}: split {split!r} has no samples{where}")
    if len({e.shape for e in embs}) != 1:
        raise ShardError(f"{meta.root}/{split}: samples hold different numbers of captions")
    return SplitData(
        keys=keys,
        captions=caps,
        emb=np.stack(embs),
        cls=np.asarray(clss, dtype=np.int64),
        attr=np.stack(attrs) if attrs else None,
        img=np.stack(imgs) if image is not None else None,
    )


def iter_images(
    meta: ShardMeta, split: str, image: int, *, rank: int = 0, world: int = 1, limit: int = 0
) -> Iterator[np.ndarray]:
    """Stream centre-cropped real images of a split (rank ``rank`` gets every ``world``-th);
    for sets too big to hold at 304px. ``limit`` > 0 stops after that many samples in all."""
    if image not in meta.image_sizes:
        raise ShardError(f"{meta.root}: no {image}px images (has {meta.image_sizes})")
    for i, s in enumerate(iter_split(meta, split, (meta.image_field(image),))):
        if limit and i >= limit:
            return
        if i % world == rank:
            yield decode_image(s[meta.image_field(image)], image, CROP_OF.get(image))
