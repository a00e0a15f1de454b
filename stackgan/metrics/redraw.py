"""Birds redrawn by the embedded set's renderer, seen exactly as a prepared shard holds them.

Why: two instruments need birds whose every part is known and that are drawn exactly as
the data set draws them: the judge's ceiling (:mod:`.judge_ceiling`) and the training set
of the part-wise judge (:mod:`.part_judge`). Both must see a drawing through the shards'
own path: the data set's JPEG (quality 90, as ``birds._render_species`` writes it),
StackGAN's bbox crop resized to 76 px, the shard's JPEG, decoded as evaluation decodes it.
Otherwise a judge would learn, or be scored on, pixels that no shard contains.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stackgan.data import birds, cub
from stackgan.data.concurrency import parallel_map
from stackgan.data.meta import ShardMeta
from stackgan.data.prepare import jpeg_bytes
from stackgan.errors import StackGANError

from .evalset import center_crop, decode_image

SHARD_SIZE = 76  # the stored stage-I size the judges read (64 crops of it)
_PARTS_TAG = 0xA77  # RNG stream of the random part combinations of render_random
_DRAW_TAG = 0xD4A  # RNG stream of the drawing itself (pose, shade, background)


class RedrawError(StackGANError, RuntimeError):
    """Shards the renderer cannot redraw: not made by the embedded generator, or by another version."""


@dataclass(frozen=True)
class Renderer:
    """What a shard set's images were drawn and encoded with (from its metadata)."""

    species: int  # the generator's species count
    seed: int  # its seed (fixes the species' attributes)
    jpeg_quality: int  # the shards' JPEG quality

    def make_species(self) -> dict[int, birds.Species]:
        return {s.class_id: s for s in birds.make_species(self.species, self.seed)}

    def identity(self) -> dict:
        """What a judge trained on this renderer's drawings depends on (stored with it)."""
        return {"generator": "stackgan.data.birds", "version": birds.GENERATOR_VERSION,
                "jpeg_quality": self.jpeg_quality}


def is_embedded(meta: ShardMeta) -> bool:
    """Whether the shards were drawn by the embedded bird generator (any version)."""
    gen = meta.source.get("generator")
    return isinstance(gen, dict) and gen.get("generator") == "stackgan.data.birds"


def embedded_renderer(meta: ShardMeta) -> Renderer:
    """The renderer of a shard set made by this version of the embedded generator, or a
    :class:`RedrawError` that says why the set cannot be redrawn."""
    gen = meta.source.get("generator")
    if not is_embedded(meta):
        raise RedrawError(
            f"{meta.root}: not made by the embedded bird generator (stackgan.data.birds; source kind "
            f"{meta.source.get('kind')!r}); redrawing its birds needs shards prepared from "
            "`python -m stackgan.data.birds`")
    if gen.get("version") != birds.GENERATOR_VERSION:
        raise RedrawError(f"{meta.root}: drawn by bird generator version {gen.get('version')}, this code is "
                          f"version {birds.GENERATOR_VERSION}; regenerate the set and its shards")
    if meta.attributes != birds.ATTRIBUTE_NAMES:
        raise RedrawError(f"{meta.root}: other attributes than the embedded set's")
    if SHARD_SIZE not in meta.image_sizes:
        raise RedrawError(f"{meta.root}: no {SHARD_SIZE}px images (has {meta.image_sizes})")
    return Renderer(int(gen["species"]), int(gen["seed"]), int(meta.source.get("jpeg_quality", 90)))


def random_parts(rng: np.random.Generator, keep: dict[str, str] | None = None) -> dict[str, str]:
    """Random attributes drawn as :func:`birds.make_species` draws a species (the back differs
    from crown, wings and belly; bill length follows bill shape), with the ``keep`` values fixed."""
    keep, colors = keep or {}, list(birds.COLORS)
    while True:
        c = lambda: colors[int(rng.integers(len(colors)))]  # noqa: E731
        a = {"crown": c(), "back": c(), "wing": c(), "belly": c(), "tail": c(),
             "bill_color": birds.BILL_COLORS[int(rng.integers(len(birds.BILL_COLORS)))],
             "bill_shape": birds.BILL_SHAPES[int(rng.integers(len(birds.BILL_SHAPES)))],
             "wing_pattern": birds.WING_PATTERNS[int(rng.choice(3, p=[0.5, 0.25, 0.25]))],
             "size": ["small", "medium", "large"][int(rng.choice(3, p=[0.45, 0.35, 0.2]))]}
        a |= {k: v for k, v in keep.items() if k != "bill_length"}
        a["bill_length"] = birds.BILL_LENGTH[a["bill_shape"]]
        if a["back"] not in (a["crown"], a["wing"], a["belly"]):
            return a


def shard_view(img: Image.Image, bbox, quality: int = 90) -> np.ndarray:
    """A drawn image as its shard holds it, (76, 76, 3) uint8: the data set's JPEG (quality
    90), bbox crop to 76, the shard's JPEG (its 76.jpg), decoded as evaluation reads it."""
    on_disk = Image.open(io.BytesIO(jpeg_bytes(img, 90))).convert("RGB")
    return decode_image(jpeg_bytes(cub.crop_resize(on_disk, bbox, (SHARD_SIZE,))[0], quality), SHARD_SIZE)


def render(attrs: list[dict], seed: int, stream: int = 0, quality: int = 90, crop: int | None = 64,
           first: int = 0) -> np.ndarray:
    """(N, crop, crop, 3) uint8: bird ``first + i`` drawn with ``attrs[i]`` (pose, shades and
    background from the RNG ``(seed, stream, first + i)``) and seen as the judge sees a shard
    image (:func:`shard_view`, then a centre crop; ``crop=None`` keeps the 76 px)."""
    rng = lambda i: np.random.default_rng([seed, stream, first + i, _DRAW_TAG])  # noqa: E731
    out = np.stack([shard_view(*birds.draw_bird(a, rng(i)), quality) for i, a in enumerate(attrs)])
    return out if crop is None else center_crop(out, crop)


def _render_chunk(job: tuple[int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    lo, hi, seed, stream, quality = job
    attrs = [random_parts(np.random.default_rng([seed, stream, i, _PARTS_TAG])) for i in range(lo, hi)]
    images = render(attrs, seed, stream, quality, crop=None, first=lo)
    return images, np.stack([birds.attribute_vector(a) for a in attrs])


def render_random(n: int, seed: int, stream: int = 0, quality: int = 90,
                  workers: int | None = None, chunk: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """``n`` birds with random, independent part combinations (:func:`random_parts`), drawn
    through the shards' path at 76 px: (images (n, 76, 76, 3) uint8, labels (n, A) uint8 over
    :data:`birds.ATTRIBUTE_NAMES`). Bird i depends only on (seed, stream, i), not on
    ``workers`` (processes; default: the usable cores)."""
    jobs = [(lo, min(lo + chunk, n), seed, stream, quality) for lo in range(0, n, chunk)]
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    if workers > 1 and len(jobs) > 1:
        parts = list(parallel_map(_render_chunk, jobs, workers, ordered=True))
    else:
        parts = [_render_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
