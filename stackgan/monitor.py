"""The training loop's periodic duties: the log, sample grids with diagnostics, metric snapshots.

Every ``train.log_every`` steps one status line and one JSONL record (``<run>/log.jsonl``,
TensorBoard scalars under ``<run>/tb``) with the means of the losses and of D's outputs since
the last record, images per second and memory. Step statistics stay on the device in between
(no host sync per step). Every ``train.sample_every`` steps a grid of the fixed captions with
fixed noise (``<run>/samples/step-N.png``), the gradient norms of that step and the
diversity score, with a warning when it falls towards mode collapse. Every
``train.metrics_every`` steps the configured metrics (``<run>/metrics.jsonl``).
"""
from __future__ import annotations

import json
import resource
import sys
import time

import torch

from .config import image_size, process_batch
from .run import SPLIT, Run
from .step import StepOut

FIXED_CAPTIONS = 8  # rows of the sample grids (4 noise vectors each)
COLLAPSE_WARN = 0.05  # diversity score below which the log warns of mode collapse


class NonFiniteLoss(RuntimeError):
    """A loss became NaN/Inf; training stops without saving the broken state."""


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Monitor:
    """Owns the run's log files, the step statistics between log records and the fixed
    sample inputs. Rank 0 writes; every rank calls (metrics run on all ranks)."""

    def __init__(self, run: Run):
        from .data.stream import load_fixed_samples
        from .grid import save_grid

        self.run = run
        self.sums: dict[str, torch.Tensor] = {}  # per-key sums since the last record, on the device
        self.counts: dict[str, int] = {}
        self.t_last, self.step_last = time.time(), run.step
        self.eval_ctx = None
        size = image_size(run.cfg.model.stage)
        fixed = load_fixed_samples(run.cfg.data.shards, SPLIT, FIXED_CAPTIONS, size)
        self.captions = list(fixed["caption"])
        self.fixed_emb = fixed["emb"].to(run.device)
        self.fixed_z = torch.randn(len(self.captions), 4, run.cfg.model.z_dim, generator=torch.Generator().manual_seed(1234))
        self.jsonl = self.tb = self.bar = None
        if not run.main:
            return
        self.jsonl = open(run.run_dir / "log.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.run_dir / "tb"))
        except Exception as e:  # tensorboard missing is not fatal
            run.log(f"TensorBoard disabled: {e}")
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
        if getattr(run.acc, "scaler", None) is not None:  # fp16: the shared loss scale
            rec["loss_scale"] = run.acc.scaler.get_scale()
        if hasattr(run.acc, "amp_state"):  # DeepSpeed: each engine's loss scale and skipped steps
            rec.update(run.acc.amp_state())
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
        from .diversity import diversity_score

        div = diversity_score(self.run.sampler, self.fixed_emb, 4, torch.Generator().manual_seed(99))
        self.write({"step": self.run.step, "grad_norm_d": float(out.grad_norm_d), "grad_norm_g": float(out.grad_norm_g),
                    "diversity": div})
        if div < COLLAPSE_WARN:
            self.run.log(f"WARNING: sample diversity {div:.4f} < {COLLAPSE_WARN} at step {self.run.step}: mode "
                         "collapse? (try lower optim.lr_d, loss.kind=hinge, model.spectral_norm=true)")

    def sample_grid(self) -> None:
        """One row per fixed caption, 4 fixed noise vectors each (rank 0)."""
        from .grid import save_grid

        run = self.run
        if not run.main:
            return
        gen = run.sampler
        was_training = gen.training
        gen.eval()
        with torch.no_grad(), run.acc.autocast():
            imgs = [gen(self.fixed_emb, self.fixed_z[:, j].to(run.device))[0].float().cpu()
                    for j in range(self.fixed_z.shape[1])]
        gen.train(was_training)
        grid = torch.stack(imgs, 1).reshape(-1, *imgs[0].shape[1:])
        save_grid(grid, run.run_dir / "samples" / f"step-{run.step:08d}.png", nrow=self.fixed_z.shape[1],
                  captions=self.captions)

    def snapshot_metrics(self) -> None:
        """The configured metrics on the sampling generator, on every rank; rank 0 appends metrics.jsonl."""
        from .metrics import EvalContext, compute

        run = self.run
        if self.eval_ctx is None:
            self.eval_ctx = EvalContext(shards=run.cfg.data.shards, image_size=image_size(run.cfg.model.stage),
                                        z_dim=run.cfg.model.z_dim, text_encoder=run.meta.encoder,
                                        text_dim=run.meta.text_dim, device=run.device, judge=run.cfg.train.judge,
                                        judge_samples=run.cfg.train.metrics_samples, log=run.log)
        with run.acc.autocast():  # a DeepSpeed fp16 G without EMA holds fp16 weights
            res = compute(run.cfg.train.metrics, run.sampler, self.eval_ctx, step=run.step,
                          jsonl=run.run_dir / "metrics.jsonl")
        run.log(f"metrics at step {run.step}: " + "; ".join(
            f"{name} " + ", ".join(f"{k}={v:.3g}" for k, v in r.items() if isinstance(v, float) and k != "seconds")
            for name, r in res.items()))

    # ---- output --------------------------------------------------------------------
    def write(self, rec: dict) -> None:
        """One JSONL record (+ its numbers as TensorBoard scalars), rank 0 only."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def say(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            self.run.log(msg)

    def close(self) -> None:
        for f in (self.bar, self.jsonl, self.tb):
            if f is not None:
                f.close()
