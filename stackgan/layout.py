"""Memory layout of the networks: channels-last where it pays, NCHW where it does not.

Channels-last convolutions are faster than NCHW on large maps, on CPUs and GPUs alike. On
CPUs, small maps are the other way round: NCHW convolutions are as fast or faster there and
BatchNorm runs up to 2x slower in channels-last (measured in ``python -m stackgan.bench``,
docs/performance.md). :func:`channels_last_where_large` therefore gives each conv / BN layer
the layout that suits the size of the maps it sees.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["apply_layout", "channels_last_where_large", "layout_min_hw"]


def _nchw_input(module: nn.Module, args: tuple):
    return (args[0].contiguous(),) + tuple(args[1:])


def channels_last_where_large(module: nn.Module, example: tuple, min_hw: int = 32) -> tuple[int, Any]:
    """Channels-last for conv / BN layers whose input maps are at least ``min_hw`` wide, NCHW
    for the others.

    Small layers get NCHW weights and a forward pre-hook that makes their input contiguous;
    the next large layer turns the result back into channels-last by itself, because its
    weight is. Map sizes come from one no-grad eval-mode forward of ``example`` (BatchNorm
    statistics are not touched). Weights keep their values and state-dict keys.
    Returns the number of layers kept in NCHW and the output of that forward.
    """
    sizes: dict[str, int] = {}
    layers = {n: m for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}

    def record(name: str):
        def hook(mod: nn.Module, args: tuple) -> None:
            sizes.setdefault(name, min(args[0].shape[-2:]))
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in layers.items()]
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(*example)
    finally:
        for h in hooks:
            h.remove()
        module.train(was)
    small = 0
    for n, m in layers.items():
        if n not in sizes:  # not on the forward path (e.g. the frozen stage I keeps its layout)
            continue
        big = sizes[n] >= min_hw
        fmt = torch.channels_last if big else torch.contiguous_format
        for p in m.parameters(recurse=False):
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=fmt)
        if not big:
            m.register_forward_pre_hook(_nchw_input)
            small += 1
    return small, out


def layout_min_hw(min_hw_cpu: int, device: torch.device) -> int:
    """The map width below which layers stay NCHW: ``train.channels_last_min_hw`` on CPUs,
    0 (channels-last everywhere) on GPUs."""
    return min_hw_cpu if device.type == "cpu" else 0


def apply_layout(G: nn.Module, D: nn.Module, example_g: tuple, d_cond: str, min_hw: int) -> tuple[int, int]:
    """Put G and D in channels-last, then back to NCHW below ``min_hw`` (0 = channels-last
    everywhere). ``example_g`` is G's ``(emb, z)`` or ``(emb, z, words)``; ``d_cond`` (``model.d_cond``: "mu" or
    "text") says what D is conditioned on, as in the training step.
    Returns how many layers of G and of D stay NCHW."""
    G.to(memory_format=torch.channels_last)
    D.to(memory_format=torch.channels_last)
    if min_hw <= 0:
        return 0, 0
    n_g, (fake, mu, _) = channels_last_where_large(G, example_g, min_hw)
    cond = example_g[0] if d_cond == "text" else mu
    words = example_g[2] if len(example_g) > 2 else None
    fake = fake.contiguous(memory_format=torch.channels_last)
    n_d, _ = channels_last_where_large(D, (fake, cond, None, words), min_hw)
    return n_g, n_d
