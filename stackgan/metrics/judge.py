"""Attribute judge: a small CNN that says which CUB-format attributes an image shows.

Trained on a shard set's *real* images (train split, minus a fixed held-out 1-in-``holdout``
subset of keys) to predict the per-image attribute labels (``attr.npy``), it then scores
generated images against the attributes of the caption they were generated from.

Scoring rule (:func:`attribute_hits`). Attribute names are ``group::value``
(``has_wing_color::blue``). For each *group* the caption states (at least one positive
label), the judge "sees" it when its highest-scoring value in that group is one of the
stated values; a group of a single attribute is seen when its logit is > 0. An image's
score is the share of its stated groups the judge sees. Only informative groups count:
those with at least two values present in the judge's training labels, and that the
trained judge reads on real test images (unseen species) at least ``READABLE_MARGIN``
better than always guessing the most frequent value (e.g. the embedded set's bird size
is normalised away by the bounding-box crop, so no image shows it). Predicting
everything at once cannot game the rule, and its chance level is about 1 / values.

``python -m stackgan.metrics.judge train --shards DIR [--out PATH]`` trains and caches a
judge (atomic write) and reports its score on held-out real images of the train split and
on the real test images (unseen species).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stackgan.data.meta import ShardError, ShardMeta, load_metadata

from .core import EvalContext, MetricError, barrier, rank_world, resize
from .evalset import center_crop, is_holdout, load_split, to_tensor

FORMAT = "stackgan-judge/1"
JUDGE_SIZE = 64  # input side; real images are 64 crops of the 76px shard images
MIN_STEPS = 300  # default training length floor (a CUB-sized set: 6 epochs = ~380 steps)
READABLE_MARGIN = 0.1  # a group counts only if the judge beats the majority guess by this on real test images


class JudgeError(RuntimeError):
    """A judge file that is missing, of another format, or made for other attributes."""


# --------------------------------------------------------------------------------------
# Network and scoring rule
# --------------------------------------------------------------------------------------
def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class JudgeNet(nn.Module):
    """64x64 image -> (attribute logits, features).

    Five 3x3 conv blocks down to an 8x8 map, a 1x1 conv giving one evidence map per
    attribute, and a smooth maximum over positions: "is there a red crown *somewhere*".
    Detecting parts locally generalises to unseen species far better than a head on the
    flattened map, which learns species templates (measured on the CUB-scale embedded
    set: 0.57 vs 0.45 on the unseen test species). Features (for ``judge_fd``): the mean
    and max over positions of the last block (``16 * width`` values)."""

    def __init__(self, num_attributes: int, width: int = 16, temperature: float = 4.0):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_block(3, w, 2),  # 32
            *_block(w, 2 * w, 2),  # 16
            *_block(2 * w, 4 * w, 1),
            *_block(4 * w, 4 * w, 2),  # 8
            *_block(4 * w, 8 * w, 1),
        )
        self.drop = nn.Dropout2d(0.1)
        self.head = nn.Conv2d(8 * w, num_attributes, 1)
        self.temperature = temperature
        self.feature_dim = 16 * w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        maps = self.head(self.drop(h)).flatten(2)  # (B, A, positions)
        t = self.temperature
        logits = (torch.logsumexp(maps * t, dim=2) - math.log(maps.shape[2])) / t
        return logits, torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


def judge_loss(logits: torch.Tensor, labels: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Soft cross-entropy within each multi-value group (the positives share the target;
    rows stating nothing in the group are skipped) and BCE for single-attribute groups.
    Cross-entropy trains exactly the decision the scoring rule takes (argmax in a group)."""
    terms = []
    for idx in groups:
        t = labels[:, idx]
        if len(idx) == 1:
            terms.append(F.binary_cross_entropy_with_logits(logits[:, idx], t))
            continue
        s = t.sum(1, keepdim=True)
        ok = s[:, 0] > 0
        if ok.any():
            lp = torch.log_softmax(logits[:, idx], 1)
            terms.append(-((t / s.clamp(min=1)) * lp).sum(1)[ok].mean())
    return torch.stack(terms).mean()


def attribute_groups(names: list[str], labels: np.ndarray) -> list[list[int]]:
    """Indices of each informative ``group::value`` group (see the module docstring)."""
    by: OrderedDict[str, list[int]] = OrderedDict()
    for i, n in enumerate(names):
        by.setdefault(n.split("::", 1)[0] if "::" in n else n, []).append(i)
    present = labels.reshape(-1, len(names)).astype(bool).any(0)
    rate = labels.reshape(-1, len(names)).astype(bool).mean(0) if len(labels) else np.zeros(len(names))
    keep = []
    for idx in by.values():
        if len(idx) > 1 and present[idx].sum() >= 2:
            keep.append(idx)
        elif len(idx) == 1 and 0 < rate[idx[0]] < 1:
            keep.append(idx)
    return keep


def group_hits(logits: torch.Tensor, attrs: torch.Tensor,
               groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and group, (B, G) bool: (the judge sees the group, the group is stated)."""
    lab_all = attrs.to(logits.device) > 0
    hits, stated = [], []
    for idx in groups:
        lab = lab_all[:, idx]
        st = lab.any(1)
        if len(idx) > 1:
            pred = logits[:, idx].argmax(1, keepdim=True)
            hit = lab.gather(1, pred).squeeze(1)
        else:
            hit = (logits[:, idx[0]] > 0) & lab[:, 0]
        hits.append(hit & st)
        stated.append(st)
    return torch.stack(hits, 1), torch.stack(stated, 1)


def attribute_hits(logits: torch.Tensor, attrs: torch.Tensor,
                   groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (number of stated groups the judge sees, number of stated groups)."""
    hits, stated = group_hits(logits, attrs, groups)
    return hits.float().sum(1), stated.float().sum(1)


def share(hits: torch.Tensor, stated: torch.Tensor) -> tuple[float, int]:
    """(sum over images of hits/stated, number of images with something stated)."""
    m = stated > 0
    return float((hits[m] / stated[m]).sum()), int(m.sum())


# --------------------------------------------------------------------------------------
# The judge object
# --------------------------------------------------------------------------------------
@dataclass
class JudgeReport:
    n_train: int
    n_holdout: int
    n_test: int
    steps: int
    epochs: float  # passes over the training images
    seconds: float
    holdout: float  # mean score on held-out real train-split images (own captions' attributes)
    test: float  # same on real test images (unseen species)
    majority_holdout: float  # always guessing each group's most frequent training value
    majority_test: float
    shuffled_test: float  # real test images scored against other images' attributes
    random_test: float  # uniform-noise images scored against the test images' attributes
    per_group_test: dict  # group name -> share of real test images whose group the judge sees
    per_group_majority_test: dict  # the same for the majority guess
    dropped_groups: list  # groups scored no better than the majority guess + margin: not used


class Judge:
    def __init__(self, net: JudgeNet, attributes: list[str], groups: list[list[int]], holdout_mod: int,
                 prior: torch.Tensor, report: JudgeReport | None = None, width: int = 16):
        self.net = net.eval()
        self.attributes = attributes
        self.groups = groups
        self.holdout_mod = holdout_mod
        self.prior = prior  # (A,) log-frequency logits: the majority baseline
        self.report = report
        self.width = width
        self.trained_on: dict = {}  # the shard set it was trained on (root, encoder, fingerprint)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> "Judge":
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B,3,H,W) in [-1,1], any square size -> (logits, features) on the judge's device."""
        self.net.eval()
        x = resize(images.to(self.device, torch.float32), JUDGE_SIZE)
        return self.net(x)

    def hits(self, logits: torch.Tensor,
             attrs: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen, stated) group counts per image, see :func:`attribute_hits`."""
        return attribute_hits(logits, torch.as_tensor(np.asarray(attrs)), self.groups)

    def group_hits(self, logits: torch.Tensor,
                   attrs: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen, stated) per image and group, see :func:`group_hits`."""
        return group_hits(logits, torch.as_tensor(np.asarray(attrs)), self.groups)

    def save(self, path: str | Path, meta: ShardMeta | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "width": self.width,
            "temperature": self.net.temperature,
            "attributes": self.attributes,
            "groups": self.groups,
            "holdout_mod": self.holdout_mod,
            "prior": self.prior.cpu(),
            "report": asdict(self.report) if self.report else None,
            "shards": ({"root": str(meta.root), "encoder": meta.encoder, "source": meta.source,
                        "fingerprint": fingerprint(meta)} if meta else None),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path


def load_judge(path: str | Path, device: str | torch.device = "cpu",
               attributes: list[str] | None = None) -> Judge:
    """Load a judge file; with ``attributes``, refuse one trained for other attribute names."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(
            f"judge not found: {path} (train one: python -m stackgan.metrics.judge train --shards DIR)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise JudgeError(f"{path}: cannot read judge file ({e})") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise JudgeError(f"{path}: not a {FORMAT} file")
    if attributes is not None and list(attributes) != list(d["attributes"]):
        raise JudgeError(
            f"{path}: judge was trained for {len(d['attributes'])} other attributes than the shards' "
            f"{len(attributes)}; train a judge on these shards (python -m stackgan.metrics.judge train)"
        )
    net = JudgeNet(len(d["attributes"]), d["width"], d["temperature"])
    net.load_state_dict(d["state_dict"])
    report = JudgeReport(**d["report"]) if d.get("report") else None
    judge = Judge(net, d["attributes"], d["groups"], d["holdout_mod"], d["prior"], report, d["width"])
    judge.trained_on = d.get("shards") or {}
    return judge.to(device)


def fingerprint(meta: ShardMeta) -> str:
    """Identity of a shard set's training data (its train shards' sha256 values)."""
    return hashlib.sha256("".join(s.sha256 for s in meta.splits["train"].shards).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
def _crops(imgs: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``size`` crops + horizontal flips of uint8 (B,3,S,S) -> float in [-1,1]."""
    b, s = len(imgs), imgs.shape[-1]
    off = torch.randint(0, s - size + 1, (b, 2), generator=gen)
    out = torch.stack([imgs[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(off.tolist())])
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out.float().div(127.5).sub(1.0)


@torch.no_grad()
def _score_real(judge: Judge, imgs: np.ndarray, attrs: np.ndarray, batch: int = 256) -> dict:
    """Scores of centre-cropped real images against their own labels (``own``), shuffled
    labels (``shuf``), the majority guess (``major``), and per group (``groups``)."""
    n = len(imgs)
    perm = np.random.default_rng(12345).permutation(n)
    tot = {"own": [0.0, 0], "shuf": [0.0, 0], "major": [0.0, 0]}
    per = np.zeros((len(judge.groups), 3))
    for lo in range(0, n, batch):
        a = attrs[lo : lo + batch]
        logits, _ = judge(to_tensor(imgs[lo : lo + batch]))
        for k, att, lg in (("own", a, logits), ("shuf", attrs[perm[lo : lo + batch]], logits),
                           ("major", a, judge.prior.to(logits.device).expand_as(logits))):
            s, c = share(*judge.hits(lg, att))
            tot[k][0] += s
            tot[k][1] += c
        prior = judge.prior.to(logits.device).expand_as(logits)
        for g, idx in enumerate(judge.groups):
            h, st = attribute_hits(logits, torch.as_tensor(a), [idx])
            hm, _ = attribute_hits(prior, torch.as_tensor(a), [idx])
            per[g] += (float(h.sum()), float(hm.sum()), float(st.sum()))
    names = group_names(judge.attributes, judge.groups)
    groups = {nm: round(h / c, 4) if c else float("nan") for nm, (h, _, c) in zip(names, per)}
    major = {nm: round(m / c, 4) if c else float("nan") for nm, (_, m, c) in zip(names, per)}
    return {k: v[0] / max(v[1], 1) for k, v in tot.items()} | {"groups": groups, "groups_major": major}


def group_names(attributes: list[str], groups: list[list[int]]) -> list[str]:
    return [attributes[idx[0]].split("::", 1)[0] for idx in groups]


@torch.enable_grad()  # callers (metrics at snapshot time) may be inside no_grad
def _fit(net: JudgeNet, x_tr: torch.Tensor, y_tr: torch.Tensor, groups: list[list[int]], total_steps: int,
         batch_size: int, lr: float, gen: torch.Generator, device, log) -> None:
    """AdamW + one-cycle LR, :func:`judge_loss`, random 64 crops and flips."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    net.train()
    order = torch.zeros(0, dtype=torch.long)
    run_loss, every = 0.0, max(1, total_steps // 10)
    for step in range(total_steps):
        if len(order) < batch_size:  # reshuffle once per pass; a batch never mixes two passes
            order = torch.randperm(len(x_tr), generator=gen)
        b, order = order[:batch_size], order[batch_size:]
        x = _crops(x_tr[b], JUDGE_SIZE, gen).to(device)
        logits, _ = net(x)
        loss = judge_loss(logits, y_tr[b].to(device), groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        run_loss += float(loss.detach())
        if (step + 1) % every == 0 or step + 1 == total_steps:
            log(f"judge step {step + 1}/{total_steps}: loss {run_loss / ((step % every) + 1):.4f}")
            run_loss = 0.0
    net.eval()


def train_judge(
    shards: str | Path,
    *,
    epochs: float = 6.0,
    steps: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    width: int = 16,
    holdout: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log=print,
) -> Judge:
    """Train a judge on the real train-split images of ``shards`` (see module docstring).
    Length: ``steps`` optimizer updates, or when 0 ``epochs`` passes over the images but at
    least :data:`MIN_STEPS` updates (small sets need many passes)."""
    meta = load_metadata(shards)
    if not meta.attributes:
        raise JudgeError(f"{shards}: the shards carry no attributes (attr.npy), nothing to train a judge on")
    if 76 not in meta.image_sizes:
        raise JudgeError(f"{shards}: the judge trains on the 76px images, the shards have {meta.image_sizes}")
    if (epochs <= 0 and steps <= 0) or steps < 0 or batch_size <= 0 or lr <= 0 or width <= 0 or holdout < 2:
        raise JudgeError("epochs or steps, batch_size, lr, width must be > 0 and holdout >= 2")
    t0 = time.perf_counter()
    train = load_split(meta, "train", image=76, crop=False)  # full 76px: random 64 crops
    keep = np.array([not is_holdout(k, holdout) for k in train.keys])
    tr_idx, ho_idx = np.nonzero(keep)[0], np.nonzero(~keep)[0]
    if len(tr_idx) < 2:
        raise JudgeError(f"{shards}: too few training images for the judge ({len(tr_idx)})")
    labels = train.attr[tr_idx]
    groups = attribute_groups(meta.attributes, labels)
    if not groups:
        raise JudgeError(f"{shards}: no attribute group varies in the training labels; nothing to judge")
    freq = labels.astype(np.float64).mean(0)
    prior = torch.tensor(np.log(np.clip(freq, 1e-4, 1.0)), dtype=torch.float32)
    torch.manual_seed(seed)
    net = JudgeNet(len(meta.attributes), width).to(device)
    x_tr = torch.from_numpy(train.img[tr_idx]).permute(0, 3, 1, 2).contiguous()
    y_tr = torch.from_numpy(labels.astype(np.float32))
    gen = torch.Generator().manual_seed(seed)
    total_steps = steps or max(MIN_STEPS, round(epochs * len(tr_idx) / batch_size))
    _fit(net, x_tr, y_tr, groups, total_steps, batch_size, lr, gen, device, log)
    net.eval()
    judge = Judge(net, list(meta.attributes), groups, holdout, prior, width=width)
    test = load_split(meta, "test", image=76)
    probe = _score_real(judge, test.img, test.attr)  # which groups can it read on unseen species?
    names = group_names(judge.attributes, groups)
    readable = [g for g, nm in zip(groups, names)
                if probe["groups"][nm] >= probe["groups_major"][nm] + READABLE_MARGIN]
    dropped = [nm for g, nm in zip(groups, names) if g not in readable]
    if readable and dropped:
        log(f"judge: dropping groups it cannot read on real test images: {', '.join(dropped)}")
        judge.groups = readable
    ho = (_score_real(judge, center_crop(train.img[ho_idx], JUDGE_SIZE), train.attr[ho_idx])
          if len(ho_idx) else None)
    te = _score_real(judge, test.img, test.attr)
    noise = np.random.default_rng(seed).integers(0, 256, size=test.img.shape, dtype=np.uint8)
    rnd = _score_real(judge, noise, test.attr)
    judge.report = JudgeReport(
        n_train=len(tr_idx), n_holdout=len(ho_idx), n_test=len(test), steps=total_steps,
        epochs=round(total_steps * batch_size / len(tr_idx), 2),
        seconds=round(time.perf_counter() - t0, 1),
        holdout=ho["own"] if ho else float("nan"), test=te["own"],
        majority_holdout=ho["major"] if ho else float("nan"), majority_test=te["major"],
        shuffled_test=te["shuf"], random_test=rnd["own"], per_group_test=probe["groups"],
        per_group_majority_test=probe["groups_major"], dropped_groups=dropped if readable else [],
    )
    return judge


def ensure_judge(ctx: EvalContext) -> Judge:
    """The context's judge: loaded from ``ctx.judge_path``, or trained there first (rank 0
    trains, the others wait) when the file does not exist yet."""
    if "judge" in ctx.cache:
        return ctx.cache["judge"]
    path = ctx.judge_path
    if not path.is_file():
        if rank_world()[0] == 0:
            ctx.log(f"no attribute judge at {path}: training one on {ctx.shards} (cached for later runs)")
            judge = train_judge(ctx.shards, device=ctx.device, log=lambda m: None)
            judge.save(path, ctx.meta)
            ctx.log(f"judge: {format_report(judge.report)}")
        barrier()
    try:
        judge = load_judge(path, ctx.device, ctx.meta.attributes)
    except JudgeError as e:
        raise MetricError(str(e)) from e
    was = judge.trained_on.get("fingerprint")
    if was and "train" in ctx.meta.splits and was != fingerprint(ctx.meta) and rank_world()[0] == 0:
        ctx.log(f"WARNING: judge {path} was trained on other shards ({judge.trained_on.get('root')}) than "
                f"{ctx.shards}; retrain it (python -m stackgan.metrics.judge train --shards {ctx.shards})")
    ctx.cache["judge"] = judge
    return judge


def format_report(r: JudgeReport | None) -> str:
    if r is None:
        return "(no report)"
    return (f"score on held-out real train images {r.holdout:.3f} (majority guess {r.majority_holdout:.3f}), "
            f"on real test images {r.test:.3f} (majority {r.majority_test:.3f}, shuffled captions "
            f"{r.shuffled_test:.3f}, noise images {r.random_test:.3f}); "
            f"{r.n_train} training images, {r.steps} steps ({r.epochs:g} epochs), {r.seconds:.0f} s\n"
            "real test images, per group (majority guess): "
            + ", ".join(f"{k.removeprefix('has_')} {v:.2f} ({r.per_group_majority_test[k]:.2f})"
                        for k, v in r.per_group_test.items())
            + (f"\nnot scored (no better than the majority guess + {READABLE_MARGIN}): "
               + ", ".join(r.dropped_groups) if r.dropped_groups else ""))


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.metrics.judge", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train an attribute judge on a shard set's real images and cache it")
    t.add_argument("--shards", required=True, help="prepared shard folder with attr.npy labels")
    t.add_argument("--out", default="", help="judge file (default <shards>/judge.pt)")
    t.add_argument("--epochs", type=float, default=6.0,
                   help=f"passes over the training images (at least {MIN_STEPS} steps)")
    t.add_argument("--steps", type=int, default=0, help="optimizer updates (overrides --epochs)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--width", type=int, default=16)
    t.add_argument("--holdout", type=int, default=10, help="hold out 1 in this many train keys")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default; 1 is fastest on a busy small machine)")
    s = sub.add_parser("show", help="print a judge file's stored report")
    s.add_argument("path")
    args = p.parse_args(argv)
    try:
        if args.cmd == "show":
            j = load_judge(args.path)
            print(json.dumps(asdict(j.report) if j.report else {}, indent=1))
            return 0
        out = Path(args.out) if args.out else Path(args.shards) / "judge.pt"
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        judge = train_judge(args.shards, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr,
                            width=args.width, holdout=args.holdout, seed=args.seed, device=args.device)
        judge.save(out, load_metadata(args.shards))
        print(f"judge written to {out}")
        print(format_report(judge.report))
        print(json.dumps(asdict(judge.report)))
        return 0
    except (JudgeError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
