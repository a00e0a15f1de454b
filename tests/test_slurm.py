"""slurm/*.sh on a real 2-node Slurm cluster (tests/slurm/cluster.sh start; root, Debian 12).

One stage-I job on 2 nodes (one task per node, a fake GPU each, the config's loader worker per
task) is interrupted twice while it trains: first the way a time limit does it (USR1 to the
tasks: the trainer checkpoints and exits 3, the batch script requeues the job), then with
`scontrol requeue` (SIGTERM to every process of the job, loader workers included; Slurm
requeues). The tests check that it finished with both ranks, left its outputs and logs where
docs/clusters.md says, and lost or repeated no step. A second job, with 2 loader workers per
task, takes the batch-shell path (``--signal=B:USR1``) and then a requeue, each checkpointed at
the step the signal reached.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest_slurm import (ROOT, TINY, check_resumed_sequence, resumed_from, slurm_cluster,  # noqa: F401
                                  train_steps, wait_job, wait_until)

pytestmark = pytest.mark.slurm

STEPS = 30
# what a user would add to the script's defaults on a CPU-only 2-node test cluster
SBATCH_2NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10"]


def sbatch(args: list[str]) -> str:
    p = subprocess.run(["sbatch", "--parsable", *args], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def slurm_log(job_name: str, job_id: str) -> Path:
    return ROOT / "slurm" / "logs" / f"{job_name}-{job_id}.out"


@pytest.fixture(scope="module")
def interrupted_run(slurm_cluster, tiny_shards, tmp_path_factory):  # noqa: F811
    """Submit stage1.sh, interrupt it twice mid-training, wait for the end."""
    run = tmp_path_factory.mktemp("slurm") / "stage1"
    job = sbatch([*SBATCH_2NODES, "slurm/stage1.sh", f"data.shards={tiny_shards}", f"train.run_dir={run}",
                  f"train.steps={STEPS}", *TINY])
    log = slurm_log("stackgan-s1", job)
    try:
        # 1. the time-limit path: USR1 to the job's tasks (what --signal=USR1@300 sends)
        wait_until(lambda: max(train_steps(run), default=0) >= 7, 240, "step 7")
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        usr1_step = wait_until(lambda: _usr1_step(log), 120, "the checkpoint on USR1")
        wait_until(lambda: "resumed from" in log.read_text() and max(train_steps(run)) >= usr1_step + 3, 240,
                   "the requeued job to train again")
        # 2. an external requeue (SIGTERM to every process of the job)
        subprocess.run(["scontrol", "requeue", job], check=True)
        final = wait_job(job, timeout=300)
        yield {"job": job, "run": run, "log": log, "final": final, "usr1_step": usr1_step}
    finally:
        subprocess.run(["scancel", job])
        log.unlink(missing_ok=True)


def _usr1_step(log: Path) -> int:
    """The step of the trainer's checkpoint on USR1, from the job log (0 until it is there)."""
    m = re.search(r"signal SIGUSR1: checkpoint \S+ saved at step (\d+)", log.read_text() if log.is_file() else "")
    return int(m.group(1)) if m else 0


def _history(run: Path) -> str:
    p = run / "slurm-history.log"
    return p.read_text() if p.is_file() else ""


def test_stage1_on_two_nodes_finishes_with_outputs_where_documented(interrupted_run):
    r = interrupted_run
    run, log = r["run"], r["log"]
    text = log.read_text()
    assert r["final"]["state"] == "COMPLETED", f"{r['final']}\n{text[-3000:]}"
    assert set(r["final"]["nodes"].replace("node[1-2]", "node1,node2").split(",")) == {"node1", "node2"}
    # both ranks took part: the trainer's own records say world size 2
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {rec["world_size"] for rec in recs if "world_size" in rec} == {2}
    assert "world size 2" in text and "rendezvous node1:" in text
    # outputs: the run folder layout of docs/clusters.md
    assert (run / "COMPLETE").is_file() and json.loads((run / "COMPLETE").read_text())["step"] == STEPS
    assert all((run / "export" / f).is_file() for f in ("generator.safetensors", "generator.json"))
    assert (run / "config.yaml").is_file() and (run / "tb").is_dir()
    assert list((run / "samples").glob("*.png"))
    assert list((run / "checkpoints").glob("step-*"))
    # logs: one Slurm log (appended across restarts), one history line per event in the run folder
    assert text.count("stage 1, run folder") == 3, text[-3000:]
    hist = _history(run).splitlines()
    assert [re.search(r"restart=(\d+)", h).group(1) for h in hist if " start " in h] == ["0", "1", "2"]
    assert all(f"log={log}" in h for h in hist), hist
    assert hist[-1].endswith("finished")


def test_requeued_run_resumes_without_losing_or_repeating_steps(interrupted_run):
    r = interrupted_run
    run, text = r["run"], r["log"].read_text()
    hist = _history(run)
    # the USR1 path: trainer checkpointed and exited 3, the batch script requeued the job
    assert "checkpointed; requeue" in hist, hist
    assert "signal SIGUSR1: checkpoint" in text and "exiting with status 3" in text
    # the scontrol-requeue path: Slurm ended the job; the batch script did not requeue it again
    assert "DUE TO JOB REQUEUE" in text
    assert "ERROR" not in text, text[-3000:]
    resumes = resumed_from(text)
    assert len(resumes) == 2, resumes
    # a checkpoint on USR1 is taken at the step where the trainer stopped
    assert resumes[0] == r["usr1_step"]
    assert f"resumed from {run}/checkpoints/step-{resumes[0]:08d} at step {resumes[0]}" in text
    # and on SIGTERM too, which also reached the config's loader worker of each rank
    assert "data: 1 loader worker(s) per process" in text and "DataLoader worker" not in text
    assert [sig for sig, _ in _stops(text)] == ["SIGUSR1", "SIGTERM"] and resumes[1] == _stops(text)[1][1]
    assert check_resumed_sequence(train_steps(run), STEPS, ckpt_every=5, resumes=resumes) == 0


def _stops(log_text: str) -> list[tuple[str, int]]:
    """(signal, step) of every checkpoint the trainers took on a stop signal, in order."""
    return [(sig, int(step)) for sig, step in
            re.findall(r"signal (SIG\w+): checkpoint \S+ saved at step (\d+)", log_text)]


def test_batch_shell_signal_and_requeue_with_two_loader_workers(
        slurm_cluster, tiny_shards, tmp_path):  # noqa: F811
    """``--signal=B:USR1`` reaches only the batch shell, which passes it on to the trainers; then
    ``scontrol requeue``. Each time: a checkpoint at the step the signal reached, status 3, the
    history says "checkpointed", and the resumed run neither loses nor repeats a step."""
    run = tmp_path / "w2"
    job = sbatch([*SBATCH_2NODES, "slurm/stage1.sh", f"data.shards={tiny_shards}", f"train.run_dir={run}",
                  f"train.steps={STEPS}", *TINY, "data.num_workers=2"])
    log = slurm_log("stackgan-s1", job)
    try:
        wait_until(lambda: max(train_steps(run), default=0) >= 5, 240, "step 5")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        wait_until(lambda: _stops(log.read_text()), 120, "the checkpoint on the batch shell's USR1")
        first = _stops(log.read_text())[0][1]
        wait_until(lambda: len(resumed_from(log.read_text())) == 1 and max(train_steps(run)) >= first + 3,
                   240, "the requeued job to train")
        subprocess.run(["scontrol", "requeue", job], check=True)
        final = wait_job(job, timeout=300)
        text = log.read_text()
    finally:
        subprocess.run(["scancel", job])
        log.unlink(missing_ok=True)
    assert final["state"] == "COMPLETED", f"{final}\n{text[-3000:]}"
    assert "batch shell got SIGUSR1: passing it to the trainers" in text
    assert "data: 2 loader worker(s) per process" in text and "DataLoader worker" not in text, text[-3000:]
    assert "ERROR" not in text and text.count("exiting with status 3") == 4, text[-3000:]  # 2 ranks x 2 stops
    stops = _stops(text)
    assert [sig for sig, _ in stops] == ["SIGUSR1", "SIGTERM"], stops
    resumes = resumed_from(text)
    assert resumes == [step for _, step in stops], (resumes, stops)
    assert check_resumed_sequence(train_steps(run), STEPS, ckpt_every=5, resumes=resumes) == 0
    hist = _history(run)
    assert "checkpointed; requeue" in hist and "checkpointed; job is" in hist, hist
    assert hist.splitlines()[-1].endswith("finished") and (run / "COMPLETE").is_file()


def test_stage2_script_refuses_a_missing_stage1_export_before_starting(slurm_cluster, tiny_shards, tmp_path):  # noqa: F811
    missing = tmp_path / "no-stage1" / "export" / "generator.pt"
    job = sbatch(["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=5",
                  "slurm/stage2.sh", f"data.shards={tiny_shards}", f"train.run_dir={tmp_path / 's2'}",
                  f"model.stage1_export={missing}"])
    log = slurm_log("stackgan-s2", job)
    try:
        final = wait_job(job, timeout=120)
        text = log.read_text()
        assert final["state"] == "FAILED" and final["exit_code"] == "2:0", (final, text)
        assert f"model.stage1_export={missing}: file not found" in text
        assert "srun" not in text and not (tmp_path / "s2").exists()  # no rank was started
    finally:
        log.unlink(missing_ok=True)
