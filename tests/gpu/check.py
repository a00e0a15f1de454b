"""The GPU check: what the first run on a GPU cluster must not be the one to find, in one
command that finishes in under five minutes on one GPU (or two), with one JSON of figures.

    bash tests/gpu/check.sh                   # = python -m tests.gpu.check --out runs/gpucheck.json
    python -m tests.gpu.check --smoke       # the same script on a CPU: tiny steps, gloo, bf16 (CI)

It drives only the public command lines (``python -m stackgan.train``, ``accelerate launch``,
``python -m pytest``, ``python -m stackgan.bench``) and reads what they leave behind (run
folders' ``log.jsonl``, their ``finished`` record, checkpoints, the benchmark's JSON), so it
does not depend on the trainer's internals. Parts:

* ``env``       GPUs, driver-side versions (torch, CUDA, cuDNN, NCCL, accelerate, DeepSpeed);
* ``data``      a tiny embedded bird set (``shards/prepare.py --embedded``), unless ``--shards``;
* ``pytest``    ``python -m pytest -m gpu``: the test suite's CUDA tests;
* ``train``     stage I and stage II (``configs/birds_stage{1,2}.yaml``), fp32 / bf16 / fp16
                (smoke: bf16): N steps straight with a checkpoint at N/2, then from
                that checkpoint again to N in a new run folder. Exit 0, every logged loss
                finite, and the resumed run's final G, D, EMA and optimiser state equal to
                the straight run's, bit for bit. The runs use deterministic kernels
                (``--deterministic-trainer``: cuDNN deterministic, no autotuning, cuBLAS
                workspace pinned), because a resume can only be compared exactly when the
                same inputs give the same bits;
* ``ddp``       2 processes (``accelerate launch``, NCCL; gloo in smoke mode) of the quality
                recipe (``configs/quality_recipe.yaml``: every option it uses, bf16) at the
                official widths and batch 64 per GPU (smoke: tiny): ranks' parameter
                fingerprints identical; with two GPUs also 1-GPU vs 2-GPU images/s -> scaling;
* ``deepspeed`` ZeRO-2 in bf16 and fp16 (2 processes on 2 GPUs, else 1): finished, ranks
                identical, losses finite, the engines' own description line;
* ``bench``     ``python -m stackgan.bench --device cuda --only peak,stage1,stage2``: bf16
                stage I at batch 64 against the bf16 matmul peak of the same run, stage II.

Targets (reported, they do not fail the check): bf16 stage I b64 >= 40% of the bf16 matmul
peak; 2-GPU DDP scaling >= 90%. The check fails (exit 1) when a part fails.

Scheduling: timing figures need a GPU to themselves, correctness runs do not. On one GPU the
benchmark runs alone first (the data set is made on the CPU meanwhile), then every
correctness run shares the GPU, several at a time. With two or more GPUs the benchmark
holds GPU 0 while the 1-GPU DDP baseline and the correctness runs use GPU 1; then the 2-GPU
DDP run, then DeepSpeed on both. Each job has a timeout and the whole check a time budget:
a job that cannot start before the budget is over is skipped, with that reason.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stackgan.files import atomic_write

ROOT = Path(__file__).resolve().parents[2]  # the checkout: the check runs its command lines there
TARGET_FRAC_BF16 = 0.40  # bf16 stage I b64: of the bf16 matmul peak
TARGET_DDP_SCALING = 0.90  # 2 GPUs vs 1, images/s per GPU
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
DDP_CONFIG = "configs/quality_recipe.yaml"  # the DDP part runs every option the recipe uses
# -> train.mixed_precision ('no' quoted: YAML reads a bare no as false)
MIXED_PRECISION = {"fp32": "'no'", "bf16": "bf16", "fp16": "fp16"}


class CheckError(ValueError):
    """Bad command-line input (names the option); exit status 2."""


# --------------------------------------------------------------------------------------
# Sizes of the two modes
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How much each part does. GPU: a few hundred steps at the embedded configs' sizes; smoke:
    the test suite's tiny networks and a handful of steps."""

    smoke: bool
    precisions: tuple[str, ...]
    steps: dict  # stage -> steps of the straight run (a checkpoint at half)
    model: tuple[str, ...]  # overrides of every correctness run
    ddp_model: tuple[str, ...]  # overrides of the DDP runs
    ddp_steps: int
    ddp_log_every: int
    budget_s: float
    jobs: int  # correctness runs at a time

    @staticmethod
    def gpu(budget_s: float, jobs: int) -> "Plan":
        return Plan(smoke=False, precisions=("fp32", "bf16", "fp16"), steps={1: 200, 2: 200},
                    model=("data.num_workers=2", "train.log_every=10",
                           "train.sample_every=100"),
                    ddp_model=("model.gf_dim=128", "model.df_dim=64", "data.batch_size=64",
                               "data.num_workers=3"),
                    ddp_steps=100, ddp_log_every=20, budget_s=budget_s, jobs=jobs)

    @staticmethod
    def cpu_smoke(budget_s: float, jobs: int) -> "Plan":
        tiny = ("model.gf_dim=16", "model.df_dim=8", "model.z_dim=16", "model.cond_dim=16", "model.r_num=1",
                "data.batch_size=4", "data.num_workers=0", "optim.ema_decay=0.9",
                "train.log_every=1", "train.sample_every=100")
        # one precision: bf16 takes the same resume path as fp32 plus autocast; fp32 exact
        # resume (stage I, SIGKILL) is tests/test_train.py's, and CI runs this smoke mode to
        # prove the script runs end to end, not every combination the GPU mode covers
        return Plan(smoke=True, precisions=("bf16",), steps={1: 4, 2: 2}, model=tiny,
                    ddp_model=tiny, ddp_steps=4, ddp_log_every=2, budget_s=budget_s, jobs=jobs)


# --------------------------------------------------------------------------------------
# Jobs: one command each, with a timeout, dependencies and its own log file
# --------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    cmd: list[str]
    timeout: float
    env: dict = field(default_factory=dict)
    after: tuple[str, ...] = ()  # jobs that must have succeeded first
    ok_codes: tuple[int, ...] = (0,)


@dataclass
class Result:
    name: str
    status: str  # ok | failed | skipped
    rc: int | None = None
    wall_s: float = 0.0
    reason: str = ""
    log: str = ""

    def tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log).read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


class Runner:
    """Starts jobs as their dependencies finish, at most ``parallel`` at a time, never after the
    deadline; each job's output goes to ``<logs>/<name>.log``."""

    def __init__(self, logs: Path, deadline: float, say: Callable[[str], None] = print):
        self.logs, self.deadline, self.say = logs, deadline, say
        self.results: dict[str, Result] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, jobs: list[Job], parallel: int) -> dict[str, Result]:
        pending, running = list(jobs), {}
        known = {j.name for j in jobs} | set(self.results)
        while pending or running:
            for job in list(pending):
                blocked = [d for d in job.after if self.results.get(d, Result(d, "")).status != "ok"]
                failed = [d for d in blocked if d in self.results or d not in known]
                if failed:
                    pending.remove(job)
                    why = f"needs {', '.join(failed)}, which did not succeed"
                    self._done(Result(job.name, "skipped", reason=why))
                elif not blocked and len(running) < parallel:
                    pending.remove(job)
                    left = self.deadline - time.time()
                    if left < 5:
                        self._done(Result(job.name, "skipped", reason="the check's time budget was used up"))
                    else:
                        running[job.name] = self._start(job, min(job.timeout, left))
            for name, (job, proc, t0, limit, log) in list(running.items()):
                if proc.poll() is None and time.time() - t0 < limit:
                    continue
                del running[name]
                timed_out = proc.poll() is None
                if timed_out:
                    _kill(proc)
                log.close()
                rc = proc.returncode
                status = "ok" if rc in job.ok_codes and not timed_out else "failed"
                reason = "" if status == "ok" else f"exit {rc}"
                if timed_out:
                    reason = f"timed out after {limit:.0f}s"
                self._done(Result(name, status, rc, time.time() - t0, reason, str(self.logs / f"{name}.log")))
            time.sleep(0.2)
        return {j.name: self.results[j.name] for j in jobs}

    def _start(self, job: Job, limit: float):
        log = open(self.logs / f"{job.name}.log", "w")
        log.write("$ " + " ".join(job.cmd) + "\n")
        log.flush()
        self.say(f"[gpucheck] start {job.name}")
        proc = subprocess.Popen(job.cmd, cwd=ROOT, env={**_base_env(), **job.env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        return job, proc, time.time(), limit, log

    def _done(self, res: Result) -> None:
        self.results[res.name] = res
        extra = f" ({res.reason})" if res.reason else ""
        self.say(f"[gpucheck] {res.status:7s} {res.name} {res.wall_s:.0f}s{extra}")


def _kill(proc: subprocess.Popen) -> None:
    """Stop a job and the processes it started (its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# --------------------------------------------------------------------------------------
# Reading what the commands leave behind
# --------------------------------------------------------------------------------------
def log_records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished_record(records: list[dict]) -> dict | None:
    done = [r for r in records if r.get("event") == "finished"]
    return done[-1] if done else None


def nonfinite_losses(records: list[dict]) -> list[str]:
    """``step:key`` of every logged loss that is NaN or infinite."""
    bad = []
    for r in records:
        for k, v in r.items():
            if k.startswith("loss") and isinstance(v, (int, float)) and not math.isfinite(v):
                bad.append(f"{r.get('step')}:{k}")
    return bad


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / "meta.json").is_file())
    return ckpts[-1] if ckpts else None


def compare_states(a: dict, b: dict) -> dict:
    """Bitwise comparison of two checkpoints' G, D, EMA and optimiser states.

    Returns ``{"equal": bool, "max_abs_diff": float, "differs": [first few names]}``."""
    import torch

    worst, differs = 0.0, []

    def walk(x, y, name: str) -> None:
        nonlocal worst
        if torch.is_tensor(x) and torch.is_tensor(y):
            if x.shape != y.shape or x.dtype != y.dtype:
                differs.append(f"{name} (shape/dtype)")
                worst = math.inf
            elif not torch.equal(x, y):
                differs.append(name)
                if x.is_floating_point():
                    worst = max(worst, float((x.double() - y.double()).abs().max()))
                else:
                    worst = math.inf
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                differs.append(f"{name} (keys)")
                worst = math.inf
            for k in x:
                if k in y:
                    walk(x[k], y[k], f"{name}.{k}" if name else str(k))

    for part in ("G", "D", "ema", "opt_g", "opt_d", "scaler", "step"):
        if part in a or part in b:
            x, y = a.get(part), b.get(part)
            if torch.is_tensor(x) or isinstance(x, dict):
                walk(x, y, part)
            elif x != y:
                differs.append(part)
                worst = math.inf
    return {"equal": not differs, "max_abs_diff": worst, "differs": differs[:8]}


def _load_state(ckpt: Path) -> dict:
    import torch

    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)


def median_img_per_s(records: list[dict], skip: int = 2) -> float | None:
    """Median images/s of the log intervals after the first ``skip`` (warm-up, autotuning)."""
    vals = [r["img_per_s"] for r in records if "img_per_s" in r]
    vals = vals[skip:] if len(vals) > skip else vals[-1:]
    return statistics.median(vals) if vals else None


def bench_figures(report: dict, device: str) -> dict:
    """The figures the targets need from a ``stackgan.bench`` JSON: per (case, precision) our
    step's images/s, GFLOP/s and fraction of the run's peak in that precision (the best dense
    kernel; None and ``peak_understated`` when the step ran faster than it)."""
    cases = {}
    for c in report.get("cases", []):
        ours = c.get("runners", {}).get("ours")
        if ours:
            cases[f"{c['name']} {c['precision']}"] = {
                "img_per_s": ours.get("img_per_s"), "s_per_iter": ours.get("s_per_iter"),
                "gflops_per_s": ours.get("gflops_per_s"), "frac_peak": ours.get("frac_peak"),
                "peak_understated": ours.get("peak_understated", False),
                "vs_original": ours.get("vs_original"), "peak_mem_mb": ours.get("peak_mem_mb")}
    out = {"peak_gflops": report.get("peak_gflops", {}), "cases": cases,
           "errors": [f"{e.get('label', '')}: {e.get('error', '')[-300:]}" for e in report.get("errors", [])]}
    if device == "cuda":
        s1 = cases.get("official-s1-b64 bf16", {})
        out["target_bf16_stage1_b64"] = s1.get("frac_peak")
        out["stage2_b16_bf16"] = cases.get("official-s2-b16 bf16")
    return out


# --------------------------------------------------------------------------------------
# The parts: jobs to run, then a record from their results
# --------------------------------------------------------------------------------------
class Check:
    def __init__(self, args, plan: Plan, work: Path, env: dict):
        self.args, self.plan, self.work, self.env = args, plan, work, env
        self.cuda = not plan.smoke
        self.n_gpus = env.get("gpu_count", 0) if self.cuda else 0
        self.shards = Path(args.shards).resolve() if args.shards else work / "shards"
        self.py = sys.executable

    # ---- commands --------------------------------------------------------------------
    def trainer(self, run: Path, config: str, *overrides: str, resume: str = "auto") -> list[str]:
        """The trainer's CLI under deterministic kernels (see ``--deterministic-trainer``)."""
        return [self.py, "-m", "tests.gpu.check", "--deterministic-trainer", "--config", config,
                "--resume", resume, f"data.shards={self.shards}", f"train.run_dir={run}",
                *overrides]

    def launch(self, accel_config: str, nproc: int, run: Path, *overrides: str,
               config: str = "configs/birds_stage1.yaml") -> list[str]:
        return [self.py, "-m", "accelerate.commands.launch",
                "--config_file", f"configs/accelerate/{accel_config}", "--num_processes", str(nproc),
                "--main_process_port", str(_free_port()),
                "-m", "stackgan.train", "--config", config, f"data.shards={self.shards}",
                f"train.run_dir={run}", *overrides]

    def gpus(self, *index: int) -> dict:
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, index))} if self.cuda else {}

    # ---- data --------------------------------------------------------------------------
    def data_job(self) -> Job | None:
        if self.args.shards:
            return None
        workers = "2" if self.plan.smoke else "4"
        cmd = [self.py, "shards/prepare.py", "--embedded", "--embedded-dir", str(self.work / "birds"),
               "--species", "6", "--images-per-species", "8", "--out", str(self.shards),
               "--shard-size", "16", "--workers", workers, "--quiet"]
        return Job("data", cmd, 300)

    # ---- pytest ------------------------------------------------------------------------
    def pytest_job(self, gpu_env: dict, after: tuple[str, ...]) -> Job:
        xml = self.work / "pytest-gpu.xml"
        return Job("pytest", [self.py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                              f"--junitxml={xml}", "tests"], 240 if self.cuda else 300, gpu_env, after,
                   ok_codes=(0, 5))  # 5: nothing collected

    def pytest_record(self, res: Result) -> dict:
        rec = _result_fields(res)
        xml = self.work / "pytest-gpu.xml"
        if xml.is_file():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            rec.update(counts)
            rec["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                   if c.find("failure") is not None or c.find("error") is not None][:20]
            if not self.cuda and counts["passed"] == 0:
                rec["note"] = "no CUDA device: the gpu tests skip themselves"
        return rec

    # ---- train: stage x precision, straight and resumed --------------------------------
    def train_jobs(self, gpu_env: dict, after: tuple[str, ...]) -> list[Job]:
        jobs = []
        first = f"s1-{self.plan.precisions[0]}"  # stage II refines this run's export (GPU: fp32)
        export1 = self.work / "train" / first / "export" / "generator.safetensors"
        for stage in (1, 2):
            n = self.plan.steps[stage]
            for prec in self.plan.precisions:
                name = f"s{stage}-{prec}"
                common = (*self.plan.model, f"train.steps={n}", f"train.ckpt_every={n // 2}",
                          f"train.mixed_precision={MIXED_PRECISION[prec]}",
                          *self.deterministic_overrides())
                if stage == 2:
                    common += (f"model.stage1_export={export1}",)
                deps = after + ((first,) if stage == 2 else ())
                config = f"configs/birds_stage{stage}.yaml"
                straight, resumed = self.work / "train" / name, self.work / "train" / f"{name}-resumed"
                env = {**gpu_env, **DETERMINISTIC_ENV}
                middle = straight / "checkpoints" / f"step-{n // 2:08d}"
                jobs.append(Job(name, self.trainer(straight, config, *common), 300, env, deps))
                again = self.trainer(resumed, config, *common, resume=str(middle))
                jobs.append(Job(f"{name}-resumed", again, 300, env, (name,)))
        return jobs

    def deterministic_overrides(self) -> tuple[str, ...]:
        """Trainer options for deterministic kernels, where the config has them (the shim
        ``--deterministic-trainer`` sets the torch flags either way)."""
        from stackgan.config import ConfigError, load_config

        out = []
        for o in ("train.deterministic=true", "train.cudnn_benchmark=false"):
            try:
                load_config(None, [o, "train.steps=1"])
                out.append(o)
            except ConfigError:
                pass
        return tuple(out)

    def train_record(self, results: dict[str, Result]) -> dict:
        runs = {}
        for stage in (1, 2):
            for prec in self.plan.precisions:
                name = f"s{stage}-{prec}"
                runs[name] = self._resume_record(name, results)
        failed = [k for k, r in runs.items() if r["status"] != "ok"]
        return {"status": "failed" if failed else "ok", "failed": failed, "runs": runs,
                "steps": self.plan.steps, "note": "concurrent runs: images/s are not benchmark figures"}

    def _resume_record(self, name: str, results: dict[str, Result]) -> dict:
        straight, resumed = results[name], results[f"{name}-resumed"]
        rec = {"straight": _result_fields(straight), "resumed": _result_fields(resumed)}
        problems = [f"{r.name}: {r.status} {r.reason}".strip()
                    for r in (straight, resumed) if r.status != "ok"]
        for tag, res in (("straight", straight), ("resumed", resumed)):
            run = self.work / "train" / res.name
            recs = log_records(run)
            bad = nonfinite_losses(recs)
            rec[tag].update(finished=finished_record(recs) is not None, nonfinite=bad[:5],
                            img_per_s=median_img_per_s(recs),
                            mem_mb=max((r.get("mem_mb", 0) for r in recs), default=None))
            if res.status == "ok" and (bad or not rec[tag]["finished"]):
                what = f"non-finite losses {bad[:3]}" if bad else "no 'finished' record"
                problems.append(f"{res.name}: {what}")
            if res.status != "ok":
                rec[tag]["log_tail"] = res.tail(1500)
        a = latest_checkpoint(self.work / "train" / name)
        b = latest_checkpoint(self.work / "train" / f"{name}-resumed")
        if straight.status == "ok" and resumed.status == "ok" and a and b:
            cmp = compare_states(_load_state(a), _load_state(b))
            rec["exact_resume"] = cmp["equal"]
            rec["resume_diff"] = cmp
            if not cmp["equal"]:
                nondet = _nondeterministic_ops(resumed.tail(200_000))
                problems.append(f"{name}: resumed run differs from the straight run ({cmp['differs'][:3]}, "
                                f"max |diff| {cmp['max_abs_diff']:.3g})" +
                                (f"; ops without a deterministic kernel: {nondet}" if nondet else ""))
        rec["status"] = "failed" if problems else "ok"
        rec["problems"] = problems
        return rec

    # ---- DDP ------------------------------------------------------------------------------
    def ddp_jobs(self, after: tuple[str, ...]) -> list[Job]:
        """The quality recipe (every option it uses, bf16), shortened: 2 processes, and on GPUs
        also 1, for the scaling figure."""
        n = self.plan.ddp_steps
        common = (*self.plan.ddp_model, f"train.steps={n}", f"train.log_every={self.plan.ddp_log_every}",
                  f"train.ckpt_every={n}", "train.sample_every=100000",
                  "train.mixed_precision=bf16", "train.time_limit_min=0", "train.metrics=",
                  "train.metrics_every=0")
        accel = "cpu_2proc.yaml" if self.plan.smoke else "multi_gpu.yaml"
        two = self.launch(accel, 2, self.work / "ddp" / "two", *common, config=DDP_CONFIG)
        if self.plan.smoke:
            return [Job("ddp-2proc", two, 300, {}, after)]
        if self.n_gpus < 2:
            return []
        one = [self.py, "-m", "stackgan.train", "--config", DDP_CONFIG, f"data.shards={self.shards}",
               f"train.run_dir={self.work / 'ddp' / 'one'}", *common]
        return [Job("ddp-1gpu", one, 180, self.gpus(1), after),
                Job("ddp-2gpu", two, 180, self.gpus(0, 1), after + ("ddp-1gpu",))]

    def ddp_record(self, results: dict[str, Result]) -> dict:
        if not self.plan.smoke and self.n_gpus < 2:
            return {"status": "skipped", "reason": f"{self.n_gpus} GPU(s): the 2-process NCCL run needs 2"}
        two = results.get("ddp-2proc") or results["ddp-2gpu"]
        recs = log_records(self.work / "ddp" / "two")
        fin = finished_record(recs) or {}
        rec = {"run": _result_fields(two), "config": DDP_CONFIG, "world_size": fin.get("world_size"),
               "ranks_identical": fin.get("ranks_identical"), "fingerprints": fin.get("fingerprints"),
               "nonfinite": nonfinite_losses(recs)[:5], "img_per_s_2": median_img_per_s(recs)}
        problems = []
        if two.status != "ok":
            problems.append(f"{two.name}: {two.reason}")
            rec["log_tail"] = two.tail(2000)
        elif not (fin.get("world_size") == 2 and fin.get("ranks_identical")):
            problems.append(f"parameters differ across ranks or the run was not 2 processes: {fin}")
        if rec["nonfinite"]:
            problems.append(f"non-finite losses {rec['nonfinite']}")
        if "ddp-1gpu" in results:
            one = median_img_per_s(log_records(self.work / "ddp" / "one"))
            rec["img_per_s_1"] = one
            if results["ddp-1gpu"].status != "ok":
                problems.append(f"ddp-1gpu: {results['ddp-1gpu'].reason}")
            elif one and rec["img_per_s_2"]:
                rec["scaling"] = rec["img_per_s_2"] / (2 * one)
        else:
            rec["scaling_note"] = "no GPUs: scaling is measured on 2 GPUs only"
        rec["status"] = "failed" if problems else "ok"
        rec["problems"] = problems
        return rec

    # ---- DeepSpeed -------------------------------------------------------------------------
    def deepspeed_jobs(self, after: tuple[str, ...]) -> list[Job]:
        if self.plan.smoke:
            return []
        steps = ("train.steps=100", "train.log_every=10", "train.ckpt_every=100", "train.sample_every=100000",
                 "train.channels_last=false")
        jobs = []
        for prec in ("bf16", "fp16"):
            run = self.work / "deepspeed" / prec
            over = (*steps, f"train.mixed_precision={prec}", "data.num_workers=2")
            if self.n_gpus >= 2:
                cmd = self.launch("deepspeed_zero2.yaml", 2, run, *over)
                env = self.gpus(0, 1)
            else:
                cmd = [self.py, "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
                       f"data.shards={self.shards}", f"train.run_dir={run}",
                       "train.backend=deepspeed", *over]
                env = self.gpus(0)
            jobs.append(Job(f"deepspeed-{prec}", cmd, 240, env, after))
        return jobs

    def deepspeed_record(self, results: dict[str, Result]) -> dict:
        if self.plan.smoke:
            return {"status": "skipped",
                    "reason": "no CUDA device: DeepSpeed's two engines (ZeRO-1/2, bf16, fp16) are exercised "
                              "on CPU processes by tests/test_deepspeed.py"}
        runs, problems = {}, []
        for prec in ("bf16", "fp16"):
            res = results[f"deepspeed-{prec}"]
            recs = log_records(self.work / "deepspeed" / prec)
            fin = finished_record(recs) or {}
            out = res.tail(200_000)
            line = next((ln for ln in out.splitlines() if "backend deepspeed:" in ln), "")
            runs[prec] = {**_result_fields(res), "describe": line.split("] ", 1)[-1],
                          "world_size": fin.get("world_size"), "ranks_identical": fin.get("ranks_identical"),
                          "nonfinite": nonfinite_losses(recs)[:5]}
            want = "fp16 (fp16 weights" if prec == "fp16" else "bf16 (torch autocast"
            if res.status != "ok":
                problems.append(f"deepspeed-{prec}: {res.reason}")
                runs[prec]["log_tail"] = res.tail(2000)
            elif not fin.get("ranks_identical") or runs[prec]["nonfinite"] or want not in line:
                problems.append(f"deepspeed-{prec}: finished={bool(fin)}, "
                                f"ranks_identical={fin.get('ranks_identical')}, "
                                f"nonfinite={runs[prec]['nonfinite']}, describe={line!r}")
        return {"status": "failed" if problems else "ok", "problems": problems, "runs": runs, "zero_stage": 2}

    # ---- bench -------------------------------------------------------------------------------
    def bench_job(self, gpu_env: dict, after: tuple[str, ...]) -> Job:
        out = self.work / "bench.json"
        if self.plan.smoke:
            cmd = [self.py, "-m", "stackgan.bench", "--quick", "--only", "peak,stage1", "--out", str(out)]
        else:
            cmd = [self.py, "-m", "stackgan.bench", "--device", "cuda", "--only", "peak,stage1,stage2",
                   "--out", str(out)]
        return Job("bench", cmd, 240 if self.cuda else 300, gpu_env, after)

    def bench_record(self, res: Result) -> dict:
        rec = _result_fields(res)
        out = self.work / "bench.json"
        if out.is_file():
            rec.update(bench_figures(json.loads(out.read_text()), "cuda" if self.cuda else "cpu"))
        elif res.status != "ok":
            rec["log_tail"] = res.tail(2000)
        if res.status == "ok" and not out.is_file():
            rec["status"], rec["reason"] = "failed", "no bench JSON written"
        return rec


def _result_fields(res: Result) -> dict:
    out = {"status": res.status, "wall_s": round(res.wall_s, 1)}
    if res.reason:
        out["reason"] = res.reason
    if res.log:
        out["log"] = res.log
    return out


def _nondeterministic_ops(text: str) -> list[str]:
    """Ops torch warned about under ``use_deterministic_algorithms(True, warn_only=True)``."""
    found = []
    for line in text.splitlines():
        if "does not have a deterministic implementation" in line:
            op = line.split("does not have", 1)[0].strip().split()[-1]
            if op not in found:
                found.append(op)
    return found


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------
def probe_env() -> dict:
    """Versions and devices, in this process (run as its own job: ``--probe-env``)."""
    import importlib.metadata as md

    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "gpu_count": torch.cuda.device_count(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cpus": os.cpu_count()}
    for pkg in ("accelerate", "deepspeed", "numpy"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if torch.cuda.is_available():
        info["gpus"] = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "mem_gib": round(p.total_memory / 2**30, 1),
                                 "capability": f"{p.major}.{p.minor}"})
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as e:  # noqa: BLE001 - a build without NCCL
            info["nccl"] = f"unavailable ({e})"
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info


def _probe(work: Path, timeout: float = 120) -> dict:
    p = subprocess.run([sys.executable, "-m", "tests.gpu.check", "--probe-env"], cwd=ROOT, env=_base_env(),
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"environment probe failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_check(args) -> dict:
    t_start = time.time()
    work = Path(args.work).resolve()
    if work.exists() and not args.keep:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    plan = Plan.cpu_smoke(args.budget_s or 600, args.jobs or 2) if args.smoke else \
        Plan.gpu(args.budget_s or 290, args.jobs or 4)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    env = _probe(work)
    report: dict = {"schema": 1, "mode": "smoke (CPU)" if plan.smoke else "gpu",
                    "command": "python -m tests.gpu.check " + " ".join(args.argv),
                    "started": _dt.datetime.now().isoformat(timespec="seconds"), "work": str(work),
                    "budget_s": plan.budget_s, "env": env, "parts": {}}
    if not plan.smoke and not env.get("cuda_available"):
        raise CheckError("no CUDA device visible (torch.cuda.is_available() is False); use --smoke on a CPU")
    check = Check(args, plan, work, env)
    runner = Runner(work / "logs", t_start + plan.budget_s, say)
    results = _schedule(check, runner, plan)
    parts = report["parts"]
    parts["env"] = {"status": "ok"}
    if "data" in results:
        parts["data"] = {**_result_fields(results["data"]), "shards": str(check.shards)}
    else:
        parts["data"] = {"status": "ok", "shards": str(check.shards), "note": "given with --shards"}
    parts["pytest"] = check.pytest_record(results["pytest"])
    parts["train"] = check.train_record(results)
    parts["ddp"] = check.ddp_record(results)
    parts["deepspeed"] = check.deepspeed_record(results)
    parts["bench"] = check.bench_record(results["bench"])
    report["targets"] = targets(report)
    report["failed_parts"] = [k for k, v in parts.items() if v.get("status") == "failed"]
    report["ok"] = not report["failed_parts"]
    report["wall_s"] = round(time.time() - t_start, 1)
    return report


def _schedule(check: Check, runner: Runner, plan: Plan) -> dict[str, Result]:
    """Run every job in the order the module docstring describes; returns all results."""
    data = check.data_job()
    dep = ("data",) if data else ()
    if plan.smoke:
        jobs = ([data] if data else []) + [check.pytest_job({}, ()), *check.train_jobs({}, dep),
                                           *check.ddp_jobs(dep), check.bench_job({}, ())]
        return runner.run(jobs, plan.jobs)
    if check.n_gpus >= 2:  # bench alone on GPU 0; the 1-GPU baseline, then correctness runs, on GPU 1
        g1 = check.gpus(1)
        ddp = check.ddp_jobs(dep)
        first = ([data] if data else []) + [check.bench_job(check.gpus(0), ()), ddp[0],
                                            check.pytest_job(g1, ("ddp-1gpu",)),
                                            *check.train_jobs(g1, dep + ("ddp-1gpu",))]
        out = runner.run(first, plan.jobs + 1)
        out.update(runner.run(ddp[1:], 1))
        out.update(runner.run(check.deepspeed_jobs(dep), 2))
        return out
    out = runner.run(([data] if data else []) + [check.bench_job(check.gpus(0), ())], 2)  # bench alone
    out.update(runner.run([check.pytest_job({}, dep), *check.train_jobs({}, dep), *check.deepspeed_jobs(dep)],
                          plan.jobs))
    return out


def targets(report: dict) -> list[dict]:
    """The issue's performance targets, from the bench and DDP parts (None when not measured)."""
    bench, ddp = report["parts"].get("bench", {}), report["parts"].get("ddp", {})
    frac = bench.get("target_bf16_stage1_b64")
    scaling = ddp.get("scaling")
    s2 = bench.get("stage2_b16_bf16") or {}
    return [
        {"name": "bf16 stage I batch 64, of the bf16 peak (same run)", "value": frac,
         "target": TARGET_FRAC_BF16, "met": None if frac is None else frac >= TARGET_FRAC_BF16},
        {"name": "2-GPU DDP scaling (images/s of 2 GPUs / 2 x 1 GPU), bf16, batch 64 per GPU",
         "value": scaling, "target": TARGET_DDP_SCALING,
         "met": None if scaling is None else scaling >= TARGET_DDP_SCALING},
        {"name": "bf16 stage II batch 16 (stated)", "value": s2.get("frac_peak"),
         "img_per_s": s2.get("img_per_s"), "gflops_per_s": s2.get("gflops_per_s"),
         "target": None, "met": None},
    ]


def summary(report: dict) -> str:
    lines = [f"gpucheck ({report['mode']}): {'OK' if report['ok'] else 'FAILED'} in {report['wall_s']:.0f}s"]
    gpus = report["env"].get("gpus") or []
    if gpus:
        lines.append(f"  {len(gpus)} x {gpus[0]['name']}, torch {report['env']['torch']}, CUDA "
                     f"{report['env']['cuda_build']}, NCCL {report['env'].get('nccl')}")
    for name, part in report["parts"].items():
        why = part.get("reason") or "; ".join(part.get("problems", [])[:2])
        lines.append(f"  {name:10s} {part.get('status', '?'):8s} {why}".rstrip())
    for t in report["targets"]:
        v = t["value"]
        shown = "not measured" if v is None else f"{100 * v:.0f}%"
        goal = "" if t["target"] is None else f" (target >= {100 * t['target']:.0f}%: " \
            f"{'met' if t['met'] else 'missed' if t['met'] is False else 'n/a'})"
        lines.append(f"  target: {t['name']}: {shown}{goal}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Hidden entries used by the jobs
# --------------------------------------------------------------------------------------
def deterministic_trainer(argv: list[str]) -> int:
    """``python -m stackgan.train`` with deterministic kernels: cuDNN's deterministic algorithms,
    no autotuning, torch's deterministic implementations (a warning names any op without one)."""
    import torch

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    from stackgan.train import main as train_main

    return train_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.gpu.check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="CPU mode: tiny networks and steps, gloo, no DeepSpeed")
    p.add_argument("--out", default="runs/gpucheck.json", help="the JSON of figures (default %(default)s)")
    p.add_argument("--work", default="", help="scratch folder for runs and logs (default: next to --out)")
    p.add_argument("--shards", default="", help="use these shards instead of making a tiny set")
    p.add_argument("--budget-s", type=float, default=0,
                   help="time budget in seconds (default: 290 GPU, 600 smoke)")
    p.add_argument("--jobs", type=int, default=0, help="correctness runs at a time (default: 4 GPU, 2 smoke)")
    p.add_argument("--keep", action="store_true", help="do not clear the scratch folder first")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--probe-env"]:
        print(json.dumps(probe_env()))
        return 0
    if argv[:1] == ["--deterministic-trainer"]:
        return deterministic_trainer(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        if args.budget_s < 0 or args.jobs < 0:
            raise CheckError("--budget-s and --jobs must be >= 0")
        if args.shards and not (Path(args.shards) / "metadata.json").is_file():
            raise CheckError(f"--shards {args.shards}: no metadata.json there "
                             "(make shards with shards/prepare.py)")
        out = Path(args.out)
        args.work = args.work or str(out.with_suffix("")) + "-work"
        report = run_check(args)
    except CheckError as e:
        print(f"tests.gpu.check: error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(report, indent=1, default=str))
    print(summary(report))
    print(f"wrote {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
