"""jobs/*.py and stackgan/cluster/: submitit chains, preemption, sweeps.

The tests marked slurm run on the local 2-node cluster (tests/slurm/cluster.sh); the others
(dry runs, input checks) need no Slurm.
"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stackgan.cluster.plans import parse_grid, plan_chain, point_name
from stackgan.cluster.settings import load_cluster_config
from stackgan.cluster.submit import sacct_info, submit_plan, wait_jobs
from stackgan.config import ConfigError, load_config
from tests.conftest_slurm import (ROOT, TINY, TINY2, check_resumed_sequence, resumed_from,  # noqa: F401
                                  slurm_cluster, train_steps, wait_until)


@pytest.fixture
def cluster_yaml(tmp_path) -> Path:
    """The launchers' cluster config, sized for the 2-core test cluster (fake GPUs)."""
    cfg = {
        "folder": str(tmp_path / "submitit" / "%j"),
        "max_num_timeout": 5,  # timeout_min <= 10: submitit counts a preemption as a time-out
        "stop_grace_s": 30,
        "poll_s": 2,
        "signal_delay_s": 30,
        "train": {"nodes": 2, "gpus_per_node": 1, "cpus_per_task": 1, "timeout_min": 10},
        "summary": {"nodes": 1, "cpus_per_task": 1, "timeout_min": 5},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launcher(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"jobs/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def sacct_times(job_id: str) -> tuple[str, str]:
    out = subprocess.run(["sacct", "-X", "-P", "-n", "-o", "Start,End", "-j", job_id], capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    start, end = out.split("|")
    return start, end


# ------------------------------------------------------------------------------ no Slurm needed
def test_shipped_cluster_config_loads():
    cc = load_cluster_config(ROOT / "jobs" / "cluster.yaml")
    assert cc.train.ntasks_per_node() == cc.train.gpus_per_node and cc.folder == "slurm/logs/submitit/%j"


def test_cluster_config_refuses_unknown_keys(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  gpus: 4\n")
    with pytest.raises(ConfigError, match="train.gpus"):
        load_cluster_config(bad)
    with pytest.raises(ConfigError, match="cluster override 'train.nodez=2'.*train.nodez"):
        load_cluster_config(ROOT / "jobs" / "cluster.yaml", ["train.nodez=2"])
    with pytest.raises(ConfigError, match="train.nodes"):
        load_cluster_config(ROOT / "jobs" / "cluster.yaml", ["train.nodes=two"])
    cc = load_cluster_config(ROOT / "jobs" / "cluster.yaml", ["train.nodes=3", "partition=gpu"])
    assert (cc.train.nodes, cc.partition) == (3, "gpu")


def test_grid_parsing_and_point_names():
    grid = parse_grid(["optim.lr_g=1e-4, 2e-4", "model.gf_dim=32,64"])
    assert grid == {"optim.lr_g": ["1e-4", "2e-4"], "model.gf_dim": ["32", "64"]}
    assert point_name(3, {"optim.lr_g": "2e-4", "data.shards": "a/b"}) == "03-lr_g=2e-4-shards=a_b"
    for bad in (["optim.lr_g"], ["optim.lr_g="], ["a=1", "a=2"]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_chain_dry_run_prints_both_stages_and_submits_nothing(tiny_shards, tmp_path):
    p = launcher("train_chain.py", "--dry-run", "--set", f"data.shards={tiny_shards}",
                 "--stage1-set", f"train.run_dir={tmp_path / 's1'}", "--stage2-set", f"train.run_dir={tmp_path / 's2'}")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "== stage1: job" in out and "== stage2: job, starts afterok 'stage1'" in out
    assert f"model.stage1_export={tmp_path / 's1'}/export/generator.safetensors" in out
    assert "gpus_per_node: 4" in out and "dry run: nothing submitted" in out
    assert not (tmp_path / "s1").exists()


def test_launchers_refuse_bad_input_before_submitting(tiny_shards, tmp_path):
    p = launcher("train_chain.py", "--set", f"data.shards={tiny_shards}", "--stage1-set", "optim.lr_gg=1")
    assert p.returncode == 2 and "optim.lr_gg" in p.stderr and "submitted" not in p.stdout
    p = launcher("sweep.py", "--grid", "optim.lr_g=1e-4,-1", "--set", f"data.shards={tiny_shards}",
                 "--sweep-dir", str(tmp_path / "sw"), "--dry-run")
    assert p.returncode == 2 and "sweep point 01-lr_g=-1" in p.stderr and "optim.lr_g must be > 0" in p.stderr
    p = launcher("sweep.py", "--grid", "optim.lr_g=1e-4", "--set", f"data.shards={tmp_path / 'none'}", "--dry-run")
    assert p.returncode == 2 and "metadata.json" in p.stderr


def test_sweep_dry_run_lists_every_point(tiny_shards, tmp_path):
    p = launcher("sweep.py", "--dry-run", "--grid", "optim.lr_g=1e-4,2e-4", "--grid", "model.gf_dim=16,32",
                 "--set", f"data.shards={tiny_shards}", "--sweep-dir", str(tmp_path / "sw"))
    assert p.returncode == 0, p.stderr
    assert "== points: job array of 4" in p.stdout and "starts afterany 'points'" in p.stdout
    for name in ("00-lr_g=1e-4-gf_dim=16", "03-lr_g=2e-4-gf_dim=32"):
        assert f"train.run_dir={tmp_path / 'sw' / name}" in p.stdout
    assert not (tmp_path / "sw").exists()


# ------------------------------------------------------------------------------ on the cluster
@pytest.mark.slurm
def test_chain_runs_stage2_after_a_preempted_stage1(slurm_cluster, tiny_shards, tmp_path, cluster_yaml):  # noqa: F811
    """Stage I is preempted mid-training (submitit's interruption), requeues itself through
    checkpoint(), resumes and finishes; only then stage II starts, on stage I's export."""
    cc = load_cluster_config(cluster_yaml)
    # 60 steps: the 9 left after step 7 once took under a second, less than the interruption
    # needs to arrive, and the job finished before it was preempted
    s1, s2, steps1 = tmp_path / "s1", tmp_path / "s2", 60
    plan = plan_chain(cc, "configs/birds_stage1.yaml", "configs/birds_stage2.yaml",
                      [f"data.shards={tiny_shards}", f"train.run_dir={s1}", f"train.steps={steps1}", *TINY],
                      [f"data.shards={tiny_shards}", f"train.run_dir={s2}", "train.steps=2", *TINY2])
    jobs = submit_plan(cc, plan)
    j1, j2 = jobs["stage1"][0], jobs["stage2"][0]
    try:
        wait_until(lambda: max(train_steps(s1), default=0) >= 7, 240, "stage I at step 7")
        assert sacct_info([j2.job_id])[j2.job_id]["state"] == "PENDING"
        j1._interrupt()  # SIGTERM then USR2 to every task, as submitit simulates preemption
        info = wait_jobs([j1.job_id, j2.job_id], poll_s=2, timeout_s=420)
    finally:
        subprocess.run(["scancel", j1.job_id, j2.job_id])
    logs = f"{j1.stdout()}\n{j1.stderr()}\n{j2.stderr()}"
    assert info[j1.job_id]["state"] == "COMPLETED" and info[j2.job_id]["state"] == "COMPLETED", (info, logs[-4000:])
    # stage I: one requeue through submitit, resumed from its checkpoint, right step count
    assert "DUE TO JOB REQUEUE" in j1.stderr() and "triggered an exception" not in j1.stderr(), logs[-4000:]
    resumes = resumed_from(j1.stdout())
    assert len(resumes) == 1, j1.stdout()[-3000:]
    assert check_resumed_sequence(train_steps(s1), steps1, ckpt_every=5, resumes=resumes) <= 5
    assert j1.results()[0]["step"] == steps1 and (s1 / "COMPLETE").is_file()
    # stage II: started after stage I ended, trained on stage I's generator, with 2 ranks
    assert sacct_times(j2.job_id)[0] >= sacct_times(j1.job_id)[1]
    assert load_config(s2 / "config.yaml").model.stage1_export == str(s1 / "export" / "generator.safetensors")
    assert Path(j2.results()[0]["export"]).is_file() and (s2 / "COMPLETE").is_file()
    assert train_steps(s2) == [1, 2]
    assert '"world_size": 2' in (s2 / "log.jsonl").read_text()


@pytest.mark.slurm
def test_chain_with_a_failed_stage1_never_starts_stage2(slurm_cluster, tiny_shards, tmp_path, cluster_yaml):  # noqa: F811
    # an unknown metric passes the launcher's checks but the trainer refuses it before training
    p = launcher("train_chain.py", "--cluster", str(cluster_yaml), "--cluster-set", "train.nodes=1", "--wait",
                 "--set", f"data.shards={tiny_shards}", *TINY,
                 "--stage1-set", f"train.run_dir={tmp_path / 's1'}", "train.metrics=nonsense", "train.steps=3",
                 "--stage2-set", f"train.run_dir={tmp_path / 's2'}", "train.steps=3", timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("stage")}
    assert " FAILED " in rows["stage1"] and "unknown metric" in rows["stage1"], p.stdout
    assert " CANCELLED " in rows["stage2"] and "never started" in rows["stage2"], p.stdout
    assert not (tmp_path / "s2").exists()  # stage II never ran


@pytest.mark.slurm
def test_chain_refuses_stage2_after_a_time_limited_stage1(
        slurm_cluster, tiny_shards, tmp_path, cluster_yaml):  # noqa: F811
    """A stage I stopped by train.time_limit_min ends its job fine but is not COMPLETE: the
    chain's stage II refuses to start from it (STACKGAN_ALLOW_INCOMPLETE_STAGE1=1 would let it)."""
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    p = launcher("train_chain.py", "--cluster", str(cluster_yaml), "--cluster-set", "train.nodes=1", "--wait",
                 "--set", f"data.shards={tiny_shards}", *TINY,
                 "--stage1-set", f"train.run_dir={s1}", "train.steps=100000", "train.time_limit_min=0.05",
                 "--stage2-set", f"train.run_dir={s2}", "train.steps=3", timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("stage")}
    assert " COMPLETED " in rows["stage1"] and " FAILED " in rows["stage2"], p.stdout
    assert "stopped by its time limit" in rows["stage2"], p.stdout
    assert (s1 / "TIME_LIMIT").is_file() and not (s1 / "COMPLETE").exists()
    assert not (s2 / "checkpoints").exists()  # stage II never trained


@pytest.mark.slurm
def test_sweep_runs_a_job_array_and_writes_the_summary(slurm_cluster, tiny_shards, tmp_path, cluster_yaml):  # noqa: F811
    sweep = tmp_path / "sweep"
    p = launcher("sweep.py", "--cluster", str(cluster_yaml), "--cluster-set", "train.nodes=1", "--wait",
                 "--grid", "optim.lr_g=1e-4,5e-4", "--sweep-dir", str(sweep),
                 "--set", f"data.shards={tiny_shards}", "train.steps=6", *TINY, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    names = ["00-lr_g=1e-4", "01-lr_g=5e-4"]
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == names
    for name, lr in zip(names, (1e-4, 5e-4)):
        assert (sweep / name / "COMPLETE").is_file()
        assert load_config(sweep / name / "config.yaml").optim.lr_g == lr
    # one array job for the points, the summary job after it
    ids = [line.split()[1] for line in p.stdout.splitlines() if line.startswith("points[")]
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids)
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["point"] for r in rows] == names
    assert all(r["status"] == "complete" and r["step"] == "6" for r in rows)
    assert [r["optim.lr_g"] for r in rows] == ["1e-4", "5e-4"]
    md = (sweep / "summary.md").read_text()
    assert md.count("\n") == 4 and "| point |" in md and md in p.stdout
