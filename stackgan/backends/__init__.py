"""The GAN training backends behind one interface (:class:`GANBackend`).

    base.py       the interface and the rules every backend shares (the precision rule)
    ddp.py        DDP through one Accelerate ``Accelerator`` (the default; also the benchmark's)
    deepspeed.py  two DeepSpeed ZeRO engines, one for G and one for D

:func:`make_backend` picks and builds one from the config; nothing outside this package asks
which one it got.
"""
from __future__ import annotations

from ..config import Config
from ..tracking import tracker_setup
from .base import GANBackend, Precision, resolve_precision
from .ddp import AccelerateGAN, accelerator_kwargs, make_accelerator
from .deepspeed import FP16_LOSS_SCALING, DeepSpeedGAN, launched_with_deepspeed

__all__ = ["GANBackend", "Precision", "resolve_precision", "AccelerateGAN", "accelerator_kwargs",
           "make_accelerator", "DeepSpeedGAN", "FP16_LOSS_SCALING", "launched_with_deepspeed", "make_backend"]


def make_backend(cfg: Config) -> GANBackend:
    """The run's backend, its precision resolved (:func:`resolve_precision`) and its trackers
    set up (``train.report_to``). Writes the resolved choices back into ``cfg`` (the run
    folder's config.yaml then says what ran): ``train.backend=deepspeed`` also when chosen by
    a DeepSpeed accelerate config, ``train.mixed_precision`` as asked for (the precision in
    force, which may fall back to fp32 without a GPU, is ``backend.precision``)."""
    precision = resolve_precision(cfg.train.mixed_precision)
    cfg.train.mixed_precision = precision.value
    log_with, project_dir = tracker_setup(cfg)
    if cfg.train.backend == "deepspeed" or launched_with_deepspeed():
        cfg.train.backend = "deepspeed"
        return DeepSpeedGAN(cfg, precision.value, precision_source=precision.source, log_with=log_with,
                            project_dir=project_dir)
    return AccelerateGAN.create(precision.value, grad_clip=cfg.optim.grad_clip,
                                precision_source=precision.source, log_with=log_with, project_dir=project_dir)
