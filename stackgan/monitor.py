"""The training loop's periodic duties: the log, sample grids with diagnostics, metric snapshots.

The first record of every launch says what runs (precision and where it came from, backend,
processes, the step it starts at). Every ``train.log_every`` steps one status line and one
JSONL record (``<run>/log.jsonl``) with the means of the losses and of D's outputs since
the last record, images per second and memory. Step statistics stay on the device in between
(no host sync per step). Every ``train.sample_every`` steps a grid of the fixed captions with
fixed noise (``<run>/samples/step-N.png``), the gradient norms of that step and the
diversity score, with a warning when it falls towards mode collapse. Every
``train.metrics_every`` steps the configured metrics (``<run>/metrics.jsonl``). The trackers of
``train.report_to`` (:mod:`stackgan.tracking`; TensorBoard under ``<run>/tb`` by default) get
a copy of all three.
"""
from __future__ import annotations

import json
import resource
import sys
import time

import torch

from .config import image_size, process_batch
from .data.stream import load_fixed_samples
from .diversity import diversity_score
from .errors import EXIT_NONFINITE, StackGANError
from .grid import save_grid
from .metrics import compute
from .run import SPLIT, Run, eval_context
from .step import StepOut
from .tracking import Trackers
from .words import word_vectors

FIXED_CAPTIONS = 8  # rows of the sample grids (4 noise vectors each)
COLLAPSE_WARN = 0.05  # diversity score below which the log warns of mode collapse


class NonFiniteLoss(StackGANError, RuntimeError):
    """A loss became NaN/Inf; training stops without saving the broken state."""

    exit_code = EXIT_NONFINITE


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Monitor:
    """Owns the run's log files, the step statistics between log records and the fixed
    sample inputs. Rank 0 writes; every rank calls (metrics run on all ranks)."""

    def __init__(self, run: Run):
        self.run = run
        self.sums: dict[str, torch.Tensor] = {}  # per-key sums since the last record, on the device
        self.counts: dict[str, int] = {}
        self.t_last, self.step_last = time.time(), run.step
        self.eval_ctx = None
        size = image_size(run.cfg.model.stage)
        fixed = load_fixed_samples(run.cfg.data.shards, SPLIT, FIXED_CAPTIONS, size,
                                   cache_dir=run.cfg.data.cache_dir, cache_gb=run.cfg.data.cache_gb)
        self.captions = list(fixed["caption"])
        self.fixed_emb = fixed["emb"].to(run.device)
        self.fixed_words = word_vectors(self.captions, run.device) if run.words else None
        self.fixed_z = torch.randn(len(self.captions), 4, run.cfg.model.z_dim, generator=torch.Generator().manual_seed(1234))
        self.jsonl = self.trackers = self.bar = None
        if not run.main:
            return
        self.jsonl = open(run.run_dir / "log.jsonl", "a")
        identity = {"precision": run.acc.precision, "precision_source": run.acc.precision_source,
                    "backend": run.acc.name, "world_size": run.world}
        self.trackers = Trackers(run.acc.accelerator, run.cfg, resume_step=run.step, identity=identity)
        if run.resumed_from is not None:
            self.trackers.skip_existing_metrics(run.run_dir / "metrics.jsonl")
        self.write({"step": run.step, "event": "start", **identity,
                    "resumed_from": None if run.resumed_from is None else str(run.resumed_from),
                    "trackers": self.trackers.names})
        if run.resumed_from is None or not (run.run_dir / "samples" / "reals.png").exists():
            save_grid(fixed["img"], run.run_dir / "samples" / "reals.png", nrow=len(self.captions),
                      captions=self.captions[:1])
        if sys.stdout.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.n_steps, initial=run.step, desc=f"stage {run.cfg.model.stage}",
                            dynamic_ncols=True)

    # ---- per step ------------------------------------------------------------------
    def after_step(self, out: StepOut) -> None:
        """Accumulate the step's statistics; do whatever duty falls on this step."""
        run, cfg = self.run, self.run.cfg.train
        for k, v in {"loss_d": out.loss_d, "loss_g": out.loss_g, **out.stats}.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
            self.counts[k] = self.counts.get(k, 0) + 1
        if self.bar is not None:
            self.bar.update(1)
        last = run.step == run.n_steps
        if run.step % cfg.log_every == 0 or last:
            self.write_record()
        if out.grad_norm_d is not None and run.main:
            self.diagnostics(out)
        if run.step % cfg.sample_every == 0 or last:
            self.sample_grid()
        if cfg.metrics and cfg.metrics_every and run.step % cfg.metrics_every == 0 and not last:
            self.snapshot_metrics()
            self.mirror_metrics()

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLoss` on every rank if any rank saw a NaN/Inf loss since the
        last record (one host sync, and one all-reduce with several processes)."""
        run = self.run
        bad = torch.zeros(1, device=run.device)
        for v in self.sums.values():
            bad += (~torch.isfinite(v)).any().float().to(bad.device)
        if run.world > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteLoss(
                f"a loss became NaN/Inf before step {run.step}; stopping without saving this state. "
                "The last good checkpoint is kept: resume from it with a lower learning rate "
                "(optim.lr_g / optim.lr_d), optim.grad_clip, or train.mixed_precision=no.")

    def write_record(self) -> None:
        run = self.run
        self.check_finite()
        now = time.time()
        n = run.step - self.step_last
        rec = {"step": run.step, "epoch": run.step / run.steps_per_epoch, "time": now,
               "img_per_s": n * process_batch(run.cfg.data, run.world) * run.world
               / max(now - self.t_last, 1e-9),
               "world_size": run.world, "lr_g": run.opt_g.param_groups[0]["lr"], "lr_d": run.opt_d.param_groups[0]["lr"],
               "mem_mb": memory_mb(run.device)}
        rec.update({k: float(v / self.counts[k]) for k, v in self.sums.items()})  # some terms come from some steps
        rec.update(run.acc.amp_state())  # fp16: the loss scale(s); DeepSpeed also each engine's skipped steps
        rec["g_d_ratio"] = rec["loss_g"] / max(abs(rec["loss_d"]), 1e-8)
        self.write(rec)
        d_outs = " ".join(f"{k} {rec[k]:.2f}" for k in self.sums if k.startswith("d_"))
        self.say(f"step {run.step}/{run.n_steps} | {rec['img_per_s']:.1f} img/s | D {rec['loss_d']:.3f} "
                 f"G {rec['loss_g']:.3f} KL {rec['kl']:.3f} | {d_outs} | mem {rec['mem_mb']:.0f} MB")
        self.sums.clear()
        self.counts.clear()
        self.t_last, self.step_last = now, run.step

    def diagnostics(self, out: StepOut) -> None:
        """Gradient norms of this step and the diversity of the fixed captions' samples."""
        div = diversity_score(self.run.sampler, self.fixed_emb, 4, torch.Generator().manual_seed(99),
                              words=self.fixed_words)
        self.write({"step": self.run.step, "grad_norm_d": float(out.grad_norm_d), "grad_norm_g": float(out.grad_norm_g),
                    "diversity": div})
        if div < COLLAPSE_WARN:
            self.run.log(f"WARNING: sample diversity {div:.4f} < {COLLAPSE_WARN} at step {self.run.step}: mode "
                         "collapse? (try lower optim.lr_d, loss.kind=hinge, model.spectral_norm=true)")

    def sample_grid(self) -> None:
        """One row per fixed caption, 4 fixed noise vectors each (rank 0)."""
        run = self.run
        if not run.main:
            return
        gen = run.sampler
        was_training = gen.training
        gen.eval()
        with torch.no_grad(), run.acc.autocast():
            imgs = [gen(self.fixed_emb, self.fixed_z[:, j].to(run.device), words=self.fixed_words)[0].float().cpu()
                    for j in range(self.fixed_z.shape[1])]
        gen.train(was_training)
        grid = torch.stack(imgs, 1).reshape(-1, *imgs[0].shape[1:])
        path = run.run_dir / "samples" / f"step-{run.step:08d}.png"
        save_grid(grid, path, nrow=self.fixed_z.shape[1], captions=self.captions)
        if self.trackers is not None:
            self.trackers.log_image("samples", path, run.step)

    def snapshot_metrics(self) -> None:
        """The configured metrics on the sampling generator, on every rank; rank 0 appends
        metrics.jsonl. A metric that fails (a bad weights file, a full disk) is logged and recorded
        there with its error, and training goes on: a snapshot is monitoring, not the run's result."""
        run = self.run
        if self.eval_ctx is None:
            self.eval_ctx = eval_context(run.cfg, run.meta, run.device, run.log)
        try:
            with run.acc.autocast():  # a DeepSpeed fp16 G without EMA holds fp16 weights
                res = compute(run.cfg.train.metrics, run.sampler, self.eval_ctx, step=run.step,
                              jsonl=run.run_dir / "metrics.jsonl")
        except Exception as e:  # noqa: BLE001 - any metric's failure: recorded, the run survives
            err = f"{type(e).__name__}: {e}"
            run.log(f"WARNING: metrics {run.cfg.train.metrics} failed at step {run.step} ({err}); "
                    "training goes on")
            if run.main:
                rec = {"metric": run.cfg.train.metrics, "step": run.step, "time": time.time(), "error": err}
                with open(run.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            self.write({"step": run.step, "event": "metric_error", "error": err})
            return
        run.log(f"metrics at step {run.step}: " + "; ".join(
            f"{name} " + ", ".join(f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float) and k != "seconds")
            for name, r in res.items()))

    def mirror_metrics(self) -> None:
        """The trackers' copy of the snapshots just appended to metrics.jsonl (rank 0)."""
        if self.trackers is not None:
            self.trackers.mirror_metrics(self.run.run_dir / "metrics.jsonl")

    # ---- output --------------------------------------------------------------------
    def write(self, rec: dict) -> None:
        """One JSONL record (+ its numbers to the trackers), rank 0 only."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.trackers is not None:
            self.trackers.log(rec)

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self.run.log(msg)

    def close(self) -> None:
        self.mirror_metrics()  # the final snapshot (train.finish) comes after the last step
        for f in (self.bar, self.jsonl, self.trackers):
            if f is not None:
                f.close()
