"""The job callables submitit pickles and runs on the nodes, and the config check before them.

A training job is resumable, so requeueing it is just running it again: on preemption or
time-out submitit calls :meth:`TrainJob.checkpoint`, which resubmits the same job.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, load_config
from ..data.meta import ShardError, load_metadata
from ..errors import EXIT_REQUEUE  # checkpointed, run me again
from ..files import config_path
from .env import master_port
from .summary import write_summary

ALLOW_INCOMPLETE = "STACKGAN_ALLOW_INCOMPLETE_STAGE1"  # =1: stage II may start from an unfinished stage I


def check_stage1_finished(export: str | Path) -> None:
    """Refuse a stage-I export whose run folder (``<run>/export/generator.safetensors``) did not
    reach its planned steps: stopped by its time limit (``TIME_LIMIT``) or still training
    (checkpoints, no ``COMPLETE``). An export outside a run folder (converted weights) is not
    checked; set ``STACKGAN_ALLOW_INCOMPLETE_STAGE1=1`` to start stage II from an unfinished stage I."""
    where = Path(export).resolve()
    run = where.parent if where.is_dir() else where.parent.parent  # <run>/export[/generator.*]
    if os.environ.get(ALLOW_INCOMPLETE) == "1" or (run / "COMPLETE").is_file():
        return
    if (run / "TIME_LIMIT").is_file():
        try:
            info = json.loads((run / "TIME_LIMIT").read_text())
            where = f" at step {info['step']} of {info['planned_steps']}"
        except (ValueError, KeyError):
            where = ""
        raise ConfigError(f"model.stage1_export={export}: stage I ({run}) was stopped by its time "
                          f"limit{where} and is not complete; resume it to finish, or set "
                          f"{ALLOW_INCOMPLETE}=1 to start stage II from it anyway")
    if (run / "checkpoints").is_dir():
        raise ConfigError(f"model.stage1_export={export}: stage I ({run}) has no COMPLETE marker (still "
                          f"training, or stopped); let it finish, or set {ALLOW_INCOMPLETE}=1 to start "
                          "stage II from it anyway")


def check_train_config(config: str, overrides: list[str], *, need_stage1_export: bool = True) -> Config:
    """Load + validate a training config; check the shard folder (and stage-I export) exist."""
    if not config_path(config).is_file():
        raise ConfigError(f"config file not found: {config}")
    cfg = load_config(config, overrides)
    try:  # read through the opener: a folder, file://, http(s):// or pipe: location
        load_metadata(cfg.data.shards)
    except ShardError as e:
        raise ConfigError(f"data.shards={cfg.data.shards}: {e} (prepare shards first: "
                          "python shards/prepare.py)") from e
    if cfg.model.stage == 2 and need_stage1_export:
        if not cfg.model.stage1_export:
            raise ConfigError("model.stage=2 needs "
                              "model.stage1_export=<stage-I run>/export/generator.safetensors")
        from ..export import ExportError, resolve_export  # imports torch (~3 s): only stage II needs it

        try:
            export = resolve_export(cfg.model.stage1_export)
        except ExportError as e:
            raise ConfigError(f"model.stage1_export={cfg.model.stage1_export}: file not found ({e}); stage I "
                              "has not finished, or point it at <stage-I run>/export/generator.safetensors"
                              ) from None
        check_stage1_finished(export)
    return cfg


def make_train_job(config: str, overrides: list[str], *, workdir: str | Path | None = None,
                   stop_grace_s: int = 120, need_stage1_export: bool = True) -> TrainJob:
    """Check the config now (before anything is submitted) and pin its paths."""
    workdir = Path(workdir or Path.cwd()).resolve()
    cfg = check_train_config(config, overrides, need_stage1_export=need_stage1_export)
    run_dir = Path(cfg.train.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else workdir / run_dir
    overrides = [o for o in overrides if not o.startswith("train.run_dir=")] + [f"train.run_dir={run_dir}"]
    return TrainJob(str(config_path(config).resolve()), overrides, str(workdir), stop_grace_s)


def _set_dist_env() -> None:
    """torch env:// variables from submitit's view of the Slurm job (one task per process)."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    os.environ.update(
        RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(1, env.num_nodes)), NODE_RANK=str(env.node),
        MASTER_ADDR=env.hostnames[0],
        MASTER_PORT=str(master_port(os.environ.get("SLURM_JOB_ID", env.job_id))),
    )


def _slurm_state() -> str:
    """This job's state in Slurm's controller ("" when unknown)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return ""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().split("\n")[0]


def _requeue_killed(err: subprocess.CalledProcessError) -> None:
    """submitit's ``scontrol requeue`` can be killed by the very termination it asked for:
    then the job is being requeued, so leave without a result (a failed requeue stays an error)."""
    if err.returncode >= 0 or list(err.cmd)[:2] != ["scontrol", "requeue"]:
        raise err
    print(f"[stackgan.cluster] {err}: the job is being requeued", flush=True)
    raise SystemExit(EXIT_REQUEUE)


@dataclass
class TrainJob:
    """One training stage; resumable, so a requeued job just runs again."""

    config: str  # absolute path of the YAML config
    overrides: list[str]  # includes train.run_dir=<absolute path>
    workdir: str  # relative paths in the config are relative to this folder
    stop_grace_s: int = 120

    @property
    def run_dir(self) -> str:
        return load_config(self.config, self.overrides).train.run_dir

    def command(self) -> str:
        """The equivalent shell command (for --dry-run and logs)."""
        return shlex.join(["python", "-m", "stackgan.train", "--config", self.config, "--resume", "auto",
                           *self.overrides])

    def __call__(self) -> dict:
        os.chdir(self.workdir)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        cfg = load_config(self.config, self.overrides)
        if cfg.model.stage == 2:  # the chain's stage II: its stage I must have finished (or ALLOW_INCOMPLETE)
            check_stage1_finished(cfg.model.stage1_export)
        _set_dist_env()
        from ..train import TrainInterrupted, train  # the trainer imports torch (~3 s): only the job needs it

        try:
            res = train(cfg, resume="auto")
        except TrainInterrupted as e:
            self._after_interrupt(e)
        except subprocess.CalledProcessError as err:  # from submitit's requeue, chained by the trainer
            _requeue_killed(err)
        return {"run_dir": str(res.run_dir), "step": res.step, "export": str(res.export)}

    def _after_interrupt(self, e: BaseException) -> None:
        """The trainer saved a checkpoint on a stop signal that was not submitit's own.

        (On submitit's signal the trainer hands over to submitit, which requeues and exits
        before we get here.) SIGTERM usually means Slurm is ending the job (preemption,
        ``scontrol requeue``, ``scancel``): it then leaves the RUNNING state and kills or requeues
        the job within KillWait, so we wait. If the job stays RUNNING (a stray or user signal,
        or submitit's own signal swallowed while the trainer was saving), requeue through
        submitit. Never return a result: a result file would tell the submitter we are done.
        """
        import submitit

        if int(os.environ.get("RANK", "0")) != 0:
            raise SystemExit(EXIT_REQUEUE)
        print(f"[stackgan.cluster] {e}", flush=True)
        running = 0
        deadline = time.time() + self.stop_grace_s
        try:
            while time.time() < deadline:  # submitit's handler may also run here (requeue + exit)
                running = running + 1 if _slurm_state() == "RUNNING" else 0
                if running >= 3:
                    usr = submitit.JobEnvironment._usr_sig()
                    handler = signal.getsignal(usr)
                    if callable(handler):
                        print("[stackgan.cluster] job still RUNNING: requeueing through submitit", flush=True)
                        handler(usr, None)  # checkpoint() + scontrol requeue + exit
                    break
                time.sleep(1)
        except subprocess.CalledProcessError as err:
            _requeue_killed(err)
        raise SystemExit(EXIT_REQUEUE)

    def checkpoint(self):
        """submitit calls this on preemption / time-out: run again, resuming from the run folder."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@dataclass
class CommandJob:
    """Run ``python -m <module> <args>`` in the job (evaluation, sampling); fail on non-zero."""

    module: str
    args: list[str]
    workdir: str

    def command(self) -> str:
        return shlex.join(["python", "-m", self.module, *self.args])

    def __call__(self) -> int:
        p = subprocess.run([sys.executable, "-m", self.module, *self.args], cwd=self.workdir)
        if p.returncode:
            raise RuntimeError(f"{self.command()} failed with status {p.returncode}")
        return 0


@dataclass
class SummaryJob:
    """Write the sweep's summary table once every point has ended (any outcome)."""

    sweep_dir: str

    def command(self) -> str:
        return shlex.join(["python", "-m", "stackgan.cluster", "summarize", self.sweep_dir])

    def __call__(self) -> str:
        return write_summary(self.sweep_dir).read_text()
