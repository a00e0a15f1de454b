"""Text probe: how much of what a caption states can be read off its text embedding?

A generator conditioned on the embedding cannot show an attribute the embedding does not
carry, so this is an upper bound for judge consistency that needs no images: a small MLP
is trained to predict, from each caption's embedding, the values of the attribute groups
that caption states (the labels judge consistency uses), and is scored with the judge's
own rule (:func:`stackgan.metrics.judges.group_hits`, the judge's groups) on captions of
held-out training images (the judge's held-out keys) and of the unseen test species.
"Shuffled" scores the same predictions against other captions' attributes (chance).

    python -m stackgan.studies.text_probe --shards shards/birds-cub-scale

Measured on the CUB-scale embedded set (docs/quality.md): the sentence embeddings carry
the stated attributes of training captions almost fully, so a generator that falls short
there is limited by its images, not by its text.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stackgan.data.meta import ShardError, load_metadata

from stackgan.data.captions import caption_scope
from stackgan.metrics.evalset import is_holdout, load_split
from stackgan.metrics.judges import (JudgeError, choose_judge, group_hits, group_names, judge_loss,
                                     load_judge, share)


@dataclass
class ProbeReport:
    holdout: float  # held-out training images' captions
    test: float  # unseen test species' captions
    shuffled_holdout: float
    shuffled_test: float
    per_group_holdout: dict
    per_group_test: dict
    n_train: int  # captions
    n_holdout: int
    n_test: int
    epochs: int
    seconds: float


def caption_labels(captions: list[list[str]], attr: np.ndarray, attributes: list[str]) -> np.ndarray:
    """(N * C, A) float: per caption, its image's attribute labels in the groups it states."""
    scope = caption_scope(captions, attributes)  # (N, C, A)
    return ((attr[:, None, :] > 0) & scope).reshape(-1, len(attributes)).astype(np.float32)


def _score(logits: torch.Tensor, labels: torch.Tensor, groups: list[list[int]]) -> tuple[float, list[float]]:
    """The judge's rule (:func:`share`) over captions, and per group."""
    hits, stated = group_hits(logits, labels, groups)
    total, n = share(hits.float().sum(1), stated.float().sum(1))
    per = hits.sum(0).float() / stated.sum(0).clamp(min=1)
    return total / max(n, 1), [float(v) for v in per]


def run_probe(shards: str | Path, judge_path: str | Path, epochs: int = 6, hidden: int = 512,
              seed: int = 0, log=print) -> ProbeReport:
    t0 = time.perf_counter()
    meta = load_metadata(shards)
    if not meta.attributes:
        raise ShardError(f"{shards}: the shards carry no attribute labels (attr.npy); nothing to probe")
    judge = load_judge(judge_path)
    groups, names = judge.groups, meta.attributes

    def split(name: str, select=None):
        d = load_split(meta, name, select=select)
        x = torch.as_tensor(np.asarray(d.emb, np.float32).reshape(-1, d.emb.shape[-1]))
        return x, torch.as_tensor(caption_labels(d.captions, np.asarray(d.attr), names))

    mod = judge.holdout_mod
    x_tr, y_tr = split("train", lambda k: not is_holdout(k, mod))
    x_ho, y_ho = split("train", lambda k: is_holdout(k, mod))
    x_te, y_te = split("test")
    mean, std = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)  # any encoder's scale (unit-norm or not)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(x_tr.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, len(names)))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    keep = y_tr.sum(1) > 0  # captions stating at least one attribute
    x, y = (x_tr[keep] - mean) / std, y_tr[keep]
    gen = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 256):
            b = perm[i:i + 256]
            loss = judge_loss(net(x[b]), y[b], groups)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log(f"epoch {ep + 1}/{epochs}: loss {loss.item():.4f}")
    net.eval()
    with torch.no_grad():
        lo_ho, lo_te = net((x_ho - mean) / std), net((x_te - mean) / std)
    ho, per_ho = _score(lo_ho, y_ho, groups)
    te, per_te = _score(lo_te, y_te, groups)
    shift = lambda y: torch.roll(y, len(y) // 2, 0)  # captions half the split away: other species
    sh_ho, _ = _score(lo_ho, shift(y_ho), groups)
    sh_te, _ = _score(lo_te, shift(y_te), groups)
    gn = group_names(names, groups)
    return ProbeReport(ho, te, sh_ho, sh_te, dict(zip(gn, per_ho)), dict(zip(gn, per_te)),
                       int(len(x)), int(len(x_ho)), int(len(x_te)), epochs,
                       round(time.perf_counter() - t0, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.studies.text_probe",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--judge", default="",
                   help="the attribute judge whose groups and held-out keys to use: parts, species or a "
                        "judge file (default: the shards' default)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        rep = run_probe(args.shards, choose_judge(args.shards, args.judge).path, args.epochs, seed=args.seed)
    except (ShardError, JudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"text probe: held-out training captions {rep.holdout:.3f} (shuffled {rep.shuffled_holdout:.3f}), "
          f"unseen test species {rep.test:.3f} (shuffled {rep.shuffled_test:.3f}); {rep.seconds:.0f} s")
    for name, d in (("held-out", rep.per_group_holdout), ("test", rep.per_group_test)):
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in d.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(rep), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
