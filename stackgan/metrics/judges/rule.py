"""The judges' scoring rule: which attribute groups count, what "the judge sees a group" means,
and the loss that trains exactly that decision. Shared by both judge kinds, the scores and the
studies (see the package docstring for the rule in words)."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from stackgan.losses import attribute_loss


def judge_loss(logits: torch.Tensor, labels: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Cross-entropy per group (:func:`stackgan.losses.attribute_loss`, every labelled group):
    it trains exactly the decision the scoring rule takes (argmax in a group)."""
    return attribute_loss(logits, labels, groups)


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


def group_names(attributes: list[str], groups: list[list[int]]) -> list[str]:
    """Each group's name (``has_wing_color`` for ``has_wing_color::blue``...)."""
    return [attributes[idx[0]].split("::", 1)[0] for idx in groups]
