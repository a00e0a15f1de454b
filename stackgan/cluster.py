"""Slurm through submitit: training jobs that requeue themselves, the stage I -> II chain, sweeps.

The launchers in ``jobs/`` are thin wrappers around the ``*_main`` functions here; the sbatch
scripts in ``slurm/`` call ``python -m stackgan.cluster resolve`` to check a config before any
rank starts. Cluster parameters (partition, GPUs, time, setup lines) come from one YAML file,
``jobs/cluster.yaml`` (:class:`ClusterConfig`).

Process layout, as in ``slurm/*.sh``: one Slurm task per GPU (one per node without GPUs); every
task runs the trainer in-process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
taken from Slurm. On preemption or time-out Slurm sends submitit's signal (USR2 by default) to
every task: the trainer saves a checkpoint at the next step boundary, then hands over to
submitit, which calls :meth:`TrainJob.checkpoint` and requeues the job; the job resumes from the
newest complete checkpoint in its run folder (``--resume auto``).
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import Config, ConfigError, apply_overrides, apply_updates, load_config

EXIT_BAD_INPUT, EXIT_REQUEUE = 2, 3


# --------------------------------------------------------------------------------------
# Cluster configuration (jobs/cluster.yaml)
# --------------------------------------------------------------------------------------
@dataclass
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU-only nodes
    tasks_per_node: int = 0  # 0 = one per GPU (one per node without GPUs)
    cpus_per_task: int = 8
    mem_gb: float = 0.0  # 0 = the partition's default
    timeout_min: int = 1440

    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)


@dataclass
class ClusterConfig:
    folder: str = "slurm/logs/submitit/%j"  # job pickles + logs, on the shared filesystem
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    setup: list[str] = field(default_factory=list)  # shell lines before the job: module load, conda
    sbatch: dict = field(default_factory=dict)  # any other sbatch option, e.g. {exclusive: true}
    signal_delay_s: int = 300  # time-limit warning: checkpoint this long before the end
    max_num_timeout: int = 20  # requeues after a time-out before giving up (preemptions are free)
    stop_grace_s: int = 120  # after SIGTERM + checkpoint: wait this long for Slurm to end the job
    array_parallelism: int = 16  # sweep points running at once
    poll_s: int = 15  # --wait: seconds between sacct polls
    train: Resources = field(default_factory=lambda: Resources(nodes=1, gpus_per_node=4, cpus_per_task=8))
    eval: Resources = field(default_factory=lambda: Resources(gpus_per_node=1, cpus_per_task=8, timeout_min=120))
    summary: Resources = field(default_factory=lambda: Resources(cpus_per_task=1, timeout_min=15))


def load_cluster_config(path: str | Path | None, overrides: list[str] = ()) -> ClusterConfig:
    """Read jobs/cluster.yaml (unknown keys and wrong types are refused, naming the key)."""
    cc = ClusterConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"cluster config not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
        try:
            apply_updates(cc, data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    apply_overrides(cc, overrides, "cluster override")
    for name in ("train", "eval", "summary"):
        r: Resources = getattr(cc, name)
        if r.nodes < 1 or r.cpus_per_task < 1 or r.timeout_min < 1 or r.gpus_per_node < 0:
            raise ConfigError(f"cluster config {name}: nodes, cpus_per_task, timeout_min must be >= 1 "
                              f"and gpus_per_node >= 0, got {r}")
    return cc


def executor_parameters(cc: ClusterConfig, res: Resources, name: str) -> dict:
    """submitit AutoExecutor parameters (generic + ``slurm_*``) for one job."""
    p: dict[str, Any] = {
        "name": name,
        "timeout_min": res.timeout_min,
        "nodes": res.nodes,
        "tasks_per_node": res.ntasks_per_node(),
        "cpus_per_task": res.cpus_per_task,
        "slurm_signal_delay_s": cc.signal_delay_s,
        "slurm_array_parallelism": cc.array_parallelism,
    }
    if res.gpus_per_node:
        p["gpus_per_node"] = res.gpus_per_node
    if res.mem_gb:
        p["mem_gb"] = res.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cc, key):
            p[f"slurm_{key}"] = getattr(cc, key)
    if cc.setup:
        p["slurm_setup"] = list(cc.setup)
    if cc.sbatch:
        p["slurm_additional_parameters"] = {str(k): v for k, v in cc.sbatch.items()}
    return p


def make_executor(cc: ClusterConfig, params: dict):
    import submitit

    folder = Path(cc.folder)
    folder = folder if folder.is_absolute() else Path.cwd() / folder
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=cc.max_num_timeout)
    ex.update_parameters(**params)
    return ex


# --------------------------------------------------------------------------------------
# Config checks shared by the sbatch scripts and the launchers
# --------------------------------------------------------------------------------------
def check_train_config(config: str, overrides: list[str], *, need_stage1_export: bool = True) -> Config:
    """Load + validate a training config; check the shard folder (and stage-I export) exist."""
    if not Path(config).is_file():
        raise ConfigError(f"config file not found: {config}")
    cfg = load_config(config, overrides)
    meta = Path(cfg.data.shards) / "metadata.json"
    if not meta.is_file():
        raise ConfigError(f"data.shards={cfg.data.shards}: no {meta} (prepare shards first: python shards/prepare.py)")
    if cfg.model.stage == 2 and need_stage1_export:
        if not cfg.model.stage1_export:
            raise ConfigError("model.stage=2 needs model.stage1_export=<stage-I run>/export/generator.pt")
        if not Path(cfg.model.stage1_export).is_file():
            raise ConfigError(f"model.stage1_export={cfg.model.stage1_export}: file not found "
                              "(stage I has not finished, or point it at <stage-I run>/export/generator.pt)")
    return cfg


def resolve_main(argv: list[str]) -> int:
    """``python -m stackgan.cluster resolve --config C [k=v ...]``: shell assignments for slurm/*.sh."""
    ap = argparse.ArgumentParser(prog="python -m stackgan.cluster resolve")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = check_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"stackgan.cluster: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    values = {"RUN_DIR": str(Path(cfg.train.run_dir).resolve()), "STAGE": str(cfg.model.stage),
              "STAGE1_EXPORT": cfg.model.stage1_export}
    print("\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items()))
    return 0


# --------------------------------------------------------------------------------------
# Job callables (pickled by submitit, run on the nodes)
# --------------------------------------------------------------------------------------
def _set_dist_env() -> None:
    """torch env:// variables from submitit's view of the Slurm job (one task per process)."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    digits = re.sub(r"\D", "", str(os.environ.get("SLURM_JOB_ID", env.job_id))) or "0"
    os.environ.update(
        RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(1, env.num_nodes)), NODE_RANK=str(env.node),
        MASTER_ADDR=env.hostnames[0], MASTER_PORT=str(20000 + int(digits) % 20000),
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
        _set_dist_env()
        from .train import TrainInterrupted, train

        cfg = load_config(self.config, self.overrides)
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


def make_train_job(config: str, overrides: list[str], *, workdir: str | Path | None = None,
                   stop_grace_s: int = 120, need_stage1_export: bool = True) -> TrainJob:
    """Check the config now (before anything is submitted) and pin its paths."""
    workdir = Path(workdir or Path.cwd()).resolve()
    cfg = check_train_config(config, overrides, need_stage1_export=need_stage1_export)
    run_dir = Path(cfg.train.run_dir)
    run_dir = run_dir if run_dir.is_absolute() else workdir / run_dir
    overrides = [o for o in overrides if not o.startswith("train.run_dir=")] + [f"train.run_dir={run_dir}"]
    return TrainJob(str(Path(config).resolve()), overrides, str(workdir), stop_grace_s)


# --------------------------------------------------------------------------------------
# Submitting, waiting, reporting
# --------------------------------------------------------------------------------------
@dataclass
class Planned:
    label: str
    fn: Any  # a job callable, or a list of them (an array)
    params: dict
    depends_on: str = ""  # label of the job this one waits for
    dep_kind: str = ""  # afterok / afterany


def describe(plan: list[Planned]) -> str:
    """What --dry-run prints: per job, its Slurm parameters and the command it runs."""
    out = io.StringIO()
    for p in plan:
        fns = p.fn if isinstance(p.fn, list) else [p.fn]
        kind = f"job array of {len(fns)}" if isinstance(p.fn, list) else "job"
        dep = f", starts {p.dep_kind} '{p.depends_on}'" if p.depends_on else ""
        out.write(f"== {p.label}: {kind}{dep}\n")
        for k, v in p.params.items():
            out.write(f"   {k}: {v}\n")
        for i, fn in enumerate(fns):
            out.write(f"   [{i}] {fn.command()}\n" if len(fns) > 1 else f"   run: {fn.command()}\n")
    return out.getvalue()


def submit_plan(cc: ClusterConfig, plan: list[Planned]) -> dict[str, list]:
    """Submit in order; dependencies refer to earlier labels. Returns label -> submitit jobs."""
    jobs: dict[str, list] = {}
    for p in plan:
        params = dict(p.params)
        if p.depends_on:
            ids = sorted({j.job_id.split("_")[0] for j in jobs[p.depends_on]})
            params = with_dependency(params, f"{p.dep_kind}:" + ":".join(ids))
        ex = make_executor(cc, params)
        if isinstance(p.fn, list):
            with ex.batch():
                jobs[p.label] = [ex.submit(fn) for fn in p.fn]
        else:
            jobs[p.label] = [ex.submit(p.fn)]
    return jobs


def with_dependency(params: dict, dependency: str) -> dict:
    """Add a Slurm dependency; a dependency that can no longer be met cancels the job (no hang)."""
    params = dict(params)
    params["slurm_dependency"] = dependency
    extra = dict(params.get("slurm_additional_parameters", {}))
    extra.setdefault("kill-on-invalid-dep", "yes")
    params["slurm_additional_parameters"] = extra
    return params


@dataclass
class JobReport:
    label: str
    job_id: str
    state: str  # Slurm state (sacct), e.g. COMPLETED, FAILED, CANCELLED
    exit_code: str
    started: bool  # False: never got nodes (e.g. cancelled because its dependency failed)
    run_dir: str = ""
    complete: bool = False  # <run_dir>/COMPLETE exists
    note: str = ""


def sacct_info(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """State, exit code and node list of jobs (array tasks as ``<array>_<task>``), newest record."""
    if not job_ids:
        return {}
    cmd = ["sacct", "-X", "-P", "-n", "-o", "JobID,State,ExitCode,NodeList,Reason"]
    for j in job_ids:
        cmd += ["-j", j]
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    info: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) == 5:
            info[parts[0]] = dict(zip(("state", "exit_code", "nodes", "reason"), parts[1:]))
    return info


_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def wait_jobs(job_ids: list[str], poll_s: float = 15, timeout_s: float | None = None,
              on_poll: Callable[[dict], None] | None = None) -> dict[str, dict[str, str]]:
    """Poll sacct until every job is in a final state (requeued jobs count as still running)."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        info = sacct_info(job_ids)
        if on_poll is not None:
            on_poll(info)
        if all(info.get(j, {}).get("state", "").split(" ")[0] in _FINAL for j in job_ids):
            return info
        if deadline is not None and time.time() > deadline:
            raise TimeoutError(f"jobs {job_ids} not finished after {timeout_s}s: {info}")
        time.sleep(poll_s)


def report(label: str, job_id: str, info: dict[str, dict[str, str]], run_dir: str = "") -> JobReport:
    rec = info.get(job_id, {})
    state = rec.get("state", "UNKNOWN").split(" ")[0]
    started = rec.get("nodes", "") not in ("", "None assigned")
    complete = bool(run_dir) and (Path(run_dir) / "COMPLETE").is_file()
    note = ""
    if not started and state in _FINAL:
        reason = rec.get("reason", "")
        note = "never started: " + ("the job it depends on did not succeed" if reason.startswith("Depend")
                                    else f"{state.lower()} (reason: {reason or 'unknown'})")
    elif state == "FAILED":
        note = f"failed (exit {rec.get('exit_code', '?')}); see the job's log"
    return JobReport(label, job_id, state, rec.get("exit_code", ""), started, run_dir, complete, note)


def format_reports(reports: list[JobReport]) -> str:
    rows = [("job", "id", "state", "exit", "started", "complete", "run folder / note")]
    for r in reports:
        rows.append((r.label, r.job_id, r.state, r.exit_code, "yes" if r.started else "no",
                     "yes" if r.complete else "no", r.note or r.run_dir))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


# --------------------------------------------------------------------------------------
# The stage I -> stage II chain
# --------------------------------------------------------------------------------------
def plan_chain(cc: ClusterConfig, stage1_config: str, stage2_config: str, stage1_overrides: list[str],
               stage2_overrides: list[str]) -> list[Planned]:
    """Stage I, then stage II with afterok on stage I (its export is stage II's frozen G)."""
    s1 = make_train_job(stage1_config, stage1_overrides, stop_grace_s=cc.stop_grace_s)
    s1_cfg = load_config(s1.config, s1.overrides)
    if s1_cfg.model.stage != 1:
        raise ConfigError(f"{stage1_config}: model.stage must be 1 for the first job of the chain")
    export = Path(s1_cfg.train.run_dir) / "export" / "generator.pt"
    s2_over = [o for o in stage2_overrides if not o.startswith("model.stage1_export=")]
    if len(s2_over) == len(stage2_overrides):  # not set by the user: chain to this stage I
        s2_over.append(f"model.stage1_export={export}")
    else:
        s2_over = stage2_overrides
    s2 = make_train_job(stage2_config, s2_over, stop_grace_s=cc.stop_grace_s, need_stage1_export=False)
    if load_config(s2.config, s2.overrides).model.stage != 2:
        raise ConfigError(f"{stage2_config}: model.stage must be 2 for the second job of the chain")
    return [
        Planned("stage1", s1, executor_parameters(cc, cc.train, "stackgan-s1")),
        Planned("stage2", s2, executor_parameters(cc, cc.train, "stackgan-s2"), "stage1", "afterok"),
    ]


# --------------------------------------------------------------------------------------
# Sweeps: a grid of overrides -> one job array, one run folder per point, a summary job
# --------------------------------------------------------------------------------------
def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["optim.lr_g=1e-4,2e-4", "model.gf_dim=32,64"]`` -> ordered {key: [values]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like optim.lr_g=1e-4,2e-4")
        key, vals = item.split("=", 1)
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not key or not values:
            raise ConfigError(f"--grid {item!r}: needs a key and at least one value")
        if key in grid:
            raise ConfigError(f"--grid {key} given twice")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(index: int, point: dict[str, str]) -> str:
    """A folder name that says what the point is: ``03-lr_g=2e-4-gf_dim=64``."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join([f"{index:02d}", *parts]))


def plan_sweep(cc: ClusterConfig, config: str, overrides: list[str], grid: dict[str, list[str]],
               sweep_dir: str | Path, write_manifest: bool = True) -> list[Planned]:
    """Check every point's config, write ``sweep.json`` (the points and their run folders)."""
    sweep_dir = Path(sweep_dir).resolve()
    points = grid_points(grid)
    jobs, manifest = [], []
    for i, point in enumerate(points):
        name = point_name(i, point)
        over = [*overrides, *(f"{k}={v}" for k, v in point.items()), f"train.run_dir={sweep_dir / name}"]
        try:
            job = make_train_job(config, over, stop_grace_s=cc.stop_grace_s)
        except ConfigError as e:
            raise ConfigError(f"sweep point {name}: {e}") from None
        jobs.append(job)
        manifest.append({"name": name, "point": point, "run_dir": str(sweep_dir / name), "overrides": over})
    if write_manifest:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(sweep_dir / "sweep.json", json.dumps(
            {"config": str(Path(config).resolve()), "overrides": overrides, "grid": grid, "points": manifest},
            indent=2))
    return [
        Planned("points", jobs, executor_parameters(cc, cc.train, "stackgan-sweep")),
        Planned("summary", SummaryJob(str(sweep_dir)), executor_parameters(cc, cc.summary, "stackgan-sweep-summary"),
                "points", "afterany"),
    ]


def _read_jsonl(path: Path) -> list[dict]:
    recs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill: ignore
    return recs


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Outcome and last metrics of one run folder (from COMPLETE, checkpoints and log.jsonl)."""
    run = Path(run_dir)
    recs = _read_jsonl(run / "log.jsonl")
    train_recs = [r for r in recs if "loss_d" in r]
    diag = [r for r in recs if "diversity" in r]
    ckpts = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
    if (run / "COMPLETE").is_file():
        status = "complete"
    elif ckpts:
        status = f"stopped ({ckpts[-1].name})"
    elif recs:
        status = "failed before a checkpoint"
    else:
        status = "not started"
    row: dict[str, Any] = {"status": status, "step": max((r.get("step", 0) for r in recs), default=0)}
    last = train_recs[-1] if train_recs else {}
    for k in ("loss_d", "loss_g", "kl", "g_d_ratio", "img_per_s"):
        row[k] = last.get(k, "")
    row.update({k: v for k, v in last.items() if k.startswith("d_") and isinstance(v, (int, float))})
    row["diversity"] = diag[-1]["diversity"] if diag else ""
    return row


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    man = sweep_dir / "sweep.json"
    if not man.is_file():
        raise ConfigError(f"{sweep_dir}: no sweep.json (not a sweep folder)")
    rows = []
    for p in json.loads(man.read_text())["points"]:
        rows.append({"point": p["name"], **p["point"], **run_status(p["run_dir"])})
    return rows


def write_summary(sweep_dir: str | Path) -> Path:
    """``summary.csv`` (every column) and ``summary.md`` (a table) in the sweep folder."""
    sweep_dir = Path(sweep_dir)
    rows = summarize(sweep_dir)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    _atomic_write(sweep_dir / "summary.csv", buf.getvalue())

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    _atomic_write(sweep_dir / "summary.md", "\n".join(md) + "\n")
    return sweep_dir / "summary.md"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# Command lines (jobs/*.py are thin wrappers around these)
# --------------------------------------------------------------------------------------
def _common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cluster", default="jobs/cluster.yaml", help="cluster config (default: %(default)s)")
    ap.add_argument("--cluster-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override cluster config entries, e.g. train.nodes=2 partition=gpu")
    ap.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    ap.add_argument("--wait", action="store_true", help="wait for the jobs and print their outcome")


def _run(plan: list[Planned], cc: ClusterConfig, args, run_dirs: dict[str, list[str]],
         after: Callable[[], None] | None = None) -> int:
    if args.dry_run:
        print(describe(plan), end="")
        print("(dry run: nothing submitted)")
        return 0
    jobs = submit_plan(cc, plan)
    for label, js in jobs.items():
        print(f"submitted {label}: {', '.join(j.job_id for j in js)}")
    print(f"logs: {Path(cc.folder).parent if '%' in cc.folder else cc.folder}/<job id>/")
    if not args.wait:
        return 0
    ids = [j.job_id for js in jobs.values() for j in js]
    info = wait_jobs(ids, poll_s=cc.poll_s)
    reports = []
    for label, js in jobs.items():
        dirs = run_dirs.get(label, [""] * len(js))
        for i, (j, d) in enumerate(zip(js, dirs)):
            r = report(label if len(js) == 1 else f"{label}[{i}]", j.job_id, info, d)
            if r.state == "FAILED":
                r.note = f"failed: {_job_error(j) or 'exit ' + r.exit_code} (log: {j.paths.stderr})"
            reports.append(r)
    print(format_reports(reports))
    if after is not None:
        after()
    return 0 if all(r.state == "COMPLETED" for r in reports) else 1


def _job_error(job) -> str:
    """Last line of the exception a failed submitit job reported ('' if none)."""
    try:
        exc = job.exception()
    except Exception:  # no result file (killed), unreadable pickle...
        return ""
    text = str(exc or "")
    parts = text.split("-" * 22)  # submitit: header / traceback / where the logs are
    lines = [line.strip() for line in (parts[1] if len(parts) > 2 else text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def chain_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/train_chain.py",
                                 description="Stage I then stage II on Slurm (stage II waits for stage I's success).")
    ap.add_argument("--stage1-config", default="configs/birds_stage1.yaml")
    ap.add_argument("--stage2-config", default="configs/birds_stage2.yaml")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for both stages")
    ap.add_argument("--stage1-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for stage I")
    ap.add_argument("--stage2-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for stage II")
    _common_args(ap)
    args = ap.parse_args(argv)
    try:
        cc = load_cluster_config(args.cluster, args.cluster_set)
        plan = plan_chain(cc, args.stage1_config, args.stage2_config, [*args.set, *args.stage1_set],
                          [*args.set, *args.stage2_set])
    except ConfigError as e:
        print(f"train_chain: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    dirs = {p.label: [p.fn.run_dir] for p in plan}
    return _run(plan, cc, args, dirs)


def sweep_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/sweep.py",
                                 description="A grid of overrides as one Slurm job array + a summary table.")
    ap.add_argument("--config", default="configs/birds_stage1.yaml")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="one axis of the grid (repeat for more axes)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every point")
    ap.add_argument("--sweep-dir", help="folder holding one run folder per point (default: runs/sweeps/<time>)")
    ap.add_argument("--summarize", metavar="SWEEP_DIR", help="only (re)write SWEEP_DIR/summary.{md,csv} and print it")
    _common_args(ap)
    args = ap.parse_args(argv)
    try:
        if args.summarize:
            print(write_summary(args.summarize).read_text(), end="")
            return 0
        if not args.grid:
            raise ConfigError("give at least one --grid KEY=V1,V2")
        cc = load_cluster_config(args.cluster, args.cluster_set)
        sweep_dir = args.sweep_dir or f"runs/sweeps/{time.strftime('%Y%m%d-%H%M%S')}"
        plan = plan_sweep(cc, args.config, args.set, parse_grid(args.grid), sweep_dir,
                          write_manifest=not args.dry_run)
    except ConfigError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    sweep_dir = str(Path(sweep_dir).resolve())
    dirs = {"points": [j.run_dir for j in plan[0].fn], "summary": [""]}
    return _run(plan, cc, args, dirs, after=lambda: print(Path(sweep_dir, "summary.md").read_text(), end=""))


def evaluate_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/evaluate.py",
                                 description="Run `python -m stackgan.evaluate ARGS` as a Slurm job "
                                             "(resources: the cluster config's `eval` section).")
    _common_args(ap)
    ap.add_argument("--module", default="stackgan.evaluate", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for stackgan.evaluate (after --)")
    args = ap.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    try:
        cc = load_cluster_config(args.cluster, args.cluster_set)
    except ConfigError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    job = CommandJob(args.module, rest, str(Path.cwd()))
    params = executor_parameters(cc, cc.eval, "stackgan-eval")
    params["tasks_per_node"] = 1  # one evaluation process, whatever the GPU count
    plan = [Planned("evaluate", job, params)]
    return _run(plan, cc, args, {})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["resolve"]:
        return resolve_main(argv[1:])
    if argv[:1] == ["summarize"] and len(argv) == 2:
        try:
            print(write_summary(argv[1]).read_text(), end="")
            return 0
        except ConfigError as e:
            print(f"stackgan.cluster: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
    print("usage: python -m stackgan.cluster resolve --config FILE [key=value ...]\n"
          "       python -m stackgan.cluster summarize SWEEP_DIR", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
