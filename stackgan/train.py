"""The StackGAN trainer: one loop for stage I and stage II, any device, any number of processes.

    python -m stackgan.train --config configs/birds_stage1.yaml [--resume auto] key=value ...

The same entry runs under plain ``python``, ``torchrun``, ``accelerate launch`` and one Slurm
task per process (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the env).

One iteration, as in the official StackGAN: G makes a batch of fakes from (text, z); D is
updated on real / wrong / fake pairs (fakes detached); G is then updated through the new D
plus ``kl_coef`` x the conditioning-augmentation KL. Every knob is in ``stackgan/config.py``.

Exit status (what the job scripts act on): 0 finished, 2 bad config or input, 3 stopped by
SIGTERM/SIGUSR1/SIGUSR2 after saving a checkpoint (requeue me), 4 NaN/Inf in a loss (the
last good checkpoint is kept).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .backends import check_resume, launched_with_deepspeed
from .config import Config, ConfigError, dump_config, image_size, load_config, to_dict
from .data.meta import ShardError, ShardMeta, load_metadata
from .export import ExportError, load_stage1_for_stage2, save_export
from .layout import apply_layout, layout_min_hw

EXIT_OK, EXIT_BAD_INPUT, EXIT_REQUEUE, EXIT_NONFINITE = 0, 2, 3, 4
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class TrainInterrupted(Exception):
    """A stop signal arrived; a checkpoint was saved at ``step``."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} at step {step} (checkpoint saved)")
        self.signum, self.step = signum, step


class NonFiniteLoss(RuntimeError):
    """A loss became NaN/Inf; training stops without saving the broken state."""


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    export: Path | None


# --------------------------------------------------------------------------------------
# Checks before any expensive work
# --------------------------------------------------------------------------------------
def check_inputs(cfg: Config) -> ShardMeta:
    """Shards exist and fit the config (text dim, image size, split); stage-I export fits."""
    meta = load_metadata(cfg.data.shards)
    if cfg.data.split not in meta.splits:
        raise ShardError(f"data.split={cfg.data.split!r}: {cfg.data.shards} has splits {sorted(meta.splits)}")
    if meta.splits[cfg.data.split].num_samples <= 0 or not meta.splits[cfg.data.split].shards:
        raise ShardError(f"{cfg.data.shards}: split {cfg.data.split!r} is empty")
    for s in meta.splits[cfg.data.split].shards:
        if not (meta.root / s.name).is_file():
            raise ShardError(f"{meta.root / s.name}: listed in metadata.json but missing")
    if cfg.model.text_dim and cfg.model.text_dim != meta.text_dim:
        raise ConfigError(
            f"model.text_dim={cfg.model.text_dim} but {cfg.data.shards} holds {meta.text_dim}-d "
            f"{meta.encoder} embeddings (set model.text_dim=0 to take it from the shards)"
        )
    need = 76 if cfg.model.stage == 1 else 304
    if need not in meta.image_sizes:
        raise ShardError(f"stage {cfg.model.stage} needs {need}px crops; {cfg.data.shards} has {meta.image_sizes}")
    if cfg.train.metrics:
        from .metrics import names as metric_names

        unknown = [m for m in cfg.train.metrics.split(",") if m.strip() and m.strip() not in metric_names()]
        if unknown:
            raise ConfigError(f"train.metrics: unknown metric(s) {unknown}; known: {', '.join(metric_names())}")
    if cfg.model.stage == 2 and not cfg.model.stage1_export:
        raise ConfigError("model.stage=2 needs model.stage1_export=<stage-I run>/export/generator.pt")
    return meta


def class_index(meta: ShardMeta, cfg: Config) -> torch.Tensor:
    """Class id -> index 0..K-1 over the training split's classes (D's species head); -1 elsewhere."""
    classes = sorted(meta.splits[cfg.data.split].classes)
    if not classes:
        raise ShardError(f"loss.class_coef > 0: {cfg.data.shards} lists no classes for split {cfg.data.split!r}")
    lut = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    return lut


def steps_per_epoch(meta: ShardMeta, cfg: Config, world_size: int) -> int:
    return max(1, meta.splits[cfg.data.split].num_samples // (cfg.data.batch_size * world_size))


def total_steps(cfg: Config, spe: int) -> int:
    return cfg.train.steps if cfg.train.steps > 0 else max(1, math.ceil(cfg.train.epochs * spe))


def lr_factor(cfg: Config, step: int, spe: int) -> float:
    """StackGAN's schedule: multiply by lr_decay_factor every lr_decay_epochs epochs."""
    if cfg.optim.lr_decay_epochs <= 0:
        return 1.0
    every = max(1, round(cfg.optim.lr_decay_epochs * spe))
    return cfg.optim.lr_decay_factor ** (step // every)


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------
def _make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    use_cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    note = None
    if precision == "fp16" and not use_cuda:
        note = "mixed_precision=fp16 needs CUDA (loss scaling); this run has no GPU and runs in fp32"
        precision = "no"
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=True, find_unused_parameters=False)]
    if not use_cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # else each CPU process thinks it is alone
    acc = Accelerator(cpu=not use_cuda, mixed_precision=precision, kwargs_handlers=handlers)
    return acc, precision, note


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _grad_norm(module: torch.nn.Module) -> float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


class _StopFlag:
    """Records the first stop signal; handlers are restored on close."""

    def __init__(self, install: bool):
        self.signum = 0
        self.previous: dict[int, object] = {}
        if install:
            for s in STOP_SIGNALS:
                try:
                    self.previous[s] = signal.signal(s, self._handle)
                except ValueError:  # not the main thread: the caller handles signals
                    pass

    def _handle(self, signum, frame):
        if not self.signum:
            self.signum = signum

    def close(self):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def chain(self, signum: int) -> bool:
        """Call a Python handler that was there before us (e.g. submitit's). True if called."""
        prev = self.previous.get(signum)
        if callable(prev) and prev not in (signal.default_int_handler,):
            self.close()
            prev(signum, None)
            return True
        return False


# --------------------------------------------------------------------------------------
# One StackGAN iteration
# --------------------------------------------------------------------------------------
@dataclass
class StepOut:
    loss_d: torch.Tensor
    loss_g: torch.Tensor
    kl: torch.Tensor
    stats: dict
    grad_norm_d: float | None = None
    grad_norm_g: float | None = None


def loader_workers(requested: int, device: torch.device) -> int:
    """``data.num_workers``, or for -1 a size that fits the machine: the CPUs this process may
    use, shared among the processes of this node. On a GPU the loader gets all of its share
    but one core (at most 8: decoding is ~40x ahead of a CPU step and JPEG-bound on a GPU); on
    a CPU the step itself needs the cores, so one worker when there are cores to spare, else
    none (the stream is 40-50x faster than the CPU step; docs/performance.md)."""
    if requested >= 0:
        return requested
    if os.environ.get("SLURM_STEP_ID") and os.environ.get("SLURM_CPUS_PER_TASK"):  # one srun task per process
        share = int(os.environ["SLURM_CPUS_PER_TASK"])
    else:  # launchers that start every process of a node with the same CPUs (accelerate, torchrun)
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        share = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = max(1, share)
    if device.type == "cuda":
        return max(1, min(8, share - 1))
    return 1 if share >= 2 else 0


def adam_options(cfg: Config) -> dict:
    """Adam's keyword arguments besides the learning rate. Fused Adam (one kernel over all
    parameters, CPU and CUDA) measured fastest in ``python -m stackgan.bench``; the for-loop
    Adam is the fallback for ``optim.fused=false``."""
    kw: dict = dict(betas=(cfg.optim.beta1, cfg.optim.beta2))
    kw.update({"fused": True} if cfg.optim.fused else {"foreach": False})
    return kw


def gan_step(acc, G, D, opt_g, opt_d, real, emb, z, widx, cfg: Config, diag: bool = False,
             cls: torch.Tensor | None = None, bank=None, targets: torch.Tensor | None = None,
             r1: bool = False) -> StepOut:
    """D update on real / wrong / fake pairs, then G update through the updated D.

    G runs once: its fakes are detached for D and reused for G's loss (no recomputation).
    During G's update D is frozen and called without its DDP wrapper, so no gradient is
    computed or all-reduced for D. Losses stay on the device (no host sync here).
    ``bank`` (a :class:`stackgan.losses.CaptionBank`, with the batch's classes ``cls``): extra
    negative captions for the contrastive loss; the batch is pushed into it after the step.
    ``targets`` (B,): the batch's species as class indices, for D's species head
    (``loss.class_coef``): D learns them on real images, G on its fakes (``loss.class_g_coef``); with
    ``loss.class_twin`` D's twin head learns them on the fakes and G's loss subtracts it.
    ``r1``: this step carries the lazy R1 penalty (``loss.r1_gamma``, weighted by ``loss.r1_every``).
    ``loss.ms_coef`` > 0: the first ``loss.ms_samples`` captions get a second noise vector in
    the same G call (same batch statistics), for the mode-seeking term in G's loss.
    """
    from .augment import translate
    from .losses import class_loss, contrastive_loss, d_loss, g_loss, kl_loss, mode_seeking_loss, r1_penalty

    c_coef = cfg.loss.contrastive_coef
    c_coef_g = c_coef if cfg.loss.contrastive_g_coef < 0 else cfg.loss.contrastive_g_coef
    k_coef = cfg.loss.class_coef
    k_coef_g = k_coef if cfg.loss.class_g_coef < 0 else cfg.loss.class_g_coef
    twin = cfg.loss.class_twin  # validate(): only with class_coef > 0
    if k_coef > 0 and targets is None:
        raise ValueError("gan_step: loss.class_coef > 0 needs the batch's class indices (targets=)")
    shift = cfg.loss.diffaug_shift
    D_inner = acc.unwrap_model(D)
    n_ms, g_emb, g_z = 0, emb, z
    if cfg.loss.ms_coef > 0:  # one G call: both samples of a caption see the same batch statistics
        n_ms = len(z) if cfg.loss.ms_samples == 0 else min(cfg.loss.ms_samples, len(z))
        z_ms = torch.randn_like(z[:n_ms])
        g_emb, g_z = torch.cat([emb, emb[:n_ms]]), torch.cat([z, z_ms])
    with acc.autocast():
        fake, mu, logvar = G(g_emb, g_z)
    if n_ms:
        fake, fake_ms = fake[:len(z)], fake[len(z):]
        mu, logvar = mu[:len(z)], logvar[:len(z)]
    cond = emb if cfg.model.d_cond == "text" else mu.detach()  # what D is conditioned on

    r1 = r1 and cfg.loss.r1_gamma > 0
    real_in = real.detach().requires_grad_(True) if r1 else real
    with acc.autocast():
        out_real = D(translate(real_in, shift), cond, cond[widx])
        out_fake = D(translate(fake.detach(), shift), cond)
        loss_d, stats = d_loss(out_real, out_fake, kind=cfg.loss.kind, uncond_coef=cfg.loss.uncond_coef)
        if c_coef > 0:
            labels = bank_emb = bank_cls = None
            if bank is not None:
                labels = cls
                bank_emb, bank_cls = bank.get()
            codes = D_inner.text_codes(bank_emb) if bank_emb is not None and len(bank_emb) else None
            fakes = out_fake.img_code if cfg.loss.contrastive_fakes else None
            stats["loss_contrastive_real"] = contrastive_loss(out_real, cfg.loss.contrastive_temp, labels, codes,
                                                              bank_cls, fakes)
            loss_d = loss_d + c_coef * stats["loss_contrastive_real"]
        if k_coef > 0:
            stats["loss_class_real"] = class_loss(out_real, targets)
            loss_d = loss_d + k_coef * stats["loss_class_real"]
        if twin:  # the twin head learns the species of G's fakes
            stats["loss_twin_d"] = class_loss(out_fake, targets, twin=True)
            loss_d = loss_d + k_coef * stats["loss_twin_d"]
    if r1:
        stats["loss_r1"] = r1_penalty(real_in, out_real)
        loss_d = loss_d + 0.5 * cfg.loss.r1_gamma * cfg.loss.r1_every * stats["loss_r1"]
    gnorm_d = _update(acc, D, opt_d, loss_d, cfg, diag)

    D_inner.requires_grad_(False)  # DeepSpeed ZeRO-2 also needs this (else D's grads get reduced twice)
    try:
        with acc.autocast():
            out_g = D_inner(translate(fake, shift), cond)
            kl = kl_loss(mu, logvar)
            loss_g = g_loss(out_g, kind=cfg.loss.kind, uncond_coef=cfg.loss.uncond_coef) + cfg.loss.kl_coef * kl
            if c_coef > 0:
                if codes is not None:  # D moved: its codes of the stored captions too (constants for G)
                    with torch.no_grad():
                        codes = D_inner.text_codes(bank_emb)
                stats["loss_contrastive_fake"] = contrastive_loss(out_g, cfg.loss.contrastive_temp, labels, codes, bank_cls)
                loss_g = loss_g + c_coef_g * stats["loss_contrastive_fake"]
            if k_coef > 0:
                stats["loss_class_fake"] = class_loss(out_g, targets)
                loss_g = loss_g + k_coef_g * stats["loss_class_fake"]
            if twin:
                stats["loss_twin_fake"] = class_loss(out_g, targets, twin=True)
                loss_g = loss_g - k_coef_g * stats["loss_twin_fake"]
            if n_ms:
                stats["loss_ms"] = mode_seeking_loss(fake[:n_ms], fake_ms, z[:n_ms], z_ms)
                loss_g = loss_g + cfg.loss.ms_coef * stats["loss_ms"]
        gnorm_g = _update(acc, G, opt_g, loss_g, cfg, diag)
    finally:
        D_inner.requires_grad_(True)
    if bank is not None:
        bank.push(emb, cls)
    return StepOut(loss_d.detach(), loss_g.detach(), kl.detach(), {k: v.detach() for k, v in stats.items()},
                   gnorm_d, gnorm_g)


def _update(acc, model, opt, loss: torch.Tensor, cfg: Config, diag: bool) -> float | None:
    """Backward, optional clipping and optimizer step of one network; its grad norm when ``diag``.

    A DeepSpeed engine does all of it itself (reduction, clipping from its config, step).
    """
    if cfg.train.backend == "deepspeed":
        return acc.update(model, loss, diag)
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    gnorm = _grad_norm(acc.unwrap_model(model)) if diag else None
    if cfg.optim.grad_clip > 0:
        acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    return gnorm


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------
def train(cfg: Config, resume: str = "auto", *, handle_signals: bool = True) -> TrainResult:
    from .data.stream import TrainStream, load_fixed_samples, to_unit_range
    from .ema import EMA
    from .grid import save_grid
    from .diversity import diversity_score
    from .losses import CaptionBank, wrong_indices
    from .models import build_discriminator, build_generator

    meta = check_inputs(cfg)  # before anything expensive
    text_dim = meta.text_dim
    stage1, stage1_cfg = None, None
    if cfg.model.stage == 2:
        stage1, stage1_cfg = load_stage1_for_stage2(cfg.model.stage1_export, text_dim, meta.encoder)
    resume_path = ckpt.resolve(cfg.train.run_dir, resume)

    if cfg.train.backend == "deepspeed" or launched_with_deepspeed():
        from .backends import DeepSpeedGAN  # two ZeRO engines in place of one Accelerator

        cfg.train.backend = "deepspeed"  # also when chosen by a DeepSpeed accelerate config
        acc = DeepSpeedGAN(cfg)
        precision, precision_note = acc.precision, acc.note
    else:
        acc, precision, precision_note = _make_accelerator(cfg)
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    main = acc.is_main_process
    run_dir = Path(cfg.train.run_dir)
    spe = steps_per_epoch(meta, cfg, world)
    n_steps = total_steps(cfg, spe)
    size = image_size(cfg.model.stage)

    def log(msg: str) -> None:
        if main:
            print(f"[stackgan] {msg}", flush=True)

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    if precision_note:
        log(f"WARNING: {precision_note}")
        warnings.warn(precision_note)
    log(f"stage {cfg.model.stage} | {world} process(es) on {device} | precision {precision} | "
        f"{n_steps} steps ({spe} per epoch, global batch {cfg.data.batch_size * world}) | run {run_dir}")

    # ---- models, optimisers ------------------------------------------------------
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    G = build_generator(cfg.model, text_dim, stage1=stage1)
    class_lut = class_index(meta, cfg) if cfg.loss.class_coef > 0 else None
    D = build_discriminator(cfg.model, text_dim, num_classes=0 if class_lut is None else int(class_lut.max()) + 1,
                            class_twin=cfg.loss.class_twin)
    if cfg.train.channels_last and cfg.train.backend == "ddp":  # DeepSpeed wants contiguous weights
        example = (torch.zeros(2, text_dim), torch.zeros(2, cfg.model.z_dim))
        apply_layout(G, D, example, cfg.model.d_cond, layout_min_hw(cfg.train.channels_last_min_hw, device))
    ema = None
    if cfg.optim.ema_decay > 0:
        ema = EMA(G, decay=cfg.optim.ema_decay, start=cfg.optim.ema_start, warmup=cfg.optim.ema_warmup)

    adam_kw = adam_options(cfg)
    opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=cfg.optim.lr_g, **adam_kw)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d, **adam_kw)

    # ---- resume ------------------------------------------------------------------
    step = 0
    bank = CaptionBank(cfg.loss.contrastive_bank, text_dim, device) if cfg.loss.contrastive_bank > 0 else None
    z_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + 1)
    pair_gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + 10_000)
    if resume_path is not None:
        state, rng = ckpt.load(resume_path, rank)
        check_resume(state, cfg.train.backend, world, resume_path)
        try:
            G.load_state_dict(state["G"])
            D.load_state_dict(state["D"])
        except RuntimeError as e:
            raise ckpt.CheckpointError(
                f"{resume_path} was written for other networks than this config builds "
                f"(model.* differs from the checkpoint's config.yaml); use another train.run_dir or --resume none. "
                f"Details: {str(e).splitlines()[0]}") from None
        if cfg.train.backend == "ddp":  # DeepSpeed: optimizer state is in the engines' files, loaded after prepare
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        step = int(state["step"])
        if rng is not None and state.get("world_size") == world:
            ckpt.set_rng_state(rng)
            z_gen.set_state(rng["extra"]["z"])
            pair_gen.set_state(rng["extra"]["pair"])
            if bank is not None and "bank" in rng["extra"]:
                bank.load_state_dict(rng["extra"]["bank"])
        else:
            log("WARNING: world size changed since the checkpoint; RNG streams are re-seeded")
            torch.manual_seed(cfg.train.seed * 7919 + step * 31 + rank)
        log(f"resumed from {resume_path} at step {step}")
    else:
        torch.manual_seed(cfg.train.seed * 7919 + rank)  # per-rank CA-net noise

    if cfg.train.compile:
        t0 = time.time()
        G, D = torch.compile(G), torch.compile(D)
        log(f"torch.compile requested (compiles lazily on the first step; wrapped in {time.time() - t0:.1f}s)")
    G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    G_inner, D_inner = acc.unwrap_model(G), acc.unwrap_model(D)
    if cfg.train.backend == "deepspeed":
        log(acc.describe())
        if resume_path is not None:
            acc.load_checkpoint(resume_path)  # both engines: weights and ZeRO optimizer partitions
    if resume_path is not None and state.get("scaler") is not None and acc.scaler is not None:
        acc.scaler.load_state_dict(state["scaler"])

    # ---- data --------------------------------------------------------------------
    workers = loader_workers(cfg.data.num_workers, device)
    log(f"data: {workers} loader worker(s) per process")
    stream = TrainStream(
        cfg.data.shards, cfg.data.split, size, cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
        world_size=world, num_workers=workers, shuffle_buffer=cfg.data.shuffle_buffer,
        emb_mode=cfg.data.emb_mode, emb_k=cfg.data.emb_k, on_corrupt=cfg.data.on_corrupt,
        pin_memory=device.type == "cuda", img_dtype="uint8",  # 1/4 of the bytes; scaled on the device
    )
    if resume_path is not None and state.get("stream") not in (None, stream.signature()):
        log("WARNING: the data stream differs from the checkpoint's (shards, batch size, world size or "
            "augmentation settings changed): training continues, but not on the batches an uninterrupted run saw")
    fixed = load_fixed_samples(cfg.data.shards, cfg.data.split, cfg.data.fixed_samples, size)
    n_fixed = len(fixed["caption"])
    fixed_z = torch.randn(n_fixed, 4, cfg.model.z_dim, generator=torch.Generator().manual_seed(1234))
    fixed_emb = fixed["emb"].to(device)

    # ---- logging -----------------------------------------------------------------
    tb = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run_dir / "tb"))
        except Exception as e:  # tensorboard missing is not fatal
            log(f"TensorBoard disabled: {e}")
        if resume_path is None or not (run_dir / "samples" / "reals.png").exists():
            save_grid(fixed["img"], run_dir / "samples" / "reals.png", nrow=n_fixed, captions=fixed["caption"][:1])
    jsonl = open(run_dir / "log.jsonl", "a") if main else None

    def write_log(rec: dict) -> None:
        if jsonl is not None:
            jsonl.write(json.dumps(rec) + "\n")
            jsonl.flush()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, rec["step"])

    def sample_grid(at: int) -> None:
        if not main:
            return
        gen = ema.module if ema is not None else G_inner
        was_training = gen.training
        gen.eval()
        with torch.no_grad(), acc.autocast():
            imgs = [gen(fixed_emb, fixed_z[:, j].to(device))[0].float().cpu() for j in range(fixed_z.shape[1])]
        gen.train(was_training)
        grid = torch.stack(imgs, 1).reshape(-1, *imgs[0].shape[1:])  # row = one caption, 4 z
        if main:
            save_grid(grid, run_dir / "samples" / f"step-{at:08d}.png", nrow=fixed_z.shape[1],
                      captions=list(fixed["caption"]))

    eval_ctx = None

    def snapshot_metrics(at: int) -> None:
        """The configured metrics on the EMA generator, on every rank; rank 0 appends metrics.jsonl."""
        nonlocal eval_ctx
        from .metrics import EvalContext, compute

        if eval_ctx is None:
            eval_ctx = EvalContext(shards=cfg.data.shards, image_size=size, z_dim=cfg.model.z_dim,
                                   text_encoder=meta.encoder, text_dim=text_dim, device=device,
                                   judge=cfg.train.judge, judge_samples=cfg.train.metrics_samples, log=log)
        gen = ema.module if ema is not None else G_inner
        res = compute(cfg.train.metrics, gen, eval_ctx, step=at, jsonl=run_dir / "metrics.jsonl")
        log(f"metrics at step {at}: " + "; ".join(
            f"{name} " + ", ".join(f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float) and k != "seconds")
            for name, r in res.items()))

    def state_fn() -> dict:
        ds = cfg.train.backend == "deepspeed"  # its optimizer state is sharded: in the engines' files
        return {
            "G": G_inner.state_dict(), "D": D_inner.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "opt_g": None if ds else opt_g.state_dict(), "opt_d": None if ds else opt_d.state_dict(),
            "backend": cfg.train.backend,
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "step": step, "world_size": world, "config": to_dict(cfg), "stream": stream.signature(),
            "text_encoder": meta.encoder, "text_dim": text_dim,
        }

    def save_checkpoint() -> Path:
        extra = {"z": z_gen.get_state(), "pair": pair_gen.get_state()}
        if bank is not None:  # per rank, like the RNG streams: each rank's bank holds its own batches
            extra["bank"] = bank.state_dict()
        if cfg.train.backend == "deepspeed":  # every rank also writes its engines' ZeRO partitions
            return acc.save_checkpoint(run_dir, step, state_fn, extra, keep_last=cfg.train.keep_last)
        return ckpt.save(run_dir, step, state_fn, extra, rank=rank, barrier=acc.wait_for_everyone,
                         keep_last=cfg.train.keep_last)

    def export() -> Path:
        path = run_dir / "export" / "generator.pt"
        gen = ema.module if ema is not None else G_inner
        if main:
            save_export(path, gen, cfg.model, text_encoder=meta.encoder, text_dim=text_dim, step=step,
                        config=to_dict(cfg), stage1_model=stage1_cfg)
        acc.wait_for_everyone()
        return path

    # ---- loop --------------------------------------------------------------------
    stop = _StopFlag(install=handle_signals)
    check_every = 1 if device.type == "cpu" else 10  # stop-flag agreement costs a sync on GPU
    loss_acc = torch.zeros(3, device=device)  # D, G, KL summed since the last log (no per-step sync)
    stats_acc: dict[str, torch.Tensor] = {}
    stats_n: dict[str, int] = {}
    n_acc, t_last, step_last = 0, time.time(), step
    bar = None
    if main and cfg.train.tqdm:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps, initial=step, desc=f"stage {cfg.model.stage}", dynamic_ncols=True)
    batches = stream.iterate(start=step)  # its loader has its own generator: the global RNG is untouched
    G.train()
    D.train()
    try:
        t_begin = time.time()
        while step < n_steps:
            # agree on stopping at a step boundary (every rank saves the same step)
            if step % check_every == 0:
                over = cfg.train.time_limit_min > 0 and time.time() - t_begin > 60 * cfg.train.time_limit_min
                sig = stop.signum
                if world > 1:
                    t = torch.tensor([sig, int(over)], device=device)
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    sig, over = int(t[0].item()), bool(t[1].item())
                if sig:
                    _check_finite(loss_acc, step, acc)
                    path = save_checkpoint()
                    log(f"signal {signal.Signals(sig).name}: checkpoint {path} saved at step {step}")
                    raise TrainInterrupted(sig, step)
                if over:  # a wall-clock budget for this launch: finish here (checkpoint, export, COMPLETE)
                    log(f"time limit of {cfg.train.time_limit_min} min reached at step {step}")
                    n_steps = step
                    break

            batch = next(batches)
            real = to_unit_range(batch["img"].to(device, non_blocking=True))
            if cfg.train.channels_last:
                real = real.contiguous(memory_format=torch.channels_last)
            emb = batch["emb"].to(device, non_blocking=True)
            cls = batch["cls"]
            bsz = real.shape[0]
            scale = lr_factor(cfg, step, spe)
            for group in opt_g.param_groups:
                group["lr"] = cfg.optim.lr_g * scale
            for group in opt_d.param_groups:
                group["lr"] = cfg.optim.lr_d * scale

            z = torch.randn(bsz, cfg.model.z_dim, generator=z_gen).to(device, non_blocking=True)
            widx = wrong_indices(cls, cfg.loss.wrong, generator=pair_gen).index
            diag = (step + 1) % cfg.train.diag_every == 0
            out = gan_step(acc, G, D, opt_g, opt_d, real, emb, z, widx.to(device), cfg, diag=diag,
                           cls=cls.to(device) if bank is not None else None, bank=bank,
                           targets=None if class_lut is None else class_lut[cls].to(device),
                           r1=step % cfg.loss.r1_every == 0)
            loss_d, loss_g, kl, stats = out.loss_d, out.loss_g, out.kl, out.stats
            if ema is not None:
                ema.update(G_inner, step)
            step += 1
            if bar is not None:
                bar.update(1)

            loss_acc += torch.stack([loss_d.detach().float(), loss_g.detach().float(), kl.detach().float()])
            for k, v in stats.items():  # some stats (loss_r1) come from some steps only: mean over those
                stats_acc[k] = stats_acc.get(k, 0) + v.detach().float()
                stats_n[k] = stats_n.get(k, 0) + 1
            n_acc += 1

            if step % cfg.train.log_every == 0 or step == n_steps:
                _check_finite(loss_acc, step, acc)
                vals = (loss_acc / n_acc).tolist()
                now = time.time()
                ips = (step - step_last) * bsz * world / max(now - t_last, 1e-9)
                rec = {"step": step, "epoch": step / spe, "time": now, "img_per_s": ips, "world_size": world,
                       "loss_d": vals[0], "loss_g": vals[1], "kl": vals[2],
                       "g_d_ratio": vals[1] / max(abs(vals[0]), 1e-8),
                       "lr_g": cfg.optim.lr_g * scale, "lr_d": cfg.optim.lr_d * scale,
                       "mem_mb": _memory_mb(device)}
                rec.update({k: float(v / stats_n[k]) for k, v in stats_acc.items()})
                write_log(rec)
                d_outs = " ".join(f"{k} {rec[k]:.2f}" for k in stats_acc if k.startswith("d_"))
                msg = (f"step {step}/{n_steps} | {ips:.1f} img/s | D {vals[0]:.3f} G {vals[1]:.3f} "
                       f"KL {vals[2]:.3f} | {d_outs} | mem {rec['mem_mb']:.0f} MB")
                if bar is not None:
                    bar.write(msg)
                else:
                    log(msg)
                loss_acc.zero_()
                stats_acc.clear()
                stats_n.clear()
                n_acc, t_last, step_last = 0, now, step

            if diag and main:
                gen = ema.module if ema is not None else G_inner
                div = diversity_score(gen, fixed_emb, 4, torch.Generator().manual_seed(99))
                rec = {"step": step, "grad_norm_d": out.grad_norm_d, "grad_norm_g": out.grad_norm_g, "diversity": div}
                write_log(rec)
                if div < cfg.train.diversity_warn:
                    log(f"WARNING: sample diversity {div:.4f} < {cfg.train.diversity_warn} at step {step}: "
                        "mode collapse? (try lower lr_d, loss.kind=hinge, model.spectral_norm=true)")
            if step % cfg.train.sample_every == 0 or step == n_steps:
                sample_grid(step)
            if cfg.train.metrics and cfg.train.metrics_every and step % cfg.train.metrics_every == 0 \
                    and step < n_steps:
                snapshot_metrics(step)
            if step % cfg.train.ckpt_every == 0 and step < n_steps:
                _check_finite(loss_acc, step, acc)
                save_checkpoint()

        if step % cfg.train.sample_every:  # stopped early by the time limit: one last grid
            sample_grid(step)
        _check_finite(loss_acc, step, acc)
        save_checkpoint()
        sync = _sync_report(acc, G_inner, D_inner)
        write_log({"step": step, "event": "finished", "world_size": world, **sync})
        if not sync["ranks_identical"]:
            log(f"WARNING: parameters differ across ranks: {sync['fingerprints']}")
        out = export()
        if cfg.train.metrics:
            snapshot_metrics(step)
        if main:
            (run_dir / "COMPLETE").write_text(json.dumps({"step": step, "time": time.time()}))
        log(f"finished {step} steps; generator export {out}")
        if world > 1:
            acc.wait_for_everyone()  # nothing in flight when the process group is torn down
        return TrainResult(step=step, run_dir=run_dir, export=out)
    except TrainInterrupted as e:
        if stop.chain(e.signum):  # e.g. submitit's own checkpoint/requeue handler
            pass
        raise
    finally:
        stop.close()
        if bar is not None:
            bar.close()
        if jsonl is not None:
            jsonl.close()
        if tb is not None:
            tb.close()


def _fingerprint(module: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()  # parameters only: BN running stats are per-rank between DDP's broadcasts
    for k, v in sorted(module.named_parameters()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _sync_report(acc, G: torch.nn.Module, D: torch.nn.Module) -> dict:
    """Hashes of G's and D's parameters on every rank: DDP must keep them bit-identical."""
    mine = f"{_fingerprint(G)}:{_fingerprint(D)}"
    if acc.num_processes > 1:
        everyone: list = [None] * acc.num_processes
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return {"fingerprints": everyone, "ranks_identical": len(set(everyone)) == 1}


def _check_finite(loss_acc: torch.Tensor, step: int, acc) -> None:
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss_acc).all()) else 1.0], device=loss_acc.device)
    if acc.num_processes > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise NonFiniteLoss(
            f"a loss became NaN/Inf before step {step}; stopping without saving this state. "
            "The last good checkpoint is kept: resume from it with a lower learning rate "
            "(optim.lr_g / optim.lr_d), optim.grad_clip, or train.mixed_precision=no."
        )


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stackgan.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML experiment config (configs/*.yaml)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in train.run_dir), none, or a checkpoint/run folder")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr_g=5e-4")
    p.epilog = "exit status: 0 done, 2 bad config/input, 3 checkpointed on a signal (requeue), 4 NaN/Inf loss"
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume)
    except (ConfigError, ShardError, ExportError, ckpt.CheckpointError) as e:
        print(f"stackgan.train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except TrainInterrupted as e:
        print(f"stackgan.train: {e}; exiting with status {EXIT_REQUEUE} (requeue)", file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    except NonFiniteLoss as e:
        print(f"stackgan.train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NONFINITE
    finally:
        close_process_group()
    return EXIT_OK


def close_process_group() -> None:
    """Tear the process group down before the interpreter exits. Left to exit-time
    destructors, gloo's threads can abort a rank that finished cleanly ("terminate called
    without an active exception", exit -6 under load), and the launcher reports a failure."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError) as e:  # already torn down by a backend
            warnings.warn(f"stackgan.train: process group teardown: {e}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
