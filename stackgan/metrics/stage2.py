"""Stage-II metrics: does stage II add anything to its own stage-I input?

Every figure puts a stage-II generator's 256-px images next to the stage-I images they
were refined from (``G.low_res(emb, z)``: same captions, same noise, same CA-Net noise) and
next to those upsampled bicubically to 256 px, the baseline stage II must beat:

* ``stage2_consistency``: judge consistency (:mod:`.scores`; the judge sees 64 px, so the
  256-px images are area-resized to it) of stage II (``train``, ``test``: the same numbers as
  ``judge_consistency``), of its stage-I input (``stage1_*``) and of that upsampled
  (``upsampled_*``), next to real images (``real_*``); ``gain_*`` = stage II - upsampled.
* ``stage2_fd``: judge-feature Frechet distance to real images of the same three.
* ``fd256``: Frechet distance to real 256-px test crops in the features of the detail net
  (:mod:`.detail`), which sees 256 px and is trained to tell how much detail an image
  holds: stage II (``stage2``), its upsampled input (``upsampled``), real train crops
  (``floor``) and real test crops reduced to 64 px and upsampled (``real_upsampled``, the
  level of upsampling real birds); the net's effective-resolution reading (``resolution_*``).
* ``sharpness``: spectral power above what a 64-px image holds, as a ratio to real crops
  (:func:`.detail.hf_share`): stage II, its upsampled input, and real crops upsampled.

One generation serves them all: per split, each batch of stage-II images and their
stage-I inputs is made once and every figure the call's metrics need is accumulated from
it (shared pass :class:`StageImages`); its stage-II judge tally is kept as the
``judge_consistency`` / ``judge_fd`` pass of the same call (:class:`.scores.JudgeImages`: the
very images those make; list the stage-II metrics first, as ``stackgan.evaluate`` does). Items and noise are
those of the judge metrics (``ctx.judge_samples`` per split, from the test split for the
256-px figures). All four refuse a stage-I generator before any work.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .core import EvalContext, MetricError, generate, register, requirement
from .detail import (CUTOFF, LOW, DetailFile, ImageSums, RealReference, ensure_detail_net, fd, real_reference,
                     upsample)
from .judges import Judge, ensure_judge
from .scores import TAGS, JudgeImages, JudgeTally, draw_items, judge_items, mean_of, real_pass, split_data
from .stats import frechet_distance

VIEWS = ("stage2", "stage1", "upsampled")  # stage II, its stage-I input, that upsampled bicubically
_JUDGE_READERS = {"stage2_consistency", "stage2_fd", "judge_consistency", "judge_fd"}  # read the judge pass
_IMAGE_READERS = {"fd256", "sharpness"}  # read the 256-px figures of the test split


def _planned(ctx: EvalContext, asking: str) -> set[str]:
    """The metrics of the running ``compute`` call (and the one asking): what a pass should feed."""
    readers = _JUDGE_READERS | _IMAGE_READERS
    return {m for m in readers if ctx.passes is not None and ctx.passes.asks(m)} | {asking}


@requirement("stage2")
def check_stage2(ctx: EvalContext) -> None:
    """Stage-II metrics need a 256-px (stage-II) generator."""
    if ctx.image_size != 256:
        raise MetricError(f"stage-II metrics compare a stage-II generator's 256px images with its "
                          f"stage-I input; this generator makes {ctx.image_size}px images (stage I): "
                          "evaluate a stage-II export, or leave the stage-II metrics out")


def _check_generator(G: nn.Module, asking: str) -> None:
    if not callable(getattr(G, "low_res", None)):
        raise MetricError(f"{asking}: the generator ({type(G).__name__}) has no low_res(emb, z), the stage-I "
                          "image it refines; stage-II metrics need a stage-II generator (Stage2G)")


def stage_batches(G: nn.Module, ctx: EvalContext, emb: np.ndarray, tag: int,
                  captions: list[str] | None = None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """This rank's ``(lo, hi, stage-II images, their stage-I inputs)`` for ``emb`` (whose texts
    are ``captions``). Both come from :func:`generate` with the same tag, so the same noise and
    CA-Net seeds: the stage-I images are exactly the ones G refined (its ``forward`` draws
    ``low_res`` first)."""
    low_ctx = dataclasses.replace(ctx, image_size=LOW, progress=False)  # shares ctx.cache; one bar
    stage1 = generate(G.low_res, low_ctx, emb, tag, captions=captions)
    both = generate(G, ctx, emb, tag, what="stage II and its input", captions=captions)
    for (lo, hi, high), (_, _, low) in zip(both, stage1):
        yield lo, hi, high, low


@dataclass
class StagePass:
    """What one generation over a split's items gave."""

    judge: dict[str, dict] | None  # view -> JudgeTally result, when the judge was run
    images: dict[str, ImageSums] | None  # "stage2", "upsampled" -> 256-px sums (test split)

    def serves(self, judge: bool, images: bool, detail: bool) -> bool:
        return ((not judge or self.judge is not None) and (not images or self.images is not None)
                and (not detail or (self.images is not None and self.images["stage2"].feats is not None)))


@dataclass(frozen=True)
class StageImages:
    """Shared-pass key: one generation over a split's items feeding the stage-II figures
    (:class:`StagePass`)."""

    split: str


def _stage_pass(G: nn.Module, ctx: EvalContext, split: str, asking: str) -> StagePass:
    """One generation over a split's items, feeding every stage-II figure the call needs
    (shared in a call; a narrower pass made earlier is replaced)."""
    planned = _planned(ctx, asking)
    want_judge = bool(planned & _JUDGE_READERS) and bool(ctx.meta.attributes)
    want_images = split == "test" and bool(planned & _IMAGE_READERS)
    want_detail = want_images and "fd256" in planned
    key = StageImages(split)
    found = ctx.passes.find(key) if ctx.passes is not None else None
    if found is not None and found.serves(want_judge, want_images, want_detail):
        return found
    judge: Judge | None = ensure_judge(ctx) if want_judge else None
    net: DetailFile | None = ensure_detail_net(ctx) if want_detail else None
    if judge is not None:
        items = judge_items(ctx, judge, split)
        emb, texts = items.emb, items.captions
        tallies = {v: JudgeTally(judge, items) for v in VIEWS}
    else:  # the same items judge_items would give (the test split does not depend on the judge)
        data = split_data(ctx, split)
        sample, cap, _ = draw_items(data, ctx.judge_samples, ctx.seed, TAGS[split])
        emb, tallies = data.emb[sample, cap], {}
        texts = data.texts(sample, cap)
    sums = {v: ImageSums(net) for v in ("stage2", "upsampled")} if want_images else {}
    for lo, hi, high, low in stage_batches(G, ctx, emb, TAGS[split], texts):
        up = upsample(low)
        for view, img in (("stage2", high), ("stage1", low), ("upsampled", up)):
            if view in tallies:
                tallies[view].add(img, lo, hi)
            if view in sums:
                sums[view].add(img)
    result = StagePass({v: t.result() for v, t in tallies.items()} if tallies else None,
                       {v: s.reduce() for v, s in sums.items()} if sums else None)
    if result.judge is not None and ctx.passes is not None and ctx.passes.find(JudgeImages(split)) is None:
        ctx.passes.keep(JudgeImages(split), result.judge["stage2"])  # the images judge_consistency makes
    return ctx.passes.keep(key, result) if ctx.passes is not None else result


def _real_reference(ctx: EvalContext, asking: str) -> RealReference:
    """Real 256-px figures (independent of G, cached on the context); with the detail net
    when the call runs ``fd256``. The floor's train crops: ``ctx.judge_samples`` of them, as
    many as generated images, so both distances carry the same sample-size bias."""
    with_net = "fd256" in _planned(ctx, asking)
    ref = ctx.cache.get("stage2_real")
    if ref is None or (with_net and ref.train is None):
        net = ensure_detail_net(ctx) if with_net else None
        ref = real_reference(ctx.meta, net, ctx.batch_size, ctx.judge_samples)
        ctx.cache["stage2_real"] = ref
    return ref


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------
@register("stage2_consistency", requires=("attributes", "stage2"))
def stage2_consistency(G, ctx: EvalContext) -> dict:
    _check_generator(G, "stage2_consistency")
    judge = ensure_judge(ctx)
    out: dict = {}
    for split in ("train", "test"):
        views = _stage_pass(G, ctx, split, "stage2_consistency").judge
        real = real_pass(ctx, judge, split)["acc"]
        out[split] = mean_of(views["stage2"]["acc"], "own")
        for view in ("stage1", "upsampled"):
            out[f"{view}_{split}"] = mean_of(views[view]["acc"], "own")
        out[f"real_{split}"] = mean_of(real, "own")
        out[f"gain_{split}"] = out[split] - out[f"upsampled_{split}"]
        out[f"n_{split}"] = int(views["stage2"]["acc"]["own_n"])
    return out


@register("stage2_fd", requires=("attributes", "stage2"))
def stage2_fd(G, ctx: EvalContext) -> dict:
    _check_generator(G, "stage2_fd")
    judge = ensure_judge(ctx)
    out: dict = {}
    for split in ("test", "train"):
        views = _stage_pass(G, ctx, split, "stage2_fd").judge
        real = real_pass(ctx, judge, split)["feats"].mean_cov()
        for view in VIEWS:
            name = split if view == "stage2" else f"{view}_{split}"
            out[name] = frechet_distance(*views[view]["feats"].mean_cov(), *real)
    return out


@register("fd256", requires=("stage2",))
def fd256(G, ctx: EvalContext) -> dict:
    _check_generator(G, "fd256")
    gen = _stage_pass(G, ctx, "test", "fd256").images
    ref = _real_reference(ctx, "fd256")
    return {
        "stage2": fd(gen["stage2"], ref.test), "upsampled": fd(gen["upsampled"], ref.test),
        "floor": fd(ref.train, ref.test), "real_upsampled": fd(ref.test_upsampled, ref.test),
        "resolution_stage2": gen["stage2"].mean("resolution"),
        "resolution_upsampled": gen["upsampled"].mean("resolution"),
        "resolution_real": ref.test.mean("resolution"),
        "resolution_real_upsampled": ref.test_upsampled.mean("resolution"),
        "n_gen": gen["stage2"].n, "n_real": ref.test.n, "n_floor": ref.train.n,
    }


@register("sharpness", requires=("stage2",))
def sharpness(G, ctx: EvalContext) -> dict:
    _check_generator(G, "sharpness")
    gen = _stage_pass(G, ctx, "test", "sharpness").images
    ref = _real_reference(ctx, "sharpness")
    real = ref.test.mean("hf")
    return {
        "stage2": gen["stage2"].mean("hf") / real, "upsampled": gen["upsampled"].mean("hf") / real,
        "real_upsampled": ref.test_upsampled.mean("hf") / real,
        "hf_real": real, "hf_stage2": gen["stage2"].mean("hf"), "cutoff": CUTOFF,
        "n_gen": gen["stage2"].n, "n_real": ref.test.n,
    }
