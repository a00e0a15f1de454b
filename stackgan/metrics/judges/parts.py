"""The part-wise judge: reads what a bird shows part by part, with no species to lean on.

Why: the species judge (:mod:`.species`) learns from real images, where parts always come in
a species' combination, so it reads a part partly from the rest of the bird. A drawing of
exactly what a caption states, with anything for the unstated parts, then scores only 75%
of a real image with it (``python -m stackgan.studies.judge_ceiling``), which mixes "draws
what the text says" with "draws the species the text implies". This judge is trained on
birds the embedded set's renderer draws with random, *independent* part combinations
(:func:`.redraw.render_random`, through the shards' JPEG + bbox crop path), so no part can
be guessed from another, and it has one head per attribute group: its ceiling is the text.

Network: the species judge's five conv blocks (16x16 after three, 8x8 after five). Each
group's head attends over the 16x16 positions of the two maps (the 8x8 one upsampled):
*where* is this part, then *which* value does the attended feature show. Trained with a
cross-entropy per group on random 64 crops + flips of the 76 px renders.

Only shards drawn by this version of the embedded generator can use it (the renderer and
the shards' JPEG quality are its training distribution). Its report gives per-group
accuracy on held-out renderer birds and on the shard set's real train and test images.

    python -m stackgan.metrics.judges train --shards shards/birds-cub-scale --kind parts
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stackgan.data.meta import load_metadata

from ..evalset import center_crop, load_split
from ..redraw import RedrawError, embedded_renderer, render_random
from .base import READABLE_MARGIN, Judge, JudgeError, conv_block, fit, score_real
from .rule import attribute_groups, group_names

KIND = "parts"
CROP = 64
STREAM_TRAIN, STREAM_VAL = 1, 2  # redraw RNG streams of the training and held-out birds
HOLDOUT_MOD = 10  # which training captions judge consistency scores (the species judge's rule)


class PartJudgeNet(nn.Module):
    """64x64 image -> (attribute logits (B, A), features (B, 16 * width)); one head per group.

    A head is an attention map over positions (one 1x1 conv output channel) and a linear
    classifier of the attended feature; all heads run as one batched product. Attributes
    of no group get a large negative logit."""

    kind = KIND

    def __init__(self, num_attributes: int, groups: list[list[int]], width: int = 16):
        super().__init__()
        w = width
        self.fine = nn.Sequential(*conv_block(3, w, 2), *conv_block(w, 2 * w, 2),
                                  *conv_block(2 * w, 4 * w, 1))  # 16x16
        self.coarse = nn.Sequential(*conv_block(4 * w, 4 * w, 2), *conv_block(4 * w, 8 * w, 1))  # 8x8
        channels, longest = 12 * w, max(len(g) for g in groups)
        self.where = nn.Conv2d(channels, len(groups), 1)
        self.what = nn.Parameter(torch.randn(len(groups), channels, longest) / channels ** 0.5)
        self.what_bias = nn.Parameter(torch.zeros(len(groups), longest))
        slots = torch.full((len(groups), longest), -1, dtype=torch.long)  # head g, output v -> attribute
        for g, idx in enumerate(groups):
            slots[g, :len(idx)] = torch.tensor(idx)
        self.register_buffer("slots", slots, persistent=False)
        self.num_attributes, self.groups, self.width = num_attributes, [list(g) for g in groups], width
        self.feature_dim = 16 * w

    def config(self) -> dict:
        return {"num_attributes": self.num_attributes, "groups": self.groups, "width": self.width}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = self.fine(x)
        coarse = self.coarse(fine)
        up = F.interpolate(coarse, scale_factor=2, mode="nearest")
        h = torch.cat([fine, up], 1).flatten(2)  # (B, C, P)
        where = self.where.weight.flatten(1) @ h + self.where.bias[:, None]  # (B, G, P)
        attended = torch.bmm(where.softmax(-1), h.transpose(1, 2))  # (B, G, C)
        values = torch.einsum("bgc,gcv->bgv", attended, self.what) + self.what_bias  # (B, G, V)
        used = self.slots >= 0
        logits = values.new_full((len(x), self.num_attributes), -1e4)
        logits = logits.index_copy(1, self.slots[used], values[:, used])
        return logits, torch.cat([coarse.mean((2, 3)), coarse.amax((2, 3))], 1)


@dataclass
class PartJudgeReport:
    n_render: int  # rendered training birds
    n_val: int  # held-out rendered birds
    steps: int
    batch_size: int
    seconds_render: float
    seconds_train: float
    seconds: float  # all of it, evaluation included
    val: float  # mean per-bird share of the scored groups seen, held-out renderer birds
    real_train: float  # the same on the shard set's real training images (all groups each)
    real_test: float  # ... and on its real test images (unseen species)
    majority_val: float  # always guessing each group's most frequent training value
    shuffled_real_test: float  # real test images against other images' attributes
    random_real_test: float  # uniform-noise images against the test images' attributes
    per_group_val: dict  # group -> accuracy (argmax is the true value) on held-out renderer birds
    per_group_real_train: dict
    per_group_real_test: dict
    per_group_majority_val: dict
    dropped_groups: list  # no better than the majority guess + READABLE_MARGIN on held-out birds
    real_shards: str  # the shard set the real-image figures come from


@dataclass(frozen=True)
class Budget:
    images: int  # rendered training birds
    steps: int  # optimizer updates
    batch_size: int
    lr: float  # peak learning rate (one-cycle)


FULL = Budget(16000, 2400, 64, 2e-3)  # a CUB-sized set: minutes; every group >= 0.95
QUICK = Budget(2000, 320, 32, 3e-3)  # a small set such as the demo's: well under a minute on two cores


def default_budget(n_train_images: int) -> Budget:
    """The judge does not learn from the shards, so its size is a time budget: the full judge
    for a CUB-sized set (9000 training images), a short one for a small set (the demo's 600)."""
    return FULL if n_train_images >= 3000 else QUICK


def train_part_judge(
    shards: str,
    *,
    images: int = 0,
    steps: int = 0,
    batch_size: int = 0,
    lr: float = 0.0,
    width: int = 16,
    val_images: int = 0,
    seed: int = 0,
    workers: int | None = None,
    device: str | torch.device = "cpu",
    log=print,
) -> Judge:
    """Train a part-wise judge for the embedded shard set ``shards`` (see the module docstring).
    ``images``, ``steps``, ``batch_size``, ``lr`` of 0 take :func:`default_budget`'s;
    ``val_images`` of 0: a tenth of the rendered birds (at least 500)."""
    t0 = time.perf_counter()
    meta = load_metadata(shards)
    try:
        renderer = embedded_renderer(meta)
    except RedrawError as e:
        raise JudgeError(f"the part-wise judge learns from the embedded renderer's birds: {e}; "
                         "on other shards use the species judge (--judge species)") from e
    budget = default_budget(meta.splits["train"].num_samples if "train" in meta.splits else 0)
    images, steps, lr = images or budget.images, steps or budget.steps, lr or budget.lr
    batch_size = batch_size or budget.batch_size
    val_images = val_images or max(500, images // 10)
    if min(images, steps, batch_size, width, val_images) <= 0 or lr <= 0:
        raise JudgeError("images, steps, batch_size, width, val_images and lr must be > 0")
    log(f"part judge: rendering {images} + {val_images} birds with random part combinations")
    x_tr, y_tr = render_random(images, seed, STREAM_TRAIN, renderer.jpeg_quality, workers)
    x_val, y_val = render_random(val_images, seed, STREAM_VAL, renderer.jpeg_quality, workers)
    t_render = time.perf_counter() - t0
    groups = attribute_groups(meta.attributes, y_tr)
    freq = y_tr.astype(np.float64).mean(0)
    prior = torch.tensor(np.log(np.clip(freq, 1e-4, 1.0)), dtype=torch.float32)
    torch.manual_seed(seed)
    net = PartJudgeNet(len(meta.attributes), groups, width).to(device)
    t1 = time.perf_counter()
    x = torch.from_numpy(x_tr).permute(0, 3, 1, 2).contiguous()
    fit(net, x, torch.from_numpy(y_tr.astype(np.float32)), groups, steps, batch_size, lr,
         torch.Generator().manual_seed(seed), device, log)
    t_train = time.perf_counter() - t1
    judge = Judge(net, list(meta.attributes), groups, HOLDOUT_MOD, prior)
    judge.trained_on = renderer.identity()
    val = score_real(judge, center_crop(x_val, CROP), y_val)
    names = group_names(judge.attributes, groups)
    readable = [g for g, nm in zip(groups, names)
                if val["groups"][nm] >= val["groups_major"][nm] + READABLE_MARGIN]
    dropped = [nm for g, nm in zip(groups, names) if g not in readable] if readable else []
    if dropped:
        log(f"part judge: dropping groups it cannot read on held-out renderer birds: {', '.join(dropped)}")
        judge.groups = readable
        val = score_real(judge, center_crop(x_val, CROP), y_val)
    real = {s: load_split(meta, s, image=76) for s in ("train", "test") if s in meta.splits}
    scores = {s: score_real(judge, d.img, d.attr) for s, d in real.items()}
    test = scores.get("test")
    noise = np.random.default_rng(seed).integers(0, 256, size=(512, CROP, CROP, 3), dtype=np.uint8)
    rnd = score_real(judge, noise, real["test"].attr[np.arange(512) % len(real["test"])]) if test else None
    nan = float("nan")
    judge.report = PartJudgeReport(
        n_render=images, n_val=val_images, steps=steps, batch_size=batch_size,
        seconds_render=round(t_render, 1), seconds_train=round(t_train, 1),
        seconds=round(time.perf_counter() - t0, 1), val=val["own"],
        real_train=scores["train"]["own"] if "train" in scores else nan,
        real_test=test["own"] if test else nan, majority_val=val["major"],
        shuffled_real_test=test["shuf"] if test else nan, random_real_test=rnd["own"] if rnd else nan,
        per_group_val=val["groups"],
        per_group_real_train=scores["train"]["groups"] if "train" in scores else {},
        per_group_real_test=test["groups"] if test else {}, per_group_majority_val=val["groups_major"],
        dropped_groups=dropped, real_shards=str(shards),
    )
    return judge


def format_report(r: PartJudgeReport) -> str:
    """A part-wise judge's training report, for people."""
    def row(d: dict) -> str:
        return ", ".join(f"{k.removeprefix('has_')} {v:.3f}" for k, v in d.items())

    return (f"part-wise judge: {r.n_render} rendered birds, {r.steps} steps of {r.batch_size}; "
            f"{r.seconds:.0f} s ({r.seconds_render:.0f} s rendering, {r.seconds_train:.0f} s training)\n"
            f"held-out renderer birds {r.val:.3f} (majority guess {r.majority_val:.3f}); real images of "
            f"{r.real_shards}: training species {r.real_train:.3f}, unseen test species {r.real_test:.3f} "
            f"(shuffled {r.shuffled_real_test:.3f}, noise images {r.random_real_test:.3f})\n"
            f"per group, held-out renderer birds: {row(r.per_group_val)}\n"
            f"per group, real training images: {row(r.per_group_real_train)}\n"
            f"per group, real test images: {row(r.per_group_real_test)}"
            + (f"\nnot scored (no better than the majority guess + {READABLE_MARGIN} on held-out birds): "
               + ", ".join(r.dropped_groups) if r.dropped_groups else ""))
