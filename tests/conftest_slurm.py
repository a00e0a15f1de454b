"""Helpers for the tests that run on the local Slurm cluster (tests/slurm/cluster.sh).

Imported by tests/test_slurm.py and tests/test_submitit.py (not a pytest conftest: the name
keeps it next to them without loading it for every test). Without a cluster those tests are
skipped with the reason, unless STACKGAN_REQUIRE_SLURM=1 (CI), where they fail instead.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A stage-I run small enough for 2 shared CPU cores (steps are added per test). The loader
# workers are the configs' own (data.num_workers: 1 per rank): every real cluster run has some,
# and Slurm's stop signals reach them too.
TINY = ["model.gf_dim=16", "model.df_dim=8", "data.batch_size=4",
        "data.shuffle_buffer=16", "optim.ema_decay=0", "train.ckpt_every=5", "train.log_every=1", "train.sample_every=1000"]
# Stage II on top of it: 256x256, so even narrower and only a few steps.
TINY2 = ["model.gf_dim=16", "model.df_dim=4", "model.r_num=1", "data.batch_size=2",
         "data.shuffle_buffer=8", "optim.ema_decay=0", "train.ckpt_every=5", "train.log_every=1", "train.sample_every=1000"]


def _cluster_problem() -> str:
    """Why the cluster cannot be used ('' when it can)."""
    for tool in ("sbatch", "squeue", "sacct", "scontrol", "sinfo"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        if "UP" not in ping.stdout:
            return f"slurmctld not answering ({ping.stdout.strip() or ping.stderr.strip()})"
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
        usable = [l for l in nodes.stdout.splitlines() if l.split()[1].rstrip("*~#") in
                  ("idle", "mixed", "allocated", "completing")]
        if len(usable) < 2:
            return f"need 2 usable nodes, sinfo says: {nodes.stdout.strip()!r}"
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=20)
        if acct.returncode != 0:
            return f"accounting (sacct) not working: {acct.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Slurm commands fail: {e}"
    return ""


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The local 2-node cluster: skip (or fail under STACKGAN_REQUIRE_SLURM=1) without it."""
    ours = Path(os.environ.get("STACKGAN_SLURM_HOME", "/var/lib/stackgan-slurm")) / "etc" / "slurm.conf"
    if "SLURM_CONF" not in os.environ and ours.is_file():
        os.environ["SLURM_CONF"] = str(ours)  # tests/slurm/cluster.sh's cluster, even without /etc/slurm
    problem = _cluster_problem()
    if problem:
        msg = f"no usable Slurm cluster: {problem}; start one with `sudo bash tests/slurm/cluster.sh start`"
        if os.environ.get("STACKGAN_REQUIRE_SLURM") == "1":
            pytest.fail(msg + " (STACKGAN_REQUIRE_SLURM=1)")
        pytest.skip(msg)


def job_state(job_id: str) -> dict[str, str]:
    """sacct's view of one job (or array task): state, exit code, node list, reason."""
    from stackgan.cluster.submit import sacct_info

    return sacct_info([job_id]).get(job_id, {})


def wait_job(job_id: str, timeout: float, poll: float = 1.0) -> dict[str, str]:
    """Until the job is in a final state; fail with its log tail on time-out."""
    from stackgan.cluster.submit import wait_jobs

    try:
        return wait_jobs([job_id], poll_s=poll, timeout_s=timeout)[job_id]
    except TimeoutError:
        subprocess.run(["scancel", job_id])
        raise


def wait_until(cond, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def train_steps(run_dir: Path) -> list[int]:
    """Step of every training record in log.jsonl, in file order (log_every=1)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss_d" in rec:
            out.append(rec["step"])
    return out


def resumed_from(log_text: str) -> list[int]:
    """Steps the trainer resumed from, in order (its "resumed from <ckpt> at step N" lines)."""
    return [int(m) for m in re.findall(r"resumed from \S+ at step (\d+)", log_text)]


def check_resumed_sequence(steps: list[int], total: int, ckpt_every: int, resumes: list[int]) -> int:
    """Steps 1..total all logged; every restart resumed from a checkpoint at or after the
    newest periodic one before it stopped (nothing lost, nothing repeated beyond it).

    ``steps``: log.jsonl's training records in file order (log_every=1); ``resumes``: the steps
    the restarts resumed from. Returns how many steps were trained twice.
    """
    assert steps, "no training records in log.jsonl"
    assert steps[0] == 1 and steps[-1] == total, f"run went {steps[0]}..{steps[-1]}, expected 1..{total}"
    missing = sorted(set(range(1, total + 1)) - set(steps))
    assert not missing, f"steps never logged: {missing}"
    # a restart that resumed exactly where the run stopped leaves no trace in the step sequence;
    # one that resumed from an older checkpoint shows as a jump back to that checkpoint's step
    unexplained = list(resumes)
    for prev, nxt in zip(steps, steps[1:]):
        if nxt == prev + 1:
            continue
        resumed = nxt - 1
        assert resumed < prev, f"steps {prev + 1}..{resumed} lost across a restart"
        assert resumed in unexplained, f"log jumps back from step {prev} to {nxt}, but no resume from step {resumed}"
        unexplained.remove(resumed)
        newest_periodic = prev // ckpt_every * ckpt_every
        assert resumed >= newest_periodic, (
            f"resumed from step {resumed}, older than the checkpoint at step {newest_periodic}")
    return len(steps) - total
