"""Exponential moving average of the generator's weights, used for sampling.

GAN generators oscillate; an EMA of their weights gives steadier, usually better samples
at no training cost. The EMA model is a frozen deep copy of the *unwrapped* generator
(DDP / ``torch.compile`` wrappers are peeled off), kept in eval mode. Before ``start``
steps it simply copies the weights; after that ``ema = decay * ema + (1 - decay) * w``.
With ``warmup`` the decay ramps up as ``min(decay, (1 + n) / (10 + n))``, n steps after
``start`` (TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` rule): without it a
0.995 EMA is still 37% initial weights after 200 steps, and because BatchNorm statistics are
copied from the live generator, such a mix of old weights and new statistics samples badly
(the short stage-II run of the demo looked collapsed in eval mode for this reason).
Buffers (BatchNorm running statistics) and frozen parameters (the Stage-I generator inside
a Stage-II generator) are copied, never averaged, so they stay bit-identical.

Copied BatchNorm statistics belong to the live generator's weights, not to the average. Given
inputs (:meth:`EMA.set_standing_inputs`: a fixed list of (embedding, noise) batches), the
averaged generator that :meth:`EMA.sampler` hands out carries **standing statistics**: every
BatchNorm's running mean and variance recomputed for the averaged weights, as the equal-weight
mean over those batches (BigGAN's "standing statistics"). Recomputed once per update, under a
fixed seed and without touching the caller's RNG, so exports, sample grids and metrics (and a
stage II whose frozen stage I is such an export) are a function of the weights alone.

The copy lives where its generator lives: an update from a generator on another device
first moves the copy there (once). A trainer that builds the EMA before
``accelerate.prepare`` moves G to the GPU would otherwise read all of G back to the host
after every step, and sample from a host copy with device inputs. Weights are averaged in
the copy's own dtype (fp32), also when the generator holds fp16 weights (DeepSpeed fp16).
An update is a few fused (``_foreach``) kernels and never waits for the device.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["EMA", "STANDING_BATCHES", "recompute_bn_stats", "unwrap"]

STANDING_BATCHES = 16  # batches the standing statistics average over (BigGAN used 16 or more)


def unwrap(model: nn.Module) -> nn.Module:
    """Peel DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _without_hooks(model: nn.Module) -> nn.Module:
    """``model`` with every module's forward and backward hooks removed."""
    for m in model.modules():
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks",
                      "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            getattr(m, hooks, {}).clear()
    return model


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, inputs: Iterable[tuple[torch.Tensor, ...]], seed: int = 0) -> int:
    """Reset the running statistics of ``model``'s BatchNorm layers that train (a Stage-II
    generator keeps its frozen stage I in eval mode: those stay) and recompute them as the
    equal-weight mean of the batch statistics over ``inputs`` (each ``model(*batch)``). The
    CA-Net noise comes from ``seed``; the caller's RNG state is restored. Returns the number of
    layers recomputed; the model's train/eval mode is kept."""
    was_training = model.training
    model.train()
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.training and m.track_running_stats]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch weighs the same
    dev = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            for batch in inputs:
                model(*(t.to(dev) for t in batch))
    finally:
        for m, mom in zip(layers, momenta):
            m.momentum = mom
        model.train(was_training)
    return len(layers)


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.999, start: int = 0, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1), got {decay}")
        if start < 0:
            raise ValueError(f"EMA: start must be >= 0, got {start}")
        self.decay, self.start, self.warmup = float(decay), int(start), bool(warmup)
        # fp32 even from fp16 engine weights, and without the wrapper's hooks (DeepSpeed's fp16
        # engine hooks its module to cast inputs to half: on this fp32 copy that would break)
        self.model = _without_hooks(copy.deepcopy(unwrap(model))).float()
        self.model.requires_grad_(False)
        self.model.eval()
        self.standing_inputs: list[tuple[torch.Tensor, ...]] = []
        self._standing_fresh = False

    def set_standing_inputs(self, inputs: Iterable[tuple[torch.Tensor, ...]]) -> None:
        """The fixed batches (``model(*batch)``) the standing statistics are computed over."""
        self.standing_inputs = [tuple(t.detach().cpu() if torch.is_tensor(t) else t.to("cpu") for t in b)
                                for b in inputs]  # tensors, or stackgan.words.Words
        self._standing_fresh = False

    def sampler(self) -> nn.Module:
        """The averaged generator, in eval mode, with BatchNorm statistics of its own weights
        when standing inputs are set (recomputed only after an update or a load)."""
        if self.standing_inputs and not self._standing_fresh:
            recompute_bn_stats(self.model, self.standing_inputs)
            self.model.eval()
            self._standing_fresh = True
        return self.model

    @property
    def module(self) -> nn.Module:
        """The averaged generator (alias of ``model``)."""
        return self.model

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step ``step`` (>= start)."""
        n = step - self.start
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @property
    def device(self) -> torch.device:
        """Where the averaged weights are."""
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> "EMA":
        """Move the averaged copy (weights and buffers) to ``device``."""
        self.model.to(device)
        return self

    def _follow(self, src: nn.Module) -> None:
        """Move the copy to the generator's device if the generator moved (one transfer)."""
        devices = {p.device for p in src.parameters()}
        if len(devices) == 1:
            (dev,) = devices
            if dev != self.device:
                self.to(dev)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the current weights of ``model`` in; ``step`` is the optimizer step just done."""
        src = unwrap(model)
        self._follow(src)  # first: a move may replace the copy's parameter objects
        ema_p = dict(self.model.named_parameters())
        src_p = dict(src.named_parameters())
        if ema_p.keys() != src_p.keys():
            missing = sorted(set(ema_p) ^ set(src_p))[:5]
            raise ValueError(f"EMA.update: model parameters differ from the EMA copy's (e.g. {missing})")
        ema_b, src_b = list(self.model.named_buffers()), list(src.named_buffers())
        if [n for n, _ in ema_b] != [n for n, _ in src_b]:
            raise ValueError("EMA.update: the model's buffers do not match the EMA copy's")
        avg_e, avg_s, copy_e, copy_s = [], [], [b for _, b in ema_b], [b for _, b in src_b]
        for name, pe in ema_p.items():
            ps = src_p[name]
            if step >= self.start and ps.requires_grad and pe.is_floating_point():
                avg_e.append(pe)
                avg_s.append(ps.to(device=pe.device, dtype=pe.dtype))  # no-op unless fp16 / elsewhere
            else:
                copy_e.append(pe)
                copy_s.append(ps)
        if avg_e:
            torch._foreach_lerp_(avg_e, avg_s, 1.0 - self.decay_at(step))
        if copy_e:
            torch._foreach_copy_(copy_e, copy_s)
        self._standing_fresh = False

    def state_dict(self) -> dict:
        return {"decay": self.decay, "start": self.start, "warmup": self.warmup, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        missing = {"decay", "start", "model"} - set(state)
        if missing:
            raise ValueError(f"EMA.load_state_dict: state lacks {sorted(missing)}")
        self.decay, self.start = float(state["decay"]), int(state["start"])
        self.warmup = bool(state.get("warmup", False))  # checkpoints from before the option: none
        self.model.load_state_dict(state["model"])
        self._standing_fresh = False
