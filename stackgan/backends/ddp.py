"""DDP through Accelerate as the GAN backend: one ``Accelerator``, both networks wrapped in DDP.

:func:`make_accelerator` is the one place the trainer's ``Accelerator`` is built; the
benchmark (``stackgan.bench``) builds its own through it, so it measures the trainer's DDP
settings. :class:`AccelerateGAN` adds what a GAN needs on top (:func:`stackgan.amp.update`:
each optimiser unscaled, measured and clipped on its own under the one shared fp16 scaler).
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..amp import Update, update
from ..ema import unwrap
from .base import check_backend, slow_bf16_note

PG_TIMEOUT = timedelta(minutes=30)  # rank 0 may train the judge on first use while the others wait


def accelerator_kwargs(cpu: bool, precision: str, *, log_with: list | None = None,
                       project_dir: str | None = None) -> dict:
    """The trainer's ``Accelerator`` keyword arguments (``precision``: "no", "bf16" or "fp16")."""
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs  # import cost

    # gradient_as_bucket_view: gradients are views into DDP's buckets (one copy less per step);
    # broadcast_buffers: D's BatchNorm statistics follow rank 0's
    handlers: list[Any] = [DistributedDataParallelKwargs(broadcast_buffers=True, find_unused_parameters=False,
                                                         gradient_as_bucket_view=True)]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo on CPUs (else each CPU process thinks it is alone); NCCL's default timeout is 10 minutes
        pg = {"timeout": PG_TIMEOUT} if not cpu else {"backend": "gloo", "timeout": PG_TIMEOUT}
        handlers.append(InitProcessGroupKwargs(**pg))
    return dict(cpu=cpu, mixed_precision=precision, kwargs_handlers=handlers, log_with=log_with,
                project_dir=project_dir)


def make_accelerator(cpu: bool, precision: str, *, log_with: list | None = None,
                     project_dir: str | None = None):
    """An ``accelerate.Accelerator`` configured as the trainer's (see :func:`accelerator_kwargs`)."""
    from accelerate import Accelerator

    return Accelerator(**accelerator_kwargs(cpu, precision, log_with=log_with, project_dir=project_dir))


class AccelerateGAN:
    """The GAN backend over one ``Accelerator`` (DDP with several processes; see
    :class:`stackgan.backends.base.GANBackend`). ``accelerator`` may be any object with
    Accelerate's ``backward``/``unscale_gradients``/``scaler`` (tests hand in their own)."""

    name = "ddp"
    keeps_channels_last = True

    def __init__(self, accelerator, *, precision: str = "no", grad_clip: float = 0.0, note: str | None = None,
                 precision_source: str = "config"):
        if grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0, got {grad_clip}")
        self._acc = accelerator
        self.precision, self.precision_source, self.note = precision, precision_source, note
        self.grad_clip = grad_clip
        self.opt_g = self.opt_d = None

    @classmethod
    def create(cls, precision: str, *, grad_clip: float = 0.0, precision_source: str = "config",
               log_with: list | None = None, project_dir: str | None = None) -> "AccelerateGAN":
        """The trainer's backend: CUDA when present; fp16 without CUDA runs in fp32 (with a note)."""
        cpu = not torch.cuda.is_available()
        note = slow_bf16_note(precision, cpu)
        if precision == "fp16" and cpu:
            note = "mixed_precision=fp16 needs CUDA (loss scaling); this run has no GPU and runs in fp32"
            precision = "no"
        acc = make_accelerator(cpu, precision, log_with=log_with, project_dir=project_dir)
        return cls(acc, precision=precision, grad_clip=grad_clip, note=note,
                   precision_source=precision_source)

    # ---- the process group and the networks ----------------------------------------------
    @property
    def accelerator(self):
        return self._acc

    @property
    def device(self) -> torch.device:
        return self._acc.device

    @property
    def process_index(self) -> int:
        return self._acc.process_index

    @property
    def num_processes(self) -> int:
        return self._acc.num_processes

    @property
    def is_main_process(self) -> bool:
        return self._acc.is_main_process

    def wait_for_everyone(self) -> None:
        self._acc.wait_for_everyone()

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        """The module inside DDP / ``torch.compile`` (all this backend wraps a model in); not
        ``Accelerator.unwrap_model``, which imports DeepSpeed whenever it is installed (seconds per
        process) to check for an engine this backend never builds."""
        return unwrap(model)

    def autocast(self) -> AbstractContextManager:
        return self._acc.autocast()

    def prepare(self, G: nn.Module, D: nn.Module, opt_g, opt_d) -> tuple:
        G, D, opt_g, opt_d = self._acc.prepare(G, D, opt_g, opt_d)
        self.opt_g, self.opt_d = opt_g, opt_d
        return G, D, opt_g, opt_d

    def update(self, model: nn.Module, opt, loss: Tensor, *, want_norm: bool = False) -> Update:
        return update(self._acc, opt, loss, grad_clip=self.grad_clip, want_norm=want_norm)

    # ---- reports -----------------------------------------------------------------------
    def describe(self) -> str:
        mode = {"no": "fp32", "bf16": "bf16 (torch autocast, fp32 weights)",
                "fp16": "fp16 (torch autocast, one dynamic loss scale shared by G and D)"}[self.precision]
        return (f"backend ddp: {self.num_processes} process(es), gradient clipping "
                f"{self.grad_clip if self.grad_clip > 0 else 'off'}, {mode}")

    def amp_state(self) -> dict[str, float]:
        """fp16: the shared loss scale (one host read; log steps only); empty otherwise."""
        scaler = self._acc.scaler
        return {} if scaler is None else {"loss_scale": float(scaler.get_scale())}

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        scaler = self._acc.scaler
        return {"backend": self.name, "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}

    def check_resume(self, state: dict, world_size: int, path: Path) -> None:
        check_backend(state, self.name, path)

    def load_checkpoint(self, path: Path, state: dict) -> None:
        """Both optimisers and the grad scaler from rank 0's state (after :meth:`prepare`)."""
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if state.get("scaler") is not None and self._acc.scaler is not None:
            self._acc.scaler.load_state_dict(state["scaler"])

    def save_checkpoint(self, run_dir: str | Path, step: int, state_fn: Callable[[], dict], extra_rng: dict,
                        *, keep_last: int, keep_every: int = 0) -> Path:
        return ckpt.save(run_dir, step, state_fn, extra_rng, rank=self.process_index,
                         barrier=self.wait_for_everyone, keep_last=keep_last, keep_every=keep_every)
