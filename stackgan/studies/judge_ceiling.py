"""The judge's ceiling for a caption-following generator (embedded bird set only).

Why: a judge trained on real images of the training species (the ``species`` judge) sees
parts only in species combinations, so it reads a part partly from the rest of the bird.
A caption states 2-4 attributes; a generator that draws exactly those and anything for the
rest is then scored below real images even when it draws every stated part perfectly.
This command measures that for any judge with the data set's own renderer: it redraws
birds (``birds.draw_bird``, through the shards' JPEG + bbox crop + centre crop path,
:mod:`stackgan.metrics.redraw`) and scores them with the judge's rule (mean per-image share of the scored
groups, as judge consistency does) under four conditions:

* ``species``: a training species' own attributes (like a real training image);
* ``caption_faithful``: what a training caption states (a real caption template filled in
  with a training image's attributes), every unstated part drawn at random under the
  generator's constraints; scored on the groups the caption states
  (:func:`stackgan.data.captions.stated_mask`, as judge consistency does);
* ``random``: random part combinations, every group scored;
* ``test_species``: the unseen test species' own attributes;

next to the reference judge consistency divides by, the shard set's real images scored on
the groups their captions state (``real_train``: the judge's held-out training images,
``real_test``: the unseen species; each image against each of its captions). With the
species judge, training-caption consistency above ``caption_faithful`` needs the generator
to draw the species the caption implies; the part-wise judge (the default) is built so that
``caption_faithful`` and ``real_train`` agree.

    python -m stackgan.studies.judge_ceiling --shards shards/birds-cub-scale --n 1000 [--judge species]
"""
from __future__ import annotations

import argparse
import json
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stackgan.data import birds
from stackgan.data.meta import ShardError, ShardMeta, load_metadata
from stackgan.errors import StackGANError
from stackgan.data.captions import caption_groups, caption_scope, stated_mask
from stackgan.metrics.evalset import is_holdout, load_split, to_tensor
from stackgan.metrics.judges import JudgeError, choose_judge, group_names, load_judge, share
from stackgan.metrics.redraw import RedrawError, embedded_renderer, random_parts, render

CONDITIONS = ("species", "caption_faithful", "random", "test_species")
REAL = ("real_train", "real_test")  # the shards' real images, scored on their captions' groups
# template field -> the parts it states (birds.fill_caption); "wings" names the pattern (no word: solid)
# and "bill" its length (no word: about the head's length, i.e. a dagger bill)
FIELD_PARTS = {"crown": ("crown",), "crown_c": ("crown",), "wings": ("wing", "wing_pattern"),
               "wing_c": ("wing",), "belly": ("belly",), "belly_c": ("belly",), "back": ("back",),
               "back_c": ("back",), "tail": ("tail",), "tail_c": ("tail",),
               "bill": ("bill_color", "bill_shape", "bill_length"), "size": ("size",), "size_a": ("size",)}
PART_GROUP = {**birds.COLOR_GROUPS, "bill_shape": "has_bill_shape", "bill_length": "has_bill_length",
              "wing_pattern": "has_wing_pattern", "size": "has_size"}


class CeilingError(StackGANError, RuntimeError):
    """Bad arguments, or shards whose classes or splits the generator's species do not cover."""


def template_parts(template: str) -> set[str]:
    """The parts a caption template states, e.g. {"crown", "wing"} for "the crown is {crown_c} ..."."""
    return {p for _, f, _, _ in string.Formatter().parse(template) if f for p in FIELD_PARTS[f]}


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
                t = birds.TEMPLATES[int(rng.integers(len(birds.TEMPLATES)))]
                caption = birds.fill_caption(t, a, rng)
                a = random_parts(rng, {p: a[p] for p in template_parts(t)})
                vec = birds.attribute_vector(a) * stated_mask(caption, groups, len(vec))
            elif cond == "random":
                a = random_parts(rng)
                vec = birds.attribute_vector(a)
            attrs.append(a)
            labels.append(vec)
        out[cond] = (attrs, np.stack(labels).astype(np.uint8))
    return out


def logits_of(judge, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """The judge's logits for (N, 64, 64, 3) uint8 images, batched, on the CPU."""
    return torch.cat([judge(to_tensor(images[lo:lo + batch]))[0].cpu()
                      for lo in range(0, len(images), batch)])


def score_logits(judge, logits: torch.Tensor, labels: np.ndarray) -> tuple[float, list]:
    """(mean per-image share of the scored groups the judge sees, per judge group: the share
    of the images scored on it in which the judge sees it, None when none is)."""
    hits, stated = judge.group_hits(logits, labels)
    total, count = share(hits.float().sum(1), stated.float().sum(1))
    hits_g, stated_g = hits.float().sum(0), stated.float().sum(0)
    return total / max(count, 1), [float(h / s) if s else None for h, s in zip(hits_g, stated_g)]


def score(judge, images: np.ndarray, labels: np.ndarray, batch: int = 256) -> tuple[float, list]:
    """:func:`score_logits` of ``images`` against their ``labels``."""
    return score_logits(judge, logits_of(judge, images, batch), labels)


def score_real(judge, meta: ShardMeta, split: str) -> tuple[float, list, int]:
    """The shard set's real ``split`` images (training: the judge's held-out keys), each scored
    against each of its captions' stated groups, as judge consistency scores ``real_*``:
    (overall, per group, number of images)."""
    select = (lambda k: is_holdout(k, judge.holdout_mod)) if split == "train" and judge.holdout_mod else None
    data = load_split(meta, split, image=76, select=select)
    n, c = data.emb.shape[:2]
    labels = data.attr[:, None, :] * caption_scope(data.captions, meta.attributes)  # (N, C, A)
    logits = logits_of(judge, data.img).repeat_interleave(c, 0)
    return (*score_logits(judge, logits, labels.reshape(n * c, -1).astype(np.uint8)), n)


def run(shards: str | Path, judge: str = "", n: int = 1000, seed: int = 0) -> dict:
    """The ceiling report for the judge ``judge`` selects (a kind or a file, see
    :func:`stackgan.metrics.judges.choose_judge`) on the embedded shard set ``shards``."""
    t0 = time.perf_counter()
    meta = load_metadata(shards)
    renderer = embedded_renderer(meta)
    if "train" not in meta.splits:
        raise CeilingError(f"{shards}: no train split")
    if n < 1 or seed < 0:
        raise CeilingError(f"--n must be >= 1 and --seed >= 0, got {n} and {seed}")
    judge_path = choose_judge(shards, judge, meta).path
    j = load_judge(judge_path, attributes=meta.attributes)
    species = renderer.make_species()
    if not {c for s in meta.splits.values() for c in s.classes} <= species.keys():
        raise CeilingError(f"{shards}: class ids beyond the generator's {len(species)} species")
    split = lambda s: [species[c] for c in meta.splits[s].classes] if s in meta.splits else []  # noqa: E731
    names = group_names(j.attributes, j.groups)
    res = {}
    for cond, (attrs, labels) in draw_conditions(split("train"), split("test"), n, seed).items():
        overall, per = score(j, render(attrs, seed, CONDITIONS.index(cond), renderer.jpeg_quality), labels)
        res[cond] = {"overall": overall, "groups": dict(zip(names, per)), "n": n}
    for cond in REAL:
        if cond.removeprefix("real_") in meta.splits:
            overall, per, count = score_real(j, meta, cond.removeprefix("real_"))
            res[cond] = {"overall": overall, "groups": dict(zip(names, per)), "n": count}
    return {"shards": str(shards), "judge": str(judge_path), "kind": j.kind, "n": n, "seed": seed,
            "generator": meta.source.get("generator"), "conditions": res,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.studies.judge_ceiling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shards prepared from the embedded bird set")
    p.add_argument("--judge", default="", help="parts, species, or a judge file (default: parts, "
                                               "<shards>/judge-parts.pt)")
    p.add_argument("--n", type=int, default=1000, help="images drawn per condition (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        rep = run(args.shards, args.judge, args.n, args.seed)
    except (ShardError, JudgeError, CeilingError, RedrawError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    conds = rep["conditions"]
    print(f"judge ceiling on {args.shards} for the {rep['kind']} judge {rep['judge']}: {args.n} drawn "
          f"images per condition, seed {args.seed}; {rep['seconds']:.0f} s")
    print(f"{'group':24s}" + "".join(f"{c:>18s}" for c in conds))
    for g in next(iter(conds.values()))["groups"]:
        cells = [v["groups"][g] for v in conds.values()]
        print(f"{g.removeprefix('has_'):24s}" + "".join(f"{'-':>18s}" if c is None else f"{c:18.3f}"
                                                        for c in cells))
    print(f"{'overall':24s}" + "".join(f"{v['overall']:18.3f}" for v in conds.values()))
    if "caption_faithful" in conds and "real_train" in conds:
        r = conds["caption_faithful"]["overall"] / max(conds["real_train"]["overall"], 1e-9)
        print(f"caption_faithful / real_train = {r:.3f} (about the best ratio_train of a caption-following "
              "generator)")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(rep, indent=1))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
