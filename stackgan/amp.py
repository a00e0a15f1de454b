"""One network's optimizer update under mixed precision, for a GAN's two networks and two
optimisers, without host syncs.

Accelerate gives an fp16 run one ``torch.amp.GradScaler`` for all optimisers (torch.amp's
pattern for several models and losses): ``accelerator.backward`` scales the loss, and each
prepared optimiser's ``step`` unscales its own gradients, skips the step when one of them is
inf/NaN, and updates the scale. Both networks therefore share one scale, and an overflow in
D's step halves it and skips D's step only. What a GAN trainer must add, and :func:`update`
does:

* **unscale this optimiser, and only this one, before reading or clipping its gradients.**
  ``Accelerator.clip_grad_norm_`` unscales *every* prepared optimiser: clipping G also
  unscales D's gradients of the step before (an overflow there backs the scale off a second
  time, and a D-sized pass is wasted), and a gradient norm read before unscaling is the loss
  scale (2^16 at the start) times too large.
* **count skipped steps on the device.** With fused Adam (the trainer's default) the scaler
  hands the inf flag to the optimiser kernel and never reads it on the host, so Accelerate's
  ``optimizer_step_was_skipped`` stays False. A step is skipped exactly when this network's
  unscaled gradients are not all finite, i.e. when their total norm is not (up to gradients
  beyond 1e19), so :attr:`Update.skipped` is a 0-dim device tensor the trainer can average
  with its other step statistics and read at its log steps.

bf16 and fp32 have no scaler: the same call clips and measures, and nothing is skipped.
DeepSpeed engines scale, clip and skip inside the engine (``stackgan.backends``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Update", "total_norm", "update"]


@dataclass
class Update:
    """What one network's update reports, on the device (nothing is read back here)."""

    grad_norm: Tensor | None  # total 2-norm of the unscaled gradients before clipping (None if not asked)
    skipped: Tensor | None  # 0-dim float, 1.0 if the grad scaler skipped this step; None without a scaler


def total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all ``grads`` as one vector, in fp32, on their device (one fused pass)."""
    if not grads:
        raise ValueError("total_norm: no gradients (did backward reach this network?)")
    norms = torch._foreach_norm([g.detach() for g in grads], 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)


def _grads(opt) -> tuple[list[Tensor], list[Tensor]]:
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    return params, [p.grad for p in params]


def _clip(params: list[Tensor], grads: list[Tensor], max_norm: float, norm: Tensor) -> None:
    """Scale the gradients by min(1, max_norm / norm), as ``clip_grad_norm_`` with a known norm."""
    clip = getattr(torch.nn.utils, "clip_grads_with_norm_", None)  # torch >= 2.6
    if clip is not None:
        clip(params, max_norm, norm)
        return
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device, g.dtype))


def update(acc, opt, loss: Tensor, *, grad_clip: float = 0.0, want_norm: bool = False) -> Update:
    """``zero_grad``, backward, unscale, optional clipping and step of one network.

    ``acc`` is the run's ``accelerate.Accelerator`` (its grad scaler, if any, is used);
    ``opt`` the network's prepared optimiser. The gradient norm is computed when it is asked
    for, when clipping, or under a grad scaler (it is the skip flag), always from unscaled
    gradients of this optimiser's parameters.
    """
    if grad_clip < 0:
        raise ValueError(f"update: grad_clip must be >= 0, got {grad_clip}")
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    scaled = getattr(acc, "scaler", None) is not None
    norm = None
    if grad_clip > 0 or want_norm or scaled:
        acc.unscale_gradients(optimizer=opt)  # this optimiser only; a no-op without a scaler
        params, grads = _grads(opt)
        norm = total_norm(grads)
        if grad_clip > 0:
            _clip(params, grads, grad_clip, norm)
    opt.step()  # under a scaler: skipped inside when the unscale found inf/NaN
    skipped = (~torch.isfinite(norm)).float() if scaled else None
    return Update(norm if (want_norm or grad_clip > 0) else None, skipped)
