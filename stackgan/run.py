"""Building a training run, and saving / restoring / exporting it.

:func:`build_run` does everything before the first step, in the order that keeps failures
cheap: config and shard checks, the frozen stage-I generator (stage II), the accelerator,
G and D, the optimisers, the restore from a checkpoint, and the data stream. The result is a
:class:`Run`, which :func:`save_checkpoint` writes whole and :func:`restore` reads back, so a
resumed run continues on exactly the batches, noise and wrong pairs an uninterrupted one
would have seen.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import checkpoint as ckpt
from .backends import GANBackend, make_backend
from .config import (Config, ConfigError, ModelConfig, changed_by_removal, image_size, lr_scale, process_batch,
                     to_dict)
from .data.captions import group_indices
from .data.meta import ShardError, ShardMeta, load_metadata
from .data.storage import parse as parse_store
from .data.stream import TrainStream
from .ema import EMA, STANDING_BATCHES
from .export import export_path, load_stage1_for_stage2, save_export
from .images import stored_size
from .layout import apply_layout, layout_min_hw
from .losses import CaptionBank
from .metrics import EvalContext, MetricError, check as check_metric_names
from .models import CODE_DIM, build_discriminator, build_generator
from .resume import MAY_CHANGE, check_changes, config_changes, describe_changes, record_config
from .step import needs_words
from .words import WORD_DIM, Words, reads_words, word_vectors

SPLIT = "train"  # the split the trainer streams; metrics score the test split's unseen species
CPU_NCHW_BELOW = 32  # CPU: layers on maps narrower than this stay NCHW (faster there; docs/performance.md)


@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: Config
    meta: ShardMeta
    acc: GANBackend  # DDP through Accelerate, or two DeepSpeed engines (stackgan.backends)
    G: nn.Module  # as prepared (DDP-wrapped, a DeepSpeed engine, ...)
    D: nn.Module
    opt_g: Any
    opt_d: Any
    ema: EMA | None
    bank: CaptionBank | None  # extra contrastive negatives (loss.contrastive_bank), per rank
    species: torch.Tensor | None  # class id -> D's species-head index (loss.class_coef)
    attr_groups: list[list[int]] | None  # D's attribute head's groups (loss.attr_coef)
    words: bool  # steps need the captions' word vectors (step.needs_words)
    stream: Any  # data.stream.TrainStream
    z_gen: torch.Generator  # noise, per rank
    pair_gen: torch.Generator  # wrong pairs, per rank
    step: int
    n_steps: int
    steps_per_epoch: int
    stage1_cfg: ModelConfig | None  # stage II: the frozen stage-I generator's config (for the export)
    resumed_from: Path | None
    log: Callable[[str], None]

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.run_dir)

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def G_inner(self) -> nn.Module:
        return self.acc.unwrap_model(self.G)

    @property
    def D_inner(self) -> nn.Module:
        return self.acc.unwrap_model(self.D)

    @property
    def sampler(self) -> nn.Module:
        """The generator to sample and score: the EMA copy where there is one (with BatchNorm
        statistics recomputed for its own weights)."""
        return self.ema.sampler() if self.ema is not None else self.G_inner

    def set_lr(self) -> None:
        """StackGAN's schedule: both learning rates halve every ``optim.lr_decay_epochs``, times
        the ``data.batch_rule`` factor for this number of processes."""
        scale = lr_factor(self.cfg, self.step, self.steps_per_epoch) * lr_scale(self.cfg.data, self.world)
        for opt, lr in ((self.opt_g, self.cfg.optim.lr_g), (self.opt_d, self.cfg.optim.lr_d)):
            for group in opt.param_groups:
                group["lr"] = lr * scale


# --------------------------------------------------------------------------------------
# Checks before any expensive work
# --------------------------------------------------------------------------------------
def check_inputs(cfg: Config) -> ShardMeta:
    """Shards exist and fit the config (image size, train split); the metrics can run."""
    meta = load_metadata(cfg.data.shards)
    if SPLIT not in meta.splits:
        raise ShardError(f"{cfg.data.shards} has no {SPLIT!r} split (has {sorted(meta.splits)})")
    if meta.splits[SPLIT].num_samples <= 0 or not meta.splits[SPLIT].shards:
        raise ShardError(f"{cfg.data.shards}: split {SPLIT!r} is empty")
    store = parse_store(meta.root)
    for s in meta.splits[SPLIT].shards if not store.remote else ():  # remote: fetched and checked on use
        if not store.path(s.name).is_file():
            raise ShardError(f"{store.where(s.name)}: listed in metadata.json but missing")
    need = stored_size(image_size(cfg.model.stage))
    if need not in meta.image_sizes:
        raise ShardError(f"stage {cfg.model.stage} needs {need}px crops; {cfg.data.shards} has {meta.image_sizes}")
    if cfg.train.metrics:
        check_metrics(cfg, meta)
    if cfg.loss.attr_coef > 0 and not meta.attributes:
        raise ShardError(f"loss.attr_coef={cfg.loss.attr_coef} needs attribute labels: "
                         f"{cfg.data.shards}/metadata.json lists no attributes (CUB and the embedded set "
                         "have them; set loss.attr_coef=0)")
    if cfg.model.stage == 2 and not cfg.model.stage1_export:
        raise ConfigError("model.stage=2 needs "
                          "model.stage1_export=<stage-I run>/export/generator.safetensors")
    return meta


def eval_context(cfg: Config, meta: ShardMeta, device: torch.device | str,
                 log: Callable[[str], None]) -> EvalContext:
    """What the metric snapshots need: the shards, the weights the config names, the sample counts."""
    return EvalContext(shards=cfg.data.shards, image_size=image_size(cfg.model.stage), z_dim=cfg.model.z_dim,
                       text_encoder=meta.encoder, text_dim=meta.text_dim, device=device,
                       judge=cfg.train.judge,
                       judge_samples=cfg.train.metrics_samples, num_samples=cfg.train.metrics_samples,
                       inception=cfg.train.inception, fid_inception=cfg.train.fid_inception, log=log)


def check_metrics(cfg: Config, meta: ShardMeta) -> None:
    """Every requirement of ``train.metrics`` (known names, weights files, attributes, the test
    split), checked now rather than at the first snapshot, hours into the run."""
    try:
        check_metric_names(cfg.train.metrics, eval_context(cfg, meta, "cpu", print))
    except MetricError as e:
        raise ConfigError(f"train.metrics={cfg.train.metrics}: {e} (the weights are config keys: "
                          "train.inception, train.fid_inception)") from None


def class_index(meta: ShardMeta) -> torch.Tensor:
    """Class id -> index 0..K-1 over the training split's classes (D's species head); -1 elsewhere."""
    classes = sorted(meta.splits[SPLIT].classes)
    if not classes:
        raise ShardError(f"loss.class_coef > 0: {meta.root} lists no classes for split {SPLIT!r}")
    lut = torch.full((max(classes) + 1,), -1, dtype=torch.long)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    return lut


def steps_per_epoch(meta: ShardMeta, cfg: Config, world_size: int) -> int:
    """Global batches per epoch (the tail that does not fill one is dropped, as StackGAN does)."""
    return max(1, meta.splits[SPLIT].num_samples // (process_batch(cfg.data, world_size) * world_size))


def total_steps(cfg: Config, spe: int) -> int:
    return cfg.train.steps if cfg.train.steps > 0 else max(1, math.ceil(cfg.train.epochs * spe))


def lr_factor(cfg: Config, step: int, spe: int) -> float:
    """0.5 ** (epochs done // optim.lr_decay_epochs); 1 when the decay is off."""
    if cfg.optim.lr_decay_epochs <= 0:
        return 1.0
    return 0.5 ** (step // max(1, round(cfg.optim.lr_decay_epochs * spe)))


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
    """Adam's keyword arguments besides the learning rate: fused Adam (one kernel over all
    parameters, CPU and CUDA) measured fastest in ``python -m stackgan.bench``."""
    return dict(betas=(cfg.optim.beta1, cfg.optim.beta2), fused=True)


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------
def cuda_settings(cfg: Config) -> None:
    """TF32 and cuDNN autotuning (``train.tf32``, ``train.cudnn_benchmark``); no-ops on CPU."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark


def build_models(cfg: Config, meta: ShardMeta, stage1: nn.Module | None, device: torch.device,
                 channels_last: bool = True):
    """G and D with identical initial weights on every rank, in the trainer's memory layout
    (``channels_last``: whether the backend keeps it)."""
    torch.manual_seed(cfg.train.seed)
    G = build_generator(cfg.model, meta.text_dim, stage1=stage1)
    classes = len(meta.splits[SPLIT].classes) if cfg.loss.class_coef > 0 else 0
    attributes = len(meta.attributes) if cfg.loss.attr_coef > 0 else 0
    D = build_discriminator(cfg.model, meta.text_dim, code_dim=CODE_DIM if cfg.loss.contrastive_coef > 0 else 0,
                            num_classes=classes, num_attributes=attributes, word_codes=cfg.loss.word_coef > 0)
    if cfg.train.channels_last and channels_last:
        words = Words(torch.zeros(2, 1, WORD_DIM), torch.ones(2, 1, dtype=torch.bool))
        example = (torch.zeros(2, meta.text_dim), torch.zeros(2, cfg.model.z_dim), words)
        apply_layout(G, D, example, cfg.model.d_cond, layout_min_hw(CPU_NCHW_BELOW, device))
    return G, D


def standing_inputs(cfg: Config, words: bool = False) -> list[tuple]:
    """The (embedding, noise) batches the EMA generator's BatchNorm statistics are computed over:
    the first :data:`STANDING_BATCHES` global batches of the run's train stream, the same on every
    rank and in every launch, with noise from the run seed; ``words``: with the captions' word
    vectors (a generator with ``model.word_attn``)."""
    stream = TrainStream(
        cfg.data.shards, SPLIT, image_size(cfg.model.stage), cfg.data.batch_size, seed=cfg.train.seed,
        num_workers=0, shuffle_buffer=cfg.data.shuffle_buffer, emb_mode="one" if cfg.data.emb_k == 1 else "mean",
        emb_k=cfg.data.emb_k, on_corrupt=cfg.data.on_corrupt, img_dtype="uint8",
        cache_dir=cfg.data.cache_dir, cache_gb=cfg.data.cache_gb)
    it = stream.iterate()
    raws = [next(it) for _ in range(STANDING_BATCHES)]
    it.close()
    gen = torch.Generator().manual_seed(cfg.train.seed + 4242)
    out = [(r["emb"], torch.randn(r["emb"].shape[0], cfg.model.z_dim, generator=gen)) for r in raws]
    if words:
        return [(e, z, word_vectors(r["caption"])) for (e, z), r in zip(out, raws)]
    return out


def build_run(cfg: Config, resume: str = "auto") -> Run:
    """Everything before the first step; see the module docstring for the order."""
    meta = check_inputs(cfg)
    stage1, stage1_cfg = None, None
    if cfg.model.stage == 2:
        stage1, stage1_cfg = load_stage1_for_stage2(cfg.model.stage1_export, meta.text_dim, meta.encoder)
    resume_path = ckpt.resolve(cfg.train.run_dir, resume)
    acc = make_backend(cfg)
    cuda_settings(cfg)
    main = acc.is_main_process

    def log(msg: str) -> None:
        if main:
            print(f"[stackgan] {msg}", flush=True)

    run_dir = Path(cfg.train.run_dir)
    if main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
    if acc.note:
        log(f"WARNING: {acc.note}")
        warnings.warn(acc.note)
    world, batch = acc.num_processes, process_batch(cfg.data, acc.num_processes)
    spe = steps_per_epoch(meta, cfg, world)
    n_steps = total_steps(cfg, spe)
    log(f"stage {cfg.model.stage} | {world} process(es) on {acc.device} | "
        f"precision {acc.precision} (source: {acc.precision_source}) | {n_steps} steps ({spe} per epoch) | "
        f"run {run_dir}")
    log(f"batch: global {batch * world} = {world} x {batch} (recipe's {cfg.data.batch_size}, data.batch_rule="
        f"{cfg.data.batch_rule}: learning rates x {lr_scale(cfg.data, world):g})")

    G, D = build_models(cfg, meta, stage1, acc.device, channels_last=acc.keeps_channels_last)
    opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=cfg.optim.lr_g, **adam_options(cfg))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d, **adam_options(cfg))
    rank = acc.process_index
    run = Run(cfg=cfg, meta=meta, acc=acc, G=G, D=D, opt_g=opt_g, opt_d=opt_d, ema=None,
              bank=CaptionBank(cfg.loss.contrastive_bank, meta.text_dim, acc.device) if cfg.loss.contrastive_bank else None,
              species=class_index(meta).to(acc.device) if cfg.loss.class_coef > 0 else None,
              attr_groups=group_indices(meta.attributes) if cfg.loss.attr_coef > 0 else None,
              words=needs_words(cfg, G), stream=None,
              z_gen=torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + 1),
              pair_gen=torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + 10_000),
              step=0, n_steps=n_steps, steps_per_epoch=spe, stage1_cfg=stage1_cfg, resumed_from=resume_path, log=log)
    state = restore(run, resume_path, force=resume == "force") if resume_path is not None else None
    if state is None:
        torch.manual_seed(cfg.train.seed * 7919 + rank)  # per-rank CA-net noise
        if main:
            record_config(run_dir, cfg, 0, None)
    if main and run.step < n_steps:  # more steps to train: not complete (any more), nor stopped
        for marker in ("COMPLETE", "TIME_LIMIT"):
            if (run_dir / marker).is_file():
                (run_dir / marker).unlink()
                log(f"{marker} removed: training continues from step {run.step} to {n_steps}")

    if cfg.train.compile:
        run.G, run.D = torch.compile(run.G), torch.compile(run.D)
        log("torch.compile requested (compiles lazily on the first step)")
    run.G, run.D, run.opt_g, run.opt_d = acc.prepare(run.G, run.D, run.opt_g, run.opt_d)
    if cfg.optim.ema_decay > 0:  # from the prepared G: on its device, in its precision's master weights
        run.ema = EMA(run.G_inner, decay=cfg.optim.ema_decay)
        if state is not None and state.get("ema") is not None:
            run.ema.load_state_dict(state["ema"])
    log(acc.describe())
    if state is not None:  # optimisers / grad scaler, or both engines' ZeRO partitions
        acc.load_checkpoint(resume_path, state)

    workers = loader_workers(cfg.data.num_workers, acc.device)
    log(f"data: {workers} loader worker(s) per process")
    run.stream = TrainStream(
        cfg.data.shards, SPLIT, image_size(cfg.model.stage), batch, seed=cfg.train.seed, rank=rank,
        world_size=acc.num_processes, num_workers=workers, shuffle_buffer=cfg.data.shuffle_buffer,
        emb_mode="one" if cfg.data.emb_k == 1 else "mean", emb_k=cfg.data.emb_k, on_corrupt=cfg.data.on_corrupt,
        pin_memory=acc.device.type == "cuda", img_dtype="uint8",  # 1/4 of the bytes; scaled on the device
        cache_dir=cfg.data.cache_dir, cache_gb=cfg.data.cache_gb, attributes=cfg.loss.attr_coef > 0,
    )
    if run.ema is not None:
        run.ema.set_standing_inputs(standing_inputs(cfg, words=reads_words(run.G_inner)))
    if state is not None and state.get("stream") not in (None, run.stream.signature()):
        log("WARNING: the data stream differs from the checkpoint's (shards, batch size, world size or "
            "augmentation settings changed): training continues, but not on the batches an uninterrupted run saw")
    return run


# --------------------------------------------------------------------------------------
# Checkpoint, restore, export
# --------------------------------------------------------------------------------------
def _state(run: Run) -> dict:
    """What rank 0 writes to state.pt (the backend's part: optimisers and grad scaler, or nothing
    where DeepSpeed's optimizer state is sharded into the engines' files)."""
    return {
        "G": run.G_inner.state_dict(), "D": run.D_inner.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        **run.acc.state_dict(),
        "step": run.step, "world_size": run.world, "config": to_dict(run.cfg), "stream": run.stream.signature(),
        "text_encoder": run.meta.encoder, "text_dim": run.meta.text_dim,
    }


def save_checkpoint(run: Run) -> Path:
    """Write checkpoint ``run.step`` on every rank (atomic; ``train.keep_last`` / ``keep_every`` say
    which older ones stay)."""
    extra = {"z": run.z_gen.get_state(), "pair": run.pair_gen.get_state()}
    keep = {"keep_last": run.cfg.train.keep_last, "keep_every": run.cfg.train.keep_every}
    if run.bank is not None:  # per rank, like the RNG streams: each rank's bank holds its own batches
        extra["bank"] = run.bank.state_dict()
    # DeepSpeed: every rank also writes its engines' ZeRO partitions into the same atomic folder
    return run.acc.save_checkpoint(run.run_dir, run.step, lambda: _state(run), extra, **keep)


def restore(run: Run, path: Path, force: bool = False) -> dict:
    """Load a checkpoint into the (not yet prepared) run: weights, optimisers, step, RNG streams
    and the caption bank, after checking that the config may continue it (:mod:`stackgan.resume`;
    ``force`` lets any change through, recorded). Returns the state for what is restored after
    ``prepare`` (the EMA, the backend's optimisers and grad scaler, or DeepSpeed's engines)."""
    state, rng = ckpt.load(path, run.rank)
    run.acc.check_resume(state, run.world, path)
    removed = changed_by_removal(state.get("config") or {})
    if removed:
        raise ckpt.CheckpointError(f"{path} cannot continue with this version: " + "; ".join(removed))
    changes = config_changes(state.get("config") or {}, run.cfg)
    check_changes(changes, path, force)
    forced = force and any(k not in MAY_CHANGE for k in changes)
    if changes:
        run.log(f"config changed since the checkpoint{' (--resume force)' if forced else ''}: "
                f"{describe_changes(changes)}")
    try:
        run.G.load_state_dict(state["G"])
        run.D.load_state_dict(state["D"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(
            f"{path} was written for other networks than this config builds "
            f"(model.* differs from the checkpoint's config.yaml); use another train.run_dir or --resume none. "
            f"Details: {str(e).splitlines()[0]}") from None
    run.step = int(state["step"])
    if rng is not None and state.get("world_size") == run.world:
        ckpt.set_rng_state(rng)
        run.z_gen.set_state(rng["extra"]["z"])
        run.pair_gen.set_state(rng["extra"]["pair"])
        if run.bank is not None and "bank" in rng["extra"]:
            run.bank.load_state_dict(rng["extra"]["bank"])
    else:
        run.log("WARNING: world size changed since the checkpoint; RNG streams are re-seeded")
        torch.manual_seed(run.cfg.train.seed * 7919 + run.step * 31 + run.rank)
    if run.main:
        record_config(run.run_dir, run.cfg, run.step, changes, forced=forced, resumed_from=path)
    run.log(f"resumed from {path} at step {run.step}")
    return state


def export(run: Run) -> Path:
    """The sampling generator (EMA where there is one) as ``<run_dir>/export/generator.safetensors``."""
    path = export_path(run.run_dir)
    if run.main:
        save_export(path, run.sampler, run.cfg.model, text_encoder=run.meta.encoder, text_dim=run.meta.text_dim,
                    step=run.step, config=to_dict(run.cfg), stage1_model=run.stage1_cfg)
    run.acc.wait_for_everyone()
    return path
