"""The embedded bird data set: procedurally drawn birds in CUB + StackGAN's exact layout.

Why: without CUB (a laptop, CI, a first try) every command must still run end to end on
the same code path, and because the generator knows what it drew, generated images can
later be scored against their captions.

Each species has a colour per part (crown, back, wings, belly, tail, bill), a bill shape,
a wing pattern and a size class; each image varies pose (facing, tilt), scale, position,
proportions, colour shade and background. A minority of images of a species shows its
alternative crown colour. Captions (10 per image, CUB's style) state only attributes that
were drawn, and the true attributes are written in CUB's own attribute format.

    python -m stackgan.data.birds --out data/birds-embedded --species 60 --images-per-species 50

writes ``<out>/CUB_200_2011/...`` and ``<out>/birds/...`` (see :mod:`stackgan.data.cub`);
``birds/char-CNN-RNN-embeddings.pickle`` keeps its name for layout compatibility but holds
all-MiniLM-L6-v2 embeddings (``birds/encoder.json`` says so). Same seed, same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from ..errors import EXIT_BAD_INPUT
from ..text import SENTENCE_ENCODER, get_encoder
from .concurrency import folder_lock, parallel_map

GENERATOR_VERSION = 2  # bump whenever the same parameters would give other bytes
DEFAULT_DIR = Path("data/birds-embedded")
DEFAULT_SPECIES = 60  # the main job's set (45 training species, 15 unseen): docs/quality.md, "The main job"
DEFAULT_IMAGES = 50
CAPTIONS_PER_IMAGE = 10
CAPTION_POOL = 24  # distinct captions per (species, crown morph); images draw 10 of them
MORPH_PROB = 0.15  # share of a species' images showing its alternative crown colour

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (205, 30, 35),
    "orange": (245, 130, 20),
    "yellow": (245, 220, 40),
    "green": (35, 150, 55),
    "blue": (35, 75, 215),
    "purple": (125, 45, 165),
    "brown": (115, 70, 35),
    "grey": (135, 135, 135),
    "black": (25, 25, 25),
    "white": (242, 242, 242),
}
BILL_COLORS = ["black", "grey", "orange", "yellow", "brown"]
BILL_SHAPES = ["cone", "dagger", "hooked", "needle"]
BILL_LENGTH = {"cone": "shorter_than_head", "hooked": "shorter_than_head",
               "dagger": "about_the_same_as_head", "needle": "longer_than_head"}
BILL_REL_LEN = {"cone": 0.6, "hooked": 0.9, "dagger": 1.9, "needle": 3.0}  # x head radius
WING_PATTERNS = ["solid", "striped", "spotted"]
SIZES = {"small": "small_(5_-_9_in)", "medium": "medium_(9_-_16_in)", "large": "large_(16_-_32_in)"}
IMAGE_SIZES = [(500, 375), (500, 333), (500, 400), (375, 500), (450, 338), (400, 300)]
BACKGROUNDS = [(168, 198, 228), (176, 202, 160), (214, 200, 172), (200, 200, 200), (218, 192, 204),
               (190, 214, 214)]

# part -> CUB attribute group, in attributes.txt order
COLOR_GROUPS = {"crown": "has_crown_color", "back": "has_back_color", "wing": "has_wing_color",
                "belly": "has_belly_color", "tail": "has_upper_tail_color", "bill_color": "has_bill_color"}


def attribute_names() -> list[str]:
    """CUB-style attribute names of the embedded set (attributes.txt order)."""
    names = [f"has_bill_shape::{s}" for s in BILL_SHAPES]
    for group in COLOR_GROUPS.values():
        names += [f"{group}::{c}" for c in COLORS]
    names += [f"has_bill_length::{v}" for v in sorted(set(BILL_LENGTH.values()))]
    names += [f"has_wing_pattern::{p}" for p in WING_PATTERNS]
    names += [f"has_size::{v}" for v in SIZES.values()]
    return names


ATTRIBUTE_NAMES = attribute_names()


@dataclass(frozen=True)
class Species:
    class_id: int  # 1-based
    name: str  # class dir, e.g. "003.Red_crowned_Finch"
    crown: str
    alt_crown: str
    back: str
    wing: str
    belly: str
    tail: str
    bill_color: str
    bill_shape: str
    wing_pattern: str
    size: str  # small | medium | large


def image_attributes(sp: Species, morph: bool) -> dict[str, str]:
    """What one image shows (the alternative crown when ``morph``)."""
    return {"crown": sp.alt_crown if morph else sp.crown, "back": sp.back, "wing": sp.wing,
            "belly": sp.belly, "tail": sp.tail, "bill_color": sp.bill_color,
            "bill_shape": sp.bill_shape, "bill_length": BILL_LENGTH[sp.bill_shape],
            "wing_pattern": sp.wing_pattern, "size": sp.size}


def attribute_vector(attrs: dict[str, str]) -> np.ndarray:
    """uint8 is_present vector over :data:`ATTRIBUTE_NAMES`."""
    on = {f"{g}::{attrs[p]}" for p, g in COLOR_GROUPS.items()}
    on |= {f"has_bill_shape::{attrs['bill_shape']}", f"has_bill_length::{attrs['bill_length']}",
           f"has_wing_pattern::{attrs['wing_pattern']}", f"has_size::{SIZES[attrs['size']]}"}
    return np.array([n in on for n in ATTRIBUTE_NAMES], np.uint8)


# --------------------------------------------------------------------------------------
# Species
# --------------------------------------------------------------------------------------
_NOUNS = {"cone": ["Finch", "Grosbeak", "Bunting", "Sparrow", "Cardinal"],
          "dagger": ["Tern", "Kingfisher", "Heron", "Grebe", "Loon"],
          "hooked": ["Shrike", "Kite", "Parrot", "Falcon", "Petrel"],
          "needle": ["Hummingbird", "Sunbird", "Creeper", "Sandpiper", "Curlew"]}


def make_species(n: int, seed: int) -> list[Species]:
    """``n`` distinct species (no two share crown, back, wings, belly and bill shape)."""
    rng = np.random.default_rng([seed, 0xB1D5])
    colors = list(COLORS)
    out: list[Species] = []
    seen_sig: set[tuple] = set()
    seen_names: set[str] = set()
    while len(out) < n:
        c = lambda: colors[int(rng.integers(len(colors)))]  # noqa: E731
        back = c()
        crown, wing, belly = c(), c(), c()
        if back in (crown, wing, belly):  # parts must stand out from the body
            continue
        alt = c()
        if alt in (crown, back):
            continue
        shape = BILL_SHAPES[int(rng.integers(len(BILL_SHAPES)))]
        sig = (crown, back, wing, belly, shape)
        if sig in seen_sig:
            continue
        seen_sig.add(sig)
        size = ["small", "medium", "large"][int(rng.choice(3, p=[0.45, 0.35, 0.2]))]
        pattern = WING_PATTERNS[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
        noun = _NOUNS[shape][int(rng.integers(5))]
        words = [f"{crown.capitalize()}_crowned", f"{wing.capitalize()}_winged",
                 f"{belly.capitalize()}_bellied"]
        name = None
        for first in words:
            if f"{first}_{noun}" not in seen_names:
                name = f"{first}_{noun}"
                break
        if name is None:
            name = f"{words[0]}_{words[1]}_{noun}"
            k = 2
            while name in seen_names:
                name, k = f"{words[0]}_{words[1]}_{noun}_{k}", k + 1
        seen_names.add(name)
        out.append(Species(len(out) + 1, f"{len(out) + 1:03d}.{name}", crown, alt, back, wing, belly,
                           c(), BILL_COLORS[int(rng.integers(len(BILL_COLORS)))], shape, pattern, size))
    return out


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------
def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


_SHAPE_WORDS = {"cone": ["cone-shaped", "conical"], "dagger": ["dagger-shaped", "dagger-like"],
                "hooked": ["hooked", "hook-shaped"], "needle": ["needle-like", "needle-shaped"]}
_LEN_WORD = {"shorter_than_head": "short", "longer_than_head": "long", "about_the_same_as_head": ""}
_SIZE_WORDS = {"small": ["small", "little"], "medium": ["medium-sized", "medium sized"],
               "large": ["large", "big"]}
_PATTERN_WORD = {"solid": ["", "plain", "solid"], "striped": ["striped"], "spotted": ["spotted"]}

TEMPLATES = [
    "this bird has {crown}, {wings} and {belly}.",
    "{size_a} bird with {crown} and {bill}.",
    "this {size} bird has {back}, {wings} and {tail}.",
    "the bird has {belly}, {back} and {bill}.",
    "this is {size_a} bird with {wings} and {crown}.",
    "a bird with {bill}, {crown} and {tail}.",
    "this bird has {wings}, {belly} and {bill}.",
    "the crown is {crown_c} and the wings are {wing_c}.",
    "this {size} bird has {belly} and {tail}.",
    "{size_a} bird with {back}, {belly} and {crown}.",
    "the belly is {belly_c}, the back is {back_c} and the tail is {tail_c}.",
    "this bird has {bill}, {wings} and {tail}.",
    "{size_a} bird that has {back}, {crown} and {bill}.",
    "this bird has {crown} and {belly}.",
    "a bird with {wings}, {back} and {belly}.",
    "the wings are {wing_c} and the belly is {belly_c}.",
    "this {size} bird has {crown}, {belly} and {tail}.",
]


def fill_caption(t: str, a: dict[str, str], rng: np.random.Generator) -> str:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    pattern = pick(_PATTERN_WORD[a["wing_pattern"]])
    wings = f"{pattern} {a['wing']} wings".strip()
    length = _LEN_WORD[a["bill_length"]]
    bill_words = " ".join(w for w in (length, pick(_SHAPE_WORDS[a["bill_shape"]]), a["bill_color"]) if w)
    if rng.random() < 0.5:  # colour first, or shape first
        bill_words = " ".join(w for w in (length, a["bill_color"], pick(_SHAPE_WORDS[a["bill_shape"]])) if w)
    size = pick(_SIZE_WORDS[a["size"]])
    fields = {
        "crown": _a(f"{a['crown']} crown"), "crown_c": a["crown"],
        "wings": wings, "wing_c": a["wing"],
        "belly": _a(f"{a['belly']} belly"), "belly_c": a["belly"],
        "back": _a(f"{a['back']} back"), "back_c": a["back"],
        "tail": _a(f"{a['tail']} tail") if rng.random() < 0.6 else f"{a['tail']} tail feathers",
        "tail_c": a["tail"],
        "bill": _a(f"{bill_words} {pick(['bill', 'beak'])}"),
        "size": size, "size_a": _a(size),
    }
    return t.format(**fields)


def caption_pool(a: dict[str, str], rng: np.random.Generator, n: int = CAPTION_POOL) -> list[str]:
    """``n`` distinct captions that describe the attributes ``a`` (and nothing else)."""
    pool: list[str] = []
    tries = 0
    while len(pool) < n and tries < 50 * n:
        c = fill_caption(TEMPLATES[int(rng.integers(len(TEMPLATES)))], a, rng)
        tries += 1
        if c not in pool:
            pool.append(c)
    return pool


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------
def _ellipse(cx, cy, rx, ry, a0=0.0, a1=2 * math.pi, n=32, rot=0.0):
    ts = np.linspace(a0, a1, n)
    x, y = rx * np.cos(ts), ry * np.sin(ts)
    c, s = math.cos(rot), math.sin(rot)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)


def _jitter(rgb, rng, amount=12):
    """A shade of ``rgb``: a shared brightness shift, plus a small tint only for chromatic
    colours (a tinted grey would read as another colour name)."""
    shift = int(rng.integers(-amount, amount + 1))
    chromatic = max(rgb) - min(rgb) > 40
    tint = rng.integers(-6, 7, 3) if chromatic else np.zeros(3, np.int64)
    return tuple(int(np.clip(v + shift + t, 0, 255)) for v, t in zip(rgb, tint))


def _darker(rgb, f=0.55):
    return tuple(int(v * f) for v in rgb)


def _background(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Pastel colour + vertical gradient + soft blotches + fine grain (+ a few muted blobs).
    The smooth part is made at 1/8 size and upsampled in C: drawing stays cheap."""
    base = np.array(BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], np.float32) + rng.uniform(-12, 12, 3)
    gh, gw = h // 8 + 2, w // 8 + 2
    grad = np.linspace(-1, 1, gh, dtype=np.float32)[:, None] * rng.uniform(-18, 18)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8), dtype=np.uint8))
    blotch = np.asarray(coarse.resize((gw, gh), Image.BICUBIC), np.float32)
    smooth = np.clip(128 + grad + (blotch - 128) * rng.uniform(0.05, 0.2), 0, 255).astype(np.uint8)
    lum = Image.fromarray(smooth).resize((w, h), Image.BICUBIC)
    grain = Image.fromarray(rng.integers(0, 13, (h, w), dtype=np.uint8))
    lum = ImageChops.add(lum, grain, 1.0, -6)
    img = ImageChops.add(Image.new("RGB", (w, h), tuple(int(v) for v in np.clip(base, 0, 255))),
                         Image.merge("RGB", (lum, lum, lum)), 1.0, -128)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 7))):  # muted leaves / blobs
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.03, 0.1) * w
        col = tuple(int(v) for v in np.clip(base + rng.uniform(-25, 25, 3), 0, 255))
        d.ellipse([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=col)
    return img


def _bird_shapes(sp: dict, rng: np.random.Generator):
    """The bird in local units (body length 1, facing +x, y down): list of
    (points, fill, kind) drawn in order, plus leg line segments."""
    size = sp["size"]
    aspect = {"small": 0.62, "medium": 0.55, "large": 0.48}[size] + rng.uniform(-0.04, 0.04)
    ry = 0.5 * aspect
    head_r = 0.2 * {"small": 1.05, "medium": 0.95, "large": 0.85}[size] * rng.uniform(0.95, 1.05)
    neck = {"small": 0.0, "medium": 0.05, "large": 0.12}[size]
    hx, hy = 0.42, -(ry * 0.7 + neck)
    tail_len = rng.uniform(0.3, 0.55)
    tail_up = math.radians(rng.uniform(8, 25))
    leg = {"small": 0.15, "medium": 0.2, "large": 0.3}[size]
    col = sp["colors"]
    shapes = []
    # tail: a fan pointing back and slightly up
    tip = np.array([-0.42 - tail_len * math.cos(tail_up), -0.02 - tail_len * math.sin(tail_up)])
    spread = 0.07 + 0.05 * rng.random()
    tail = np.array([[-0.38, -0.08], tip + [0, -spread], tip + [-0.02, spread], [-0.38, 0.06]])
    shapes.append((tail, col["tail"]))
    # neck, body (back colour), belly (lower half)
    if neck > 0:
        shapes.append((np.array([[0.18, -ry * 0.6], [hx - head_r * 0.7, hy],
                                 [hx + head_r * 0.6, hy + head_r * 0.5], [0.42, -ry * 0.1]]), col["back"]))
    shapes.append((_ellipse(0, 0, 0.5, ry), col["back"]))
    belly = _ellipse(0.04, ry * 0.05, 0.44, ry * 0.88, 0.05 * math.pi, 0.95 * math.pi, 24)
    shapes.append((belly, col["belly"]))
    # head (back colour) with the crown cap on top
    shapes.append((_ellipse(hx, hy, head_r, head_r), col["back"]))
    shapes.append((_ellipse(hx, hy, head_r, head_r, 1.08 * math.pi, 1.92 * math.pi, 20), col["crown"]))
    # bill
    bl = BILL_REL_LEN[sp["bill_shape"]] * head_r * rng.uniform(0.92, 1.08)
    bx, by = hx + head_r * 0.92, hy + head_r * 0.1
    th = {"cone": 0.42, "dagger": 0.16, "hooked": 0.3, "needle": 0.07}[sp["bill_shape"]] * head_r
    if sp["bill_shape"] == "hooked":
        bill = np.array([[bx - 0.02, by - th], [bx + bl * 0.7, by - th * 0.9], [bx + bl, by - th * 0.2],
                         [bx + bl * 0.95, by + th * 0.6], [bx + bl * 0.8, by + th * 0.1],
                         [bx - 0.02, by + th]])
    else:
        bill = np.array([[bx - 0.02, by - th], [bx + bl, by + th * 0.15], [bx - 0.02, by + th]])
    shapes.append((bill, col["bill_color"]))
    # eye
    ex, ey = hx + head_r * 0.4, hy - head_r * 0.05
    shapes.append((_ellipse(ex, ey, head_r * 0.24, head_r * 0.24, n=12), (235, 235, 235)))
    shapes.append((_ellipse(ex, ey, head_r * 0.15, head_r * 0.15, n=12), (10, 10, 10)))
    # wing, pointing back, with its pattern
    wcx, wcy, wrx, wry = -0.08, -ry * 0.28, 0.32, ry * 0.42
    wrot = math.radians(-12 + rng.uniform(-6, 6))
    shapes.append((_ellipse(wcx, wcy, wrx, wry, rot=wrot), col["wing"]))
    mark = (20, 20, 20) if sum(COLORS[sp["wing_name"]]) > 330 else (240, 240, 240)
    c, s = math.cos(wrot), math.sin(wrot)
    to_body = lambda u, v: [wcx + c * u - s * v, wcy + s * u + c * v]  # noqa: E731
    if sp["wing_pattern"] == "striped":
        for k in range(3):
            u = wrx * (-0.45 + 0.35 * k)
            half = wry * math.sqrt(max(0.0, 1 - (u / wrx) ** 2)) * 0.85
            w = 0.035
            stripe = [to_body(u - w, -half), to_body(u + w, -half), to_body(u + w - 0.04, half),
                      to_body(u - w - 0.04, half)]
            shapes.append((np.array(stripe), mark))
    elif sp["wing_pattern"] == "spotted":
        for _ in range(6):
            u, v = rng.uniform(-0.6, 0.6) * wrx, rng.uniform(-0.45, 0.45) * wry
            p = to_body(u, v)
            shapes.append((_ellipse(p[0], p[1], 0.035, 0.035, n=10), mark))
    legs = [np.array([[x0, ry * 0.8], [x0 - 0.03, ry * 0.8 + leg], [x0 + 0.06, ry * 0.8 + leg]])
            for x0 in (-0.02, 0.1)]
    return shapes, legs


def draw_bird(attrs: dict[str, str], rng: np.random.Generator):
    """One image: (PIL RGB image, bbox (x, y, w, h) of the drawn bird, integral floats)."""
    w, h = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    img = _background(w, h, rng)
    colors = {p: _jitter(COLORS[attrs[p]], rng) for p in COLOR_GROUPS}
    shapes, legs = _bird_shapes({**attrs, "colors": colors, "wing_name": attrs["wing"]}, rng)
    facing = 1.0 if rng.random() < 0.5 else -1.0
    tilt = math.radians(rng.uniform(-20, 20))
    c, s = math.cos(tilt), math.sin(tilt)
    rot = np.array([[c * facing, -s], [s * facing, c]])  # flip x, then rotate
    pts = np.concatenate([p for p, _ in shapes] + legs)
    local = pts @ rot.T
    lo, hi = local.min(0), local.max(0)
    ext = hi - lo
    frac = {"small": (0.32, 0.48), "medium": (0.42, 0.6), "large": (0.55, 0.78)}[attrs["size"]]
    scale = min(rng.uniform(*frac) * w / ext[0], 0.86 * h / ext[1], 0.86 * w / ext[0])
    margin = 4
    off_lo = margin - lo * scale
    off_hi = np.array([w, h]) - margin - hi * scale
    off = np.array([rng.uniform(off_lo[0], off_hi[0]), rng.uniform(off_lo[1], off_hi[1])])
    tf = lambda p: p @ rot.T * scale + off  # noqa: E731
    d = ImageDraw.Draw(img)
    # a perch under the feet (background, outside the bird's box logic)
    feet_y = float(max(tf(leg)[:, 1].max() for leg in legs))
    if rng.random() < 0.7:
        d.line([(0, feet_y + 2 + rng.uniform(-3, 3)), (w, feet_y + 2 + rng.uniform(-3, 3))],
               fill=_jitter((95, 75, 55), rng, 10), width=max(3, int(scale * 0.035)))
    lw = max(2, int(scale * 0.02))
    for leg in legs:
        d.line([tuple(p) for p in tf(leg)], fill=(70, 55, 40), width=lw, joint="curve")
    ow = max(1, int(scale / 160))
    for p, fill in shapes:
        d.polygon([tuple(q) for q in tf(p)], fill=fill, outline=_darker(fill), width=ow)
    drawn = tf(pts)
    box_lo = np.maximum(np.floor(drawn.min(0)), 0)
    box_hi = np.minimum(np.ceil(drawn.max(0)), [w - 1, h - 1])
    bbox = (float(box_lo[0]), float(box_lo[1]), float(box_hi[0] - box_lo[0]), float(box_hi[1] - box_lo[1]))
    return img, bbox


def _render_species(job) -> list[dict]:
    """Draw and write all images of one species (a worker's unit of work)."""
    sp, n_images, seed, first_id, image_root = job
    sp = Species(**sp)
    rng = np.random.default_rng([seed, sp.class_id, 0xCA9])
    pools = {m: caption_pool(image_attributes(sp, m),
                             np.random.default_rng([seed, sp.class_id, int(m), 0x7E47]))
             for m in (False, True)}
    base = sp.name.split(".", 1)[1]
    out_dir = Path(image_root) / sp.name
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for j in range(n_images):
        img_rng = np.random.default_rng([seed, sp.class_id, j, 0x1A6])
        morph = bool(rng.random() < MORPH_PROB)
        attrs = image_attributes(sp, morph)
        img, bbox = draw_bird(attrs, img_rng)
        image_id = first_id + j
        name = f"{base}_{j + 1:04d}_{image_id}"
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        (out_dir / f"{name}.jpg").write_bytes(buf.getvalue())
        pool = pools[morph]
        pick = img_rng.choice(len(pool), size=min(CAPTIONS_PER_IMAGE, len(pool)), replace=False)
        records.append({"image_id": image_id, "key": f"{sp.name}/{name}", "bbox": bbox,
                        "class_id": sp.class_id, "attrs": attrs, "captions": [pool[int(i)] for i in pick]})
    return records


# --------------------------------------------------------------------------------------
# Writing the layout
# --------------------------------------------------------------------------------------
@dataclass
class GeneratorParams:
    species: int
    images_per_species: int
    seed: int
    version: int = GENERATOR_VERSION

    def to_json(self) -> dict:
        return {"generator": "stackgan.data.birds", **asdict(self)}


def _py2_item(o) -> bytes:
    if isinstance(o, str):
        b = o.encode("latin1")
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<I", len(b)) + b)
    if isinstance(o, bool):
        return b"\x88" if o else b"\x89"
    if isinstance(o, int):
        return b"J" + struct.pack("<i", o)
    if o is None:
        return b"N"
    if isinstance(o, tuple):
        return b"(" + b"".join(_py2_item(x) for x in o) + b"t"
    if isinstance(o, list):
        return b"](" + b"".join(_py2_item(x) for x in o) + b"e"
    raise TypeError(f"no Python-2 pickle form for {type(o).__name__}")


def _py2_array(a: np.ndarray) -> bytes:
    """An ndarray as numpy 1.x under Python 2 pickled it (raw bytes as a py2 ``str``)."""
    a = np.ascontiguousarray(a)
    raw = a.tobytes()
    if len(raw) >= 2**31:
        raise ValueError("array too large for a Python-2 pickle")
    dtype = (b"cnumpy\ndtype\n" + _py2_item((a.dtype.str[1:], 0, 1)) + b"R"
             + _py2_item((3, a.dtype.str[0] if a.dtype.str[0] in "<>" else "|", None, None, None, -1, -1, 0))
             + b"b")
    return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _py2_item((0,))
            + _py2_item("b")
            + b"\x87R(" + _py2_item(1) + _py2_item(tuple(a.shape)) + dtype + b"\x89"
            + b"T" + struct.pack("<I", len(raw)) + raw + b"tb")


def write_py2_pickle(obj, path: Path) -> None:
    """Write ``obj`` the way StackGAN's Python-2 pickles are written (protocol 2, byte
    strings, arrays via ``numpy.core.multiarray``): read with ``encoding="latin1"`` like the
    real files, by numpy 1.x and 2.x alike, and fast to load (no per-byte re-encoding)."""
    body = _py2_array(obj) if isinstance(obj, np.ndarray) else _py2_item(obj)
    path.write_bytes(b"\x80\x02" + body + b".")


def _write_layout(root: Path, species: list[Species], records: list[dict], params: GeneratorParams,
                  test_classes: set[int], encoder_name: str, log) -> None:
    cub = root / "CUB_200_2011"
    birds = root / "birds"
    (cub / "attributes").mkdir(parents=True, exist_ok=True)
    lines = lambda rows: "".join(r + "\n" for r in rows)  # noqa: E731
    (cub / "images.txt").write_text(lines(f"{r['image_id']} {r['key']}.jpg" for r in records))
    (cub / "bounding_boxes.txt").write_text(
        lines(f"{r['image_id']} " + " ".join(f"{v:.1f}" for v in r["bbox"]) for r in records))
    (cub / "classes.txt").write_text(lines(f"{s.class_id} {s.name}" for s in species))
    (cub / "image_class_labels.txt").write_text(lines(f"{r['image_id']} {r['class_id']}" for r in records))
    (cub / "train_test_split.txt").write_text(
        lines(f"{r['image_id']} {int(r['key'].split('_')[-2]) % 2}" for r in records))
    (cub / "attributes.txt").write_text(lines(f"{i + 1} {n}" for i, n in enumerate(ATTRIBUTE_NAMES)))
    (cub / "attributes" / "certainties.txt").write_text(
        "1 not visible\n2 guessing\n3 probably\n4 definitely\n")
    with open(cub / "attributes" / "image_attribute_labels.txt", "w") as f:
        for r in records:
            vec = attribute_vector(r["attrs"])
            f.write("".join(f"{r['image_id']} {a + 1} {int(v)} 4 0.0\n" for a, v in enumerate(vec)))
    for r in records:
        p = birds / "text_c10" / f"{r['key']}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(lines(r["captions"]))

    enc = get_encoder(encoder_name)
    distinct = sorted({c for r in records for c in r["captions"]})
    t0 = time.time()
    vectors = dict(zip(distinct, enc.encode(distinct)))
    log(f"embedded {len(distinct)} distinct captions with {enc.name} in {time.time() - t0:.1f}s")
    for split in ("train", "test"):
        rs = [r for r in records if (r["class_id"] in test_classes) == (split == "test")]
        (birds / split).mkdir(parents=True, exist_ok=True)
        emb = np.stack([np.stack([vectors[c] for c in r["captions"]]) for r in rs]).astype(np.float32) \
            if rs else np.zeros((0, CAPTIONS_PER_IMAGE, enc.dim), np.float32)
        write_py2_pickle([r["key"] for r in rs], birds / split / "filenames.pickle")
        write_py2_pickle([r["class_id"] for r in rs], birds / split / "class_info.pickle")
        write_py2_pickle(emb, birds / split / "char-CNN-RNN-embeddings.pickle")
    (birds / "encoder.json").write_text(json.dumps({"name": enc.name, "dim": enc.dim}, indent=1) + "\n")
    (birds / "generator.json").write_text(json.dumps(params.to_json(), indent=1) + "\n")


def test_classes_for(n_species: int, seed: int) -> set[int]:
    """Class-disjoint split: a quarter of the species (at least one when n >= 2) is test."""
    if n_species < 2:
        return set()
    n_test = max(1, round(n_species / 4))
    perm = np.random.default_rng([seed, 0x5917]).permutation(n_species) + 1
    return {int(c) for c in perm[:n_test]}


def read_params(root: Path) -> dict | None:
    p = Path(root) / "birds" / "generator.json"
    return json.loads(p.read_text()) if p.is_file() else None


def generate(out: str | Path = DEFAULT_DIR, species: int = DEFAULT_SPECIES,
             images_per_species: int = DEFAULT_IMAGES, seed: int = 0, workers: int | None = None,
             force: bool = False, quiet: bool = False) -> Path:
    """Write the embedded set under ``out`` (atomically: a temp folder renamed at the end).

    An existing set made with the same parameters is reused (one from an older generator
    version is regenerated); one made with other parameters is an error unless ``force``."""
    if species < 1 or images_per_species < 1:
        raise ValueError(f"species and images_per_species must be >= 1, got {species}, {images_per_species}")
    if species > 999:
        raise ValueError(f"at most 999 species (class dirs are numbered 001..999), got {species}")
    out = Path(out)
    with folder_lock(out.with_name(f".{out.name}.lock")):  # concurrent callers take turns
        return _generate(out, GeneratorParams(species, images_per_species, seed), workers, force, quiet)


def _generate(out: Path, params: GeneratorParams, workers: int | None, force: bool, quiet: bool) -> Path:
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    species, images_per_species, seed = params.species, params.images_per_species, params.seed
    if out.exists():
        have = read_params(out)
        if have == params.to_json():
            log(f"{out}: embedded set already there ({species} species x {images_per_species} images, "
                f"seed {seed}); reusing it")
            return out
        same_scale = have is not None and all(
            have.get(k) == v for k, v in asdict(params).items() if k != "version")
        if same_scale and have.get("version") != params.version:
            log(f"{out}: made by generator version {have.get('version')}, this is {params.version}; "
                "regenerating")
            force = True
        if not force:
            raise FileExistsError(
                f"{out} exists and was not made with these parameters ({have or 'not a generated set'}); "
                "choose another --out or pass --force to replace it")
        if have is None:
            raise FileExistsError(f"{out} exists and is not a generated bird set; refusing to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    t0 = time.time()
    sps = make_species(species, seed)
    jobs = [(asdict(sp), images_per_species, seed, 1 + i * images_per_species,
             str(tmp / "CUB_200_2011" / "images")) for i, sp in enumerate(sps)]
    workers = workers if workers is not None else len(os.sched_getaffinity(0))
    records: list[dict] = []
    try:
        from tqdm import tqdm

        bar = tqdm(total=species * images_per_species, desc="drawing birds", unit="img", disable=quiet)
        if workers > 1 and species > 1:
            for recs in parallel_map(_render_species, jobs, workers, ordered=True):
                records += recs
                bar.update(len(recs))
        else:
            for job in jobs:
                recs = _render_species(job)
                records += recs
                bar.update(len(recs))
        bar.close()
        t_draw = time.time() - t0
        log(f"drew {len(records)} images in {t_draw:.1f}s")
        _write_layout(tmp, sps, records, params, test_classes_for(species, seed), SENTENCE_ENCODER, log)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({species} species x {images_per_species} images) in {time.time() - t0:.1f}s")
    return out


def tree_digest(root: str | Path) -> str:
    """sha256 over every file's relative path and bytes (to check determinism)."""
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stackgan.data.birds", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_DIR), help="output folder (default %(default)s)")
    ap.add_argument("--species", type=int, default=DEFAULT_SPECIES,
                    help="number of species (default %(default)s)")
    ap.add_argument("--images-per-species", type=int, default=DEFAULT_IMAGES,
                    help="images per species (default %(default)s; CUB has ~60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="drawing processes (default: all usable cores)")
    ap.add_argument("--force", action="store_true", help="replace an existing set made with other parameters")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        generate(a.out, a.species, a.images_per_species, a.seed, a.workers, a.force, a.quiet)
    except (ValueError, FileExistsError) as e:  # bad counts or an existing set: a ValueError, not ours
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
