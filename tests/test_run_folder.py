"""A run folder holds one experiment: resume rules, config history, retention, completion markers,
metric snapshots checked before step 0 and survived when they fail. Real tiny runs of
``python -m stackgan.train`` on real shards, with the configs' own defaults where they matter."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from stackgan import checkpoint as ckpt
from stackgan.cluster.jobs import make_train_job

from .conftest import ROOT, run_cmd
from .test_train import log_records, train_args


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "config-history.jsonl").read_text().splitlines()]


def steps_trained(run: Path) -> list[int]:
    return [r["step"] for r in log_records(run) if "loss_d" in r]


def test_resume_refuses_another_experiment_and_keeps_every_config(tiny_shards, tmp_path):
    run = tmp_path / "run"
    first = ["train.ckpt_every=1", "train.log_every=1", "train.keep_last=2", "train.keep_every=3"]
    p = run_cmd(train_args(tiny_shards, run, "train.steps=6", *first))
    assert p.returncode == 0, p.stderr[-3000:]
    # retention: the newest train.keep_last=2, plus the milestones (multiples of train.keep_every=3)
    assert [ckpt.step_of(c) for c in ckpt.list_complete(run)] == [3, 5, 6]
    lr = yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr_g"]

    # another learning rate in the same run folder: refused before any step, both values named
    p = run_cmd(train_args(tiny_shards, run, "train.steps=8", *first, f"optim.lr_g={lr * 2}"))
    assert p.returncode == 2, p.stderr[-3000:]
    assert "optim.lr_g" in p.stderr and repr(lr) in p.stderr and repr(lr * 2) in p.stderr, p.stderr
    assert "--resume force" in p.stderr and "train.steps" not in p.stderr  # steps may change: not listed
    assert steps_trained(run) == [1, 2, 3, 4, 5, 6] and ckpt.step_of(ckpt.latest(run)) == 6

    # more steps: continues (an allowed change, logged and recorded with the step it took effect)
    p = run_cmd(train_args(tiny_shards, run, "train.steps=8", *first))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "train.steps 6 -> 8" in p.stdout
    assert steps_trained(run) == list(range(1, 9))
    h = history(run)
    assert [(r["step"], r["forced"]) for r in h] == [(0, False), (6, False)]
    assert h[1]["changes"] == {"train.steps": [6, 8]} and h[1]["config"]["train"]["steps"] == 8
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 6  # the first config stays

    # --resume force: continues with the new value, and says so in the log and the history
    p = run_cmd(train_args(tiny_shards, run, "train.steps=9", *first, f"optim.lr_g={lr * 2}",
                           "--resume", "force"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "(--resume force)" in p.stdout and "optim.lr_g" in p.stdout
    h = history(run)[-1]
    assert h["step"] == 8 and h["forced"] and h["changes"]["optim.lr_g"] == [lr, lr * 2]
    lr_logged = [r["lr_g"] for r in log_records(run) if "loss_d" in r]
    assert lr_logged[-1] == lr * 2 and lr_logged[-2] == lr
    state = torch.load(ckpt.latest(run) / "state.pt", map_location="cpu", weights_only=False)
    assert state["config"]["optim"]["lr_g"] == lr * 2  # the next resume compares with the forced config


def test_time_limit_is_not_complete_and_stage2_refuses_it(tiny_shards, tiny_stage1_run, tmp_path,
                                                          monkeypatch):
    s1 = tmp_path / "s1"
    shutil.copytree(tiny_stage1_run, s1)  # a finished 2-step run (train.steps=2, train.ckpt_every=2)
    assert (s1 / "COMPLETE").is_file()
    # extended with a time limit that runs out at once: COMPLETE goes, TIME_LIMIT marks the stop
    p = run_cmd(train_args(tiny_shards, s1, "train.steps=100000", "train.time_limit_min=0.0001",
                           "train.ckpt_every=1000"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (s1 / "COMPLETE").exists()
    marker = json.loads((s1 / "TIME_LIMIT").read_text())
    assert marker["planned_steps"] == 100000 and 2 < marker["step"] < 100000
    assert ckpt.step_of(ckpt.latest(s1)) == marker["step"]
    assert [r for r in log_records(s1) if r.get("event") == "time_limit"][-1]["step"] == marker["step"]
    export = s1 / "export" / "generator.safetensors"
    assert export.is_file()

    # slurm/stage2.sh's check (python -m stackgan.cluster resolve) and the submitit chain's stage II job
    s2 = [f"data.shards={tiny_shards}", f"train.run_dir={tmp_path / 's2'}", f"model.stage1_export={export}"]
    resolve = [sys.executable, "-m", "stackgan.cluster", "resolve", "--config", "configs/birds_stage2.yaml",
               *s2]
    p = run_cmd(resolve)
    assert p.returncode == 2 and "stopped by its time limit" in p.stderr, p.stderr
    assert f"at step {marker['step']} of 100000" in p.stderr
    assert "STACKGAN_ALLOW_INCOMPLETE_STAGE1=1" in p.stderr
    p = run_cmd(resolve, env={"STACKGAN_ALLOW_INCOMPLETE_STAGE1": "1"})
    assert p.returncode == 0, p.stderr
    monkeypatch.chdir(ROOT)  # the job changes to its folder and sets these: restored after the test
    for var in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(var, os.environ.get(var, "1" if var == "OMP_NUM_THREADS" else "false"))
    job = make_train_job("configs/birds_stage2.yaml", [*s2, "train.steps=1"], need_stage1_export=False)
    try:
        job()
        raise AssertionError("the chain's stage II started from a time-limited stage I")
    except Exception as e:  # noqa: BLE001 - the job's own error, as submitit would report it
        assert "stopped by its time limit" in str(e), e
    assert not (tmp_path / "s2" / "checkpoints").exists()


def test_metrics_checked_before_step_0_and_a_failing_metric_is_survived(tiny_shards, tmp_path):
    run = tmp_path / "m"
    p = run_cmd(train_args(tiny_shards, run, "train.steps=2", "train.metrics=fid"))
    assert p.returncode == 2 and "train.metrics=fid" in p.stderr and "train.inception" in p.stderr, p.stderr
    assert not (run / "log.jsonl").exists() and not (run / "checkpoints").exists()
    p = run_cmd(train_args(tiny_shards, run, "train.steps=2", "train.metrics=fid",
                           f"train.inception={tmp_path / 'nowhere.pth'}"))
    assert p.returncode == 2 and "nowhere.pth" in p.stderr, p.stderr

    # weights that exist but are not Inception's: found out at the first snapshot; the run goes on
    bad = tmp_path / "not_inception.pth"
    torch.save({"w": torch.zeros(3)}, bad)
    p = run_cmd(train_args(tiny_shards, run, "train.steps=4", "train.metrics=diversity,inception_score",
                           f"train.inception={bad}", "train.metrics_every=2", "train.metrics_samples=10",
                           "train.log_every=1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run / "COMPLETE").is_file() and steps_trained(run) == [1, 2, 3, 4]
    snaps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in snaps] == [2, 4] and all(str(bad) in s["error"] for s in snaps), snaps
    assert "failed at step 2" in p.stdout and "training goes on" in p.stdout
