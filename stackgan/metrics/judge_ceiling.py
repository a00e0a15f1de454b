"""The judge's ceiling for a caption-following generator (embedded bird set only).

Why: the attribute judge is trained on real images of the training species, where parts
always come in species combinations, so it reads a part partly from the rest of the bird
(species context). A caption states 2-4 attributes; a generator that draws exactly those
and anything for the rest is scored below real images even when it draws every stated
part perfectly. This command measures that with the data set's own renderer: it redraws
birds (``birds.draw_bird``, through the shards' JPEG + bbox crop + centre crop path) and
scores them with the judge's rule (mean per-image share of the scored groups, as judge
consistency does) under four conditions:

* ``species``: a training species' own attributes (like a real training image);
* ``caption_faithful``: what a training caption states (a real caption template filled in
  with a training image's attributes), every unstated part drawn at random under the
  generator's constraints; scored on the groups the caption states
  (:func:`stackgan.metrics.captions.stated_mask`, as judge consistency does);
* ``random``: random part combinations, every group scored;
* ``test_species``: the unseen test species' own attributes.

Training-caption consistency above ``caption_faithful`` needs the generator to draw the
species the caption implies (its unstated parts too), not only what the caption says.

    python -m stackgan.metrics.judge_ceiling --shards shards/birds-cub-scale --n 1000
"""
from __future__ import annotations

import argparse
import io
import json
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stackgan.data import birds, cub
from stackgan.data.meta import ShardError, load_metadata
from stackgan.data.prepare import _jpeg as jpeg_bytes

from .captions import caption_groups, stated_mask
from .evalset import center_crop, decode_image, to_tensor
from .judge import JudgeError, group_names, load_judge, share

CONDITIONS = ("species", "caption_faithful", "random", "test_species")
# template field -> the parts it states (birds._caption); "wings" names the pattern (no word: solid)
# and "bill" its length (no word: about the head's length, i.e. a dagger bill)
FIELD_PARTS = {"crown": ("crown",), "crown_c": ("crown",), "wings": ("wing", "wing_pattern"),
               "wing_c": ("wing",), "belly": ("belly",), "belly_c": ("belly",), "back": ("back",),
               "back_c": ("back",), "tail": ("tail",), "tail_c": ("tail",),
               "bill": ("bill_color", "bill_shape", "bill_length"), "size": ("size",), "size_a": ("size",)}
PART_GROUP = {**birds.COLOR_GROUPS, "bill_shape": "has_bill_shape", "bill_length": "has_bill_length",
              "wing_pattern": "has_wing_pattern", "size": "has_size"}


class CeilingError(RuntimeError):
    """Shards this command cannot redraw (not made by the embedded generator, other version)."""


def template_parts(template: str) -> set[str]:
    """The parts a caption template states, e.g. {"crown", "wing"} for "the crown is {crown_c} ..."."""
    return {p for _, f, _, _ in string.Formatter().parse(template) if f for p in FIELD_PARTS[f]}


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


def draw_conditions(train: list[birds.Species], test: list[birds.Species], n: int,
                    seed: int) -> dict[str, tuple[list[dict], np.ndarray]]:
    """Per condition: ``n`` images' attributes and their (n, A) labels of the scored groups."""
    groups = caption_groups(birds.ATTRIBUTE_NAMES)
    out = {}
    for ci, cond in enumerate(CONDITIONS):
        rng = np.random.default_rng([seed, ci, 0xCE11])
        pool = test if cond == "test_species" else train
        if not pool:
            continue
        attrs, labels = [], []
        for _ in range(n):
            sp = pool[int(rng.integers(len(pool)))]
            a = birds.image_attributes(sp, bool(rng.random() < birds.MORPH_PROB))  # as a real image
            vec = birds.attribute_vector(a)
            if cond == "caption_faithful":
                t = birds._TEMPLATES[int(rng.integers(len(birds._TEMPLATES)))]
                caption = birds._caption(t, a, rng)
                a = random_parts(rng, {p: a[p] for p in template_parts(t)})
                vec = birds.attribute_vector(a) * stated_mask(caption, groups, len(vec))
            elif cond == "random":
                a = random_parts(rng)
                vec = birds.attribute_vector(a)
            attrs.append(a)
            labels.append(vec)
        out[cond] = (attrs, np.stack(labels).astype(np.uint8))
    return out


def shard_view(img: Image.Image, bbox, quality: int = 90) -> np.ndarray:
    """A drawn image as its shard holds it: the data set's JPEG (quality 90, as
    ``birds._render_species`` writes it), bbox crop to 76, the shard's JPEG (its 76.jpg),
    decoded as the evaluation reads it."""
    on_disk = Image.open(io.BytesIO(jpeg_bytes(img, 90))).convert("RGB")
    return decode_image(jpeg_bytes(cub.crop_resize(on_disk, bbox, (76,))[0], quality), 76)


def render(attrs: list[dict], seed: int, stream: int = 0, quality: int = 90) -> np.ndarray:
    """(N, 64, 64, 3) uint8: each bird drawn and seen as the judge sees a shard image
    (:func:`shard_view`, centre crop 64)."""
    out = [shard_view(*birds.draw_bird(a, np.random.default_rng([seed, stream, i, 0xD4A])), quality)
           for i, a in enumerate(attrs)]
    return center_crop(np.stack(out), 64)


def score(judge, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> tuple[float, list]:
    """(mean per-image share of the scored groups the judge sees, per judge group: the share
    of the images scored on it in which the judge sees it, None when none is)."""
    total, count = 0.0, 0
    hits_g, stated_g = torch.zeros(len(judge.groups)), torch.zeros(len(judge.groups))
    for lo in range(0, len(images), batch):
        logits, _ = judge(to_tensor(images[lo:lo + batch]))
        hits, stated = judge.group_hits(logits, labels[lo:lo + batch])
        s, c = share(hits.float().sum(1), stated.float().sum(1))
        total, count = total + s, count + c
        hits_g += hits.float().sum(0).cpu()
        stated_g += stated.float().sum(0).cpu()
    return total / max(count, 1), [float(h / s) if s else None for h, s in zip(hits_g, stated_g)]


def run(shards: str | Path, judge_path: str | Path, n: int = 1000, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    meta = load_metadata(shards)
    gen = meta.source.get("generator")
    if not isinstance(gen, dict) or gen.get("generator") != "stackgan.data.birds":
        raise CeilingError(f"{shards}: not made by the embedded bird generator (stackgan.data.birds; source "
                           f"kind {meta.source.get('kind')!r}); the ceiling redraws its species, so it needs "
                           "shards prepared from `python -m stackgan.data.birds`")
    if gen.get("version") != birds.GENERATOR_VERSION:
        raise CeilingError(f"{shards}: drawn by bird generator version {gen.get('version')}, this code is "
                           f"version {birds.GENERATOR_VERSION}; regenerate the set and its shards")
    if meta.attributes != birds.ATTRIBUTE_NAMES or "train" not in meta.splits:
        raise CeilingError(f"{shards}: no train split or other attributes than the embedded set's")
    if n < 1 or seed < 0:
        raise CeilingError(f"--n must be >= 1 and --seed >= 0, got {n} and {seed}")
    judge = load_judge(judge_path, attributes=meta.attributes)
    species = {s.class_id: s for s in birds.make_species(int(gen["species"]), int(gen["seed"]))}
    if not {c for s in meta.splits.values() for c in s.classes} <= species.keys():
        raise CeilingError(f"{shards}: class ids beyond the generator's {len(species)} species")
    split = lambda s: [species[c] for c in meta.splits[s].classes] if s in meta.splits else []  # noqa: E731
    quality = int(meta.source.get("jpeg_quality", 90))
    names = group_names(judge.attributes, judge.groups)
    res = {}
    for cond, (attrs, labels) in draw_conditions(split("train"), split("test"), n, seed).items():
        overall, per = score(judge, render(attrs, seed, CONDITIONS.index(cond), quality), labels)
        res[cond] = {"overall": overall, "groups": dict(zip(names, per)), "n": n}
    return {"shards": str(shards), "judge": str(judge_path), "n": n, "seed": seed, "generator": gen,
            "conditions": res, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.metrics.judge_ceiling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shards prepared from the embedded bird set")
    p.add_argument("--judge", default="", help="attribute judge file (default <shards>/judge.pt)")
    p.add_argument("--n", type=int, default=1000, help="images drawn per condition (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        rep = run(args.shards, args.judge or Path(args.shards) / "judge.pt", args.n, args.seed)
    except (ShardError, JudgeError, CeilingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    conds = rep["conditions"]
    print(f"judge ceiling on {args.shards}: {args.n} drawn images per condition, seed {args.seed}; "
          f"{rep['seconds']:.0f} s")
    print(f"{'group':24s}" + "".join(f"{c:>18s}" for c in conds))
    for g in next(iter(conds.values()))["groups"]:
        cells = [v["groups"][g] for v in conds.values()]
        print(f"{g.removeprefix('has_'):24s}" + "".join(f"{'-':>18s}" if c is None else f"{c:18.3f}"
                                                        for c in cells))
    print(f"{'overall':24s}" + "".join(f"{v['overall']:18.3f}" for v in conds.values()))
    if "caption_faithful" in conds:
        r = conds["caption_faithful"]["overall"] / max(conds["species"]["overall"], 1e-9)
        print(f"caption_faithful / species = {r:.3f} (about the best ratio_train of a caption-following "
              "generator)")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(rep, indent=1))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
