"""Submitting a plan of jobs (with Slurm dependencies between them), waiting, the outcome table."""
from __future__ import annotations

import io
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .settings import ClusterConfig

_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


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


def make_executor(cc: ClusterConfig, params: dict):
    import submitit

    folder = Path(cc.folder)
    folder = folder if folder.is_absolute() else Path.cwd() / folder
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm", slurm_max_num_timeout=cc.max_num_timeout)
    ex.update_parameters(**params)
    return ex


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


def wait_for_outcome(jobs: dict[str, list], run_dirs: dict[str, list[str]], poll_s: float) -> list[JobReport]:
    """Wait until every submitted job has ended; one report each (array tasks as ``label[i]``)."""
    info = wait_jobs([j.job_id for js in jobs.values() for j in js], poll_s=poll_s)
    reports = []
    for label, js in jobs.items():
        dirs = run_dirs.get(label, [""] * len(js))
        for i, (j, d) in enumerate(zip(js, dirs)):
            r = report(label if len(js) == 1 else f"{label}[{i}]", j.job_id, info, d)
            if r.state == "FAILED":
                r.note = f"failed: {_job_error(j) or 'exit ' + r.exit_code} (log: {j.paths.stderr})"
            reports.append(r)
    return reports


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


def format_reports(reports: list[JobReport]) -> str:
    rows = [("job", "id", "state", "exit", "started", "complete", "run folder / note")]
    for r in reports:
        rows.append((r.label, r.job_id, r.state, r.exit_code, "yes" if r.started else "no",
                     "yes" if r.complete else "no", r.note or r.run_dir))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
