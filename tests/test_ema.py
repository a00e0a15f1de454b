"""The EMA generator samples with BatchNorm statistics of its own weights (standing statistics),
not the live generator's."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from stackgan.config import load_config
from stackgan.ema import EMA
from stackgan.models import build_generator

TEXT = 12
SMALL = ["model.gf_dim=8", "model.z_dim=8", "model.cond_dim=8"]


def _g(stage: int = 1, stage1: nn.Module | None = None) -> nn.Module:
    torch.manual_seed(stage)
    return build_generator(load_config(None, [*SMALL, f"model.stage={stage}"]).model, TEXT, stage1=stage1)


def _batches(n: int = 4, b: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(b, TEXT, generator=g), torch.randn(b, 8, generator=g)) for _ in range(n)]


def _train_a_bit(G: nn.Module, ema: EMA, steps: int = 30) -> None:
    """Weights that drift (as training moves them) and BN statistics the live G collects."""
    opt = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=2e-2)
    G.train()
    for step in range(steps):
        emb, z = _batches(1)[0]
        img = G(emb * (1 + step / 10), z)[0]
        opt.zero_grad()
        (img.mean() + img.std()).backward()
        opt.step()
        ema.update(G, step)


def _stats_by_hand(model: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each training BatchNorm's inputs over the batches (forward hooks, train mode, seed 0 for the
    CA noise): the mean of the per-batch means and of the per-batch unbiased variances."""
    model = copy.deepcopy(model).train()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(i[0].detach()))
             for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for emb, z in batches:
            model(emb, z)
    for h in hooks:
        h.remove()
    out = {}
    for name, xs in seen.items():
        dims = [0] + list(range(2, xs[0].dim()))
        out[name] = (torch.stack([x.mean(dims) for x in xs]).mean(0),
                     torch.stack([x.var(dims, unbiased=True) for x in xs]).mean(0))
    return out


def _bn(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_ema_bn_statistics_are_its_own():
    """Tolerance: 1e-5 absolute + 1e-4 relative (float32 sums over 4 batches); the live G's
    statistics (the old rule) are off by far more, so the check can fail."""
    G = _g()
    ema = EMA(G, decay=0.9)
    _train_a_bit(G, ema)
    batches = _batches()
    ema.set_standing_inputs(batches)
    rng = torch.get_rng_state()
    sampler = ema.sampler()
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    assert not sampler.training
    want = _stats_by_hand(sampler, batches)
    live, mine = _bn(G), _bn(sampler)
    assert set(want) == set(mine) and len(want) >= 5
    worst_old = 0.0
    for name, (mean, var) in want.items():
        torch.testing.assert_close(mine[name].running_mean, mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine[name].running_var, var, atol=1e-5, rtol=1e-4)
        worst_old = max(worst_old, float(((live[name].running_var - var).abs() / var.abs().clamp_min(1e-3)).max()))
    assert worst_old > 0.05  # the copied statistics were not the EMA weights'

    again = {n: m.running_var.clone() for n, m in mine.items()}
    assert ema.sampler() is sampler and all(torch.equal(m.running_var, again[n]) for n, m in mine.items())
    ema.update(G, 100)  # new weights: the statistics are recomputed on the next use
    _train_a_bit(G, ema, 3)
    ema.sampler()
    assert any(not torch.equal(m.running_var, again[n]) for n, m in mine.items())


def test_stage2_keeps_its_frozen_stage1_statistics():
    stage1 = _g()
    stage1.eval()
    frozen = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in _bn(stage1).items()}
    G2 = _g(2, stage1=stage1)
    ema = EMA(G2, decay=0.9)
    _train_a_bit(G2, ema, 5)
    batches = _batches(3)
    ema.set_standing_inputs(batches)
    s = ema.sampler()
    for n, m in _bn(s.stage1).items():
        assert torch.equal(m.running_mean, frozen[n][0]) and torch.equal(m.running_var, frozen[n][1])
    want = _stats_by_hand(s, batches)
    assert want and not any(n.startswith("stage1.") for n in want)
    for name, (mean, var) in want.items():
        torch.testing.assert_close(_bn(s)[name].running_var, var, atol=1e-5, rtol=1e-4)


def test_without_inputs_the_copied_statistics_stay():
    G = _g()
    ema = EMA(G, decay=0.9)
    _train_a_bit(G, ema, 3)
    s = ema.sampler()
    for n, m in _bn(s).items():
        assert torch.equal(m.running_var, _bn(G)[n].running_var)
