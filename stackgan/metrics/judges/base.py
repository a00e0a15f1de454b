"""What both judge kinds share: the conv block, the :class:`Judge` object (a net with what
scoring needs, saved through :mod:`stackgan.metrics.netcache`), the fitting loop and the
scores of real images against their labels."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stackgan.errors import StackGANError
from stackgan.images import to_unit

from ..core import full_precision, resize
from ..evalset import to_tensor
from ..netcache import save_net
from .rule import attribute_hits, group_hits, group_names, judge_loss, share

FORMAT = "stackgan-judge/2"
FORMAT_V1 = "stackgan-judge/1"  # species judges written before kinds existed: still read
KINDS = ("parts", "species")
JUDGE_SIZE = 64  # input side; real images are 64 crops of the 76px shard images
READABLE_MARGIN = 0.1  # a group counts only if the judge beats the majority guess by this on real test images


class JudgeError(StackGANError, RuntimeError):
    """A judge file that is missing, of another format, or made for other attributes."""


def conv_block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    """3x3 convolution (no bias) + batch norm + ReLU: the unit both judge nets are built of."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Judge:
    """A judge network with what scoring needs: the attribute names, the scored groups, the
    held-out key rule (which training captions judge consistency scores), the majority
    prior, its training report and what it was trained on."""

    def __init__(self, net: nn.Module, attributes: list[str], groups: list[list[int]], holdout_mod: int,
                 prior: torch.Tensor, report=None):
        self.net = net.eval()
        self.attributes = attributes
        self.groups = groups
        self.holdout_mod = holdout_mod
        self.prior = prior  # (A,) log-frequency logits: the majority baseline
        self.report = report  # species.JudgeReport or parts.PartJudgeReport
        self.trained_on: dict = {}  # species: the shard set (root, encoder, fingerprint); parts: the renderer
        self.path: Path | None = None  # the file it was loaded from

    @property
    def kind(self) -> str:
        return self.net.kind

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
        with full_precision(self.device):
            return self.net(resize(images.to(self.device, torch.float32), JUDGE_SIZE))

    def hits(self, logits: torch.Tensor,
             attrs: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen, stated) group counts per image, see :func:`attribute_hits`."""
        return attribute_hits(logits, torch.as_tensor(np.asarray(attrs)), self.groups)

    def group_hits(self, logits: torch.Tensor,
                   attrs: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen, stated) per image and group, see :func:`group_hits`."""
        return group_hits(logits, torch.as_tensor(np.asarray(attrs)), self.groups)

    def save(self, path: str | Path) -> Path:
        """Write the judge to ``path`` (atomically, :func:`stackgan.metrics.netcache.save_net`)."""
        return save_net(path, FORMAT, {
            "kind": self.kind, "net": self.net.config(), "state_dict": self.net.state_dict(),
            "attributes": self.attributes, "groups": self.groups, "holdout_mod": self.holdout_mod,
            "prior": self.prior, "report": asdict(self.report) if self.report else None,
            "trained_on": self.trained_on,
        })


def random_crops(imgs: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``size`` crops + horizontal flips of uint8 (B,3,S,S) -> float in [-1,1]."""
    b, s = len(imgs), imgs.shape[-1]
    off = torch.randint(0, s - size + 1, (b, 2), generator=gen)
    out = torch.stack([imgs[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(off.tolist())])
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return to_unit(out)


@torch.no_grad()
def score_real(judge: Judge, imgs: np.ndarray, attrs: np.ndarray, batch: int = 256) -> dict:
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


@torch.enable_grad()  # callers (metrics at snapshot time) may be inside no_grad and autocast
def fit(net: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor, groups: list[list[int]], total_steps: int,
        batch_size: int, lr: float, gen: torch.Generator, device, log) -> None:
    """AdamW + one-cycle LR, :func:`judge_loss`, random 64 crops and flips, in fp32."""
    with full_precision(device):
        _fit_steps(net, x_tr, y_tr, groups, total_steps, batch_size, lr, gen, device, log)


def _fit_steps(net: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor, groups: list[list[int]],
               total_steps: int, batch_size: int, lr: float, gen: torch.Generator, device, log) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    net.train()
    order = torch.zeros(0, dtype=torch.long)
    run_loss, every = 0.0, max(1, total_steps // 10)
    for step in range(total_steps):
        if len(order) < batch_size:  # reshuffle once per pass; a batch never mixes two passes
            order = torch.randperm(len(x_tr), generator=gen)
        b, order = order[:batch_size], order[batch_size:]
        x = random_crops(x_tr[b], JUDGE_SIZE, gen).to(device)
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
