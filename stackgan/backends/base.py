"""What every GAN backend offers the trainer, and the rules all of them share.

The trainer (``stackgan.run``, ``stackgan.step``, ``stackgan.monitor``) talks to one
:class:`GANBackend` and never asks which one it has: DDP through Accelerate
(:mod:`.ddp`) and two DeepSpeed engines (:mod:`.deepspeed`) differ only inside their module.
The precision rule (:func:`resolve_precision`) is shared: where the launcher and the config
both name a precision they must agree.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..amp import Update
from ..config import ConfigError


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic units (AVX512-BF16 or AMX-BF16): elsewhere bf16 autocast
    is emulated (slow training, no bf16 peak or bench column)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def slow_bf16_note(precision: str, cpu: bool) -> str | None:
    """Why a run's bf16 will be slow: a CPU without bf16 units emulates it (the quality recipe asks for
    bf16, measured on a CPU with AMX; docs/performance.md)."""
    if precision == "bf16" and cpu and not cpu_has_bf16():
        return ("mixed_precision=bf16 on a CPU without bf16 units (AVX512-BF16 / AMX): autocast emulates it, "
                "usually slower than fp32 here; train.mixed_precision=no trains faster")
    return None


PRECISIONS = ("no", "bf16", "fp16")
LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` (--mixed_precision, config file)


@dataclass(frozen=True)
class Precision:
    """The precision a run asks for, and who asked (``config``, ``launcher`` or ``default``)."""

    value: str
    source: str


def resolve_precision(configured: str, env: dict | None = None) -> Precision:
    """``train.mixed_precision`` against the launcher's ``ACCELERATE_MIXED_PRECISION``.

    ``auto`` (the default) takes the launcher's bf16/fp16, else fp32 ("no"). An explicit value
    wins over a launcher that sets nothing; a launcher that sets another reduced precision than
    the config is refused with both named. The launcher's ``no`` counts as nothing set:
    ``accelerate launch`` always exports the variable, ``no`` when neither its flag nor its
    config file names a precision, so an explicit ``no`` cannot be told from the default.
    """
    env = os.environ if env is None else env
    launcher = str(env.get(LAUNCHER_ENV, "no")).strip().lower() or "no"
    if launcher not in PRECISIONS:
        raise ConfigError(f"{LAUNCHER_ENV}={launcher} (from accelerate launch --mixed_precision or its "
                          f"config file): the trainer supports {', '.join(PRECISIONS)}")
    if configured == "auto":
        return Precision(launcher, "launcher") if launcher != "no" else Precision("no", "default")
    if configured not in PRECISIONS:
        raise ConfigError(f"train.mixed_precision={configured}: expected auto, {', '.join(PRECISIONS)}")
    if launcher != "no" and launcher != configured:
        raise ConfigError(
            f"precision conflict: the config sets train.mixed_precision={configured} but the launcher sets "
            f"{launcher} ({LAUNCHER_ENV}, from accelerate launch --mixed_precision or an accelerate config "
            f"file); make them agree, or set train.mixed_precision=auto to take the launcher's")
    return Precision(configured, "config")


class GANBackend(Protocol):
    """Two networks, two optimisers, one process group: what the training loop uses.

    After :meth:`prepare` the backend knows both networks and optimisers, so checkpoint state
    and the amp report need no arguments."""

    name: str  # "ddp" or "deepspeed" (written into checkpoints)
    precision: str  # the precision in force: "no", "bf16" or "fp16"
    precision_source: str  # config, launcher or default (resolve_precision)
    note: str | None  # why the precision in force differs from the one asked for, or will be slow
    keeps_channels_last: bool  # whether channels-last weights survive prepare

    @property
    def accelerator(self): ...  # the accelerate.Accelerator that holds the trackers
    @property
    def device(self) -> torch.device: ...
    @property
    def process_index(self) -> int: ...
    @property
    def num_processes(self) -> int: ...
    @property
    def is_main_process(self) -> bool: ...
    def wait_for_everyone(self) -> None: ...
    def unwrap_model(self, model: nn.Module) -> nn.Module: ...
    def autocast(self) -> ContextManager: ...
    def prepare(self, G: nn.Module, D: nn.Module, opt_g, opt_d) -> tuple: ...

    def update(self, model: nn.Module, opt, loss: Tensor, *, want_norm: bool = False) -> Update:
        """Backward, gradient reduction, clipping (``optim.grad_clip``), loss scaling and step
        of one network; what the step reports stays on the device."""

    def describe(self) -> str: ...
    def amp_state(self) -> dict[str, float]: ...
    def state_dict(self) -> dict: ...  # the backend's part of rank 0's state.pt
    def check_resume(self, state: dict, world_size: int, path: Path) -> None: ...
    def load_checkpoint(self, path: Path, state: dict) -> None: ...  # after prepare
    def save_checkpoint(self, run_dir: str | Path, step: int, state_fn: Callable[[], dict], extra_rng: dict,
                        *, keep_last: int, keep_every: int = 0) -> Path: ...


def check_backend(state: dict, backend: str, path: Path) -> None:
    """A checkpoint resumes only on the backend that wrote it (optimizer state formats differ)."""
    wrote = state.get("backend", "ddp")
    if wrote != backend:
        raise ckpt.CheckpointError(f"{path}: written by the {wrote} backend; resume with train.backend="
                                   f"{wrote} (or start a new run folder for train.backend={backend})")
