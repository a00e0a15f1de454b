"""The StackGAN trainer: one loop for stage I and stage II, any device, any number of processes.

    python -m stackgan.train --config configs/birds_stage1.yaml [--resume auto] key=value ...

The same entry runs under plain ``python``, ``torchrun``, ``accelerate launch`` and one Slurm
task per process (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the env).

Where things happen: the run is built and checkpointed in :mod:`stackgan.run`, one StackGAN
iteration (the D loss, then the G loss) is :func:`stackgan.step.gan_step`, the losses are in
:mod:`stackgan.losses`, the log / sample grids / metric snapshots in :mod:`stackgan.monitor`.
This module is the loop that ties them together. Every knob is in ``stackgan/config.py``.

Exit status (what the job scripts act on): 0 finished (``<run>/COMPLETE``) or stopped by
``train.time_limit_min`` (``<run>/TIME_LIMIT``: not complete), 2 bad config or input, 3 stopped by
SIGTERM/SIGUSR1/SIGUSR2 after saving a checkpoint (requeue me), 4 NaN/Inf in a loss (the
last good checkpoint is kept).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, load_config
from .errors import EXIT_OK, EXIT_REQUEUE, StackGANError, report
from .monitor import Monitor
from .run import Run, build_run, export, save_checkpoint
from .step import gan_step, make_batch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class TrainInterrupted(StackGANError):
    """A stop signal arrived; a checkpoint was saved at ``step``."""

    exit_code, prefix = EXIT_REQUEUE, ""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name} at step {step} (checkpoint saved)")
        self.signum, self.step = signum, step


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    export: Path | None


class StopFlag:
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


def stop_group(run: Run):
    """The process group the stop flag travels in: gloo, on the host, so agreeing to stop
    never waits for the GPU and can happen every step (None: one process, or gloo already)."""
    if run.world == 1 or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")  # collective: every rank creates it, at the same point


def agree_to_stop(run: Run, stop: StopFlag, t_begin: float, group) -> tuple[int, bool]:
    """(signal, time limit reached), the same on every rank, so every rank saves the same step.
    With several processes this is one all-reduce of a host tensor, at every step on every rank."""
    limit = run.cfg.train.time_limit_min
    over = limit > 0 and time.time() - t_begin > 60 * limit
    sig = stop.signum
    if run.world > 1:
        t = torch.tensor([sig, int(over)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        sig, over = int(t[0]), bool(t[1])
    return sig, over


# --------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------
def train(cfg: Config, resume: str = "auto", *, handle_signals: bool = True) -> TrainResult:
    """Train one stage from ``cfg``, continuing from ``resume`` (``auto``: the newest complete
    checkpoint in the run folder); returns when ``train.steps`` (or the time limit) is done."""
    run = build_run(cfg, resume)
    mon = Monitor(run)
    stop, group = StopFlag(install=handle_signals), stop_group(run)
    batches = run.stream.iterate(start=run.step)  # its loader has its own generator: the global RNG is untouched
    run.G.train()
    run.D.train()
    t_begin, over = time.time(), False
    try:
        while run.step < run.n_steps:
            sig, over = agree_to_stop(run, stop, t_begin, group)
            if sig:
                mon.check_finite()
                path = save_checkpoint(run)
                name = signal.Signals(sig).name
                mon.write({"step": run.step, "event": "checkpointed", "signal": name,
                           "checkpoint": str(path)})
                run.log(f"signal {name}: checkpoint {path} saved at step {run.step}")
                raise TrainInterrupted(sig, run.step)
            if over:  # a wall-clock budget for this launch: stop here (checkpoint, export, TIME_LIMIT)
                run.log(f"time limit of {cfg.train.time_limit_min} min reached at step {run.step} "
                        f"of {run.n_steps}")
                break

            batch = make_batch(next(batches), cfg, run.device, run.z_gen, run.pair_gen, run.species,
                               run.attr_groups, words=run.words)
            run.set_lr()
            diag = (run.step + 1) % cfg.train.sample_every == 0 or run.step + 1 == run.n_steps
            out = gan_step(run.acc, run.G, run.D, run.opt_g, run.opt_d, batch, cfg, run.bank, diag=diag)
            if run.ema is not None:
                run.ema.update(run.G_inner, run.step)
            run.step += 1
            mon.after_step(out)
            if run.step % cfg.train.ckpt_every == 0 and run.step < run.n_steps:
                mon.check_finite()
                save_checkpoint(run)
        batches.close()  # the loader workers end now, not when the garbage collector gets to them
        return finish(run, mon, time_limited=over)
    except TrainInterrupted as e:
        batches.close()
        stop.chain(e.signum)  # e.g. submitit's own checkpoint/requeue handler
        raise
    finally:
        batches.close()
        stop.close()
        mon.close()


def finish(run: Run, mon: Monitor, time_limited: bool = False) -> TrainResult:
    """The last checkpoint, the rank-sync report, the export, the final metrics, and the marker:
    COMPLETE when the planned steps were trained, TIME_LIMIT when ``train.time_limit_min`` stopped
    the run before (a stage II must not start from it by accident; see docs/training.md)."""
    if time_limited:  # the record and grid of the steps since the last ones
        if mon.counts:
            mon.write_record()
        if run.step % run.cfg.train.sample_every:
            mon.sample_grid()
    mon.check_finite()
    save_checkpoint(run)
    sync = sync_report(run)
    event = "time_limit" if time_limited else "finished"
    mon.write({"step": run.step, "event": event, "planned_steps": run.n_steps, "world_size": run.world,
               **sync})
    if not sync["ranks_identical"]:
        run.log(f"WARNING: parameters differ across ranks: {sync['fingerprints']}")
    path = export(run)
    if run.cfg.train.metrics:
        mon.snapshot_metrics()
    if run.main:
        marker = {"step": run.step, "planned_steps": run.n_steps, "time": time.time()}
        if time_limited:
            marker["time_limit_min"] = run.cfg.train.time_limit_min
        (run.run_dir / ("TIME_LIMIT" if time_limited else "COMPLETE")).write_text(json.dumps(marker))
    if time_limited:
        run.log(f"stopped by train.time_limit_min at step {run.step} of {run.n_steps} (not complete: resume "
                f"to continue); generator export {path}")
    else:
        run.log(f"finished {run.step} steps; generator export {path}")
    if run.world > 1:
        run.acc.wait_for_everyone()  # nothing in flight when the process group is torn down
    return TrainResult(step=run.step, run_dir=run.run_dir, export=path)


def _fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()  # parameters only: BN running stats are per-rank between DDP's broadcasts
    for k, v in sorted(module.named_parameters()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sync_report(run: Run) -> dict:
    """Hashes of G's and D's parameters on every rank: DDP must keep them bit-identical."""
    mine = f"{_fingerprint(run.G_inner)}:{_fingerprint(run.D_inner)}"
    if run.world > 1:
        everyone: list = [None] * run.world
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    return {"fingerprints": everyone, "ranks_identical": len(set(everyone)) == 1}


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stackgan.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML experiment config (configs/*.yaml)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in train.run_dir), none, a checkpoint/run "
                        "folder, or force (as auto, and continue even when the config changed beyond "
                        "steps, intervals, workers and tracker; recorded in config-history.jsonl)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr_g=5e-4")
    p.epilog = ("exit status: 0 done (COMPLETE) or stopped by train.time_limit_min (TIME_LIMIT), 2 bad "
                "config/input, 3 checkpointed on a signal (requeue), 4 NaN/Inf loss")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume)
    except StackGANError as e:
        return report(e, "stackgan.train")
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
