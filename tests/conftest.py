"""Shared fixtures: a tiny embedded bird set, prepared into real shards once per session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads made
# small CPU networks 10-30x slower (must be set before torch is loaded; subprocesses inherit it)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_cmd(args: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command from the repo root; show its output when it fails."""
    env = {**os.environ, **kw.pop("env", {})}
    p = subprocess.run(args, cwd=kw.pop("cwd", ROOT), env=env, capture_output=True, text=True, **kw)
    return p


@pytest.fixture(scope="module", autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state (mixed precision, device) in a process-wide singleton: a test
    module that made an fp16 Accelerator would make the next module's plain one fail. Each
    module starts with none (within a module, tests that change precision reset it themselves)."""
    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for tests of small CPU networks (fast and deterministic under load)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_birds(tmp_path_factory) -> Path:
    """A 6-species x 6-image embedded set in the real CUB + StackGAN layout."""
    out = tmp_path_factory.mktemp("birds") / "set"
    p = run_cmd([sys.executable, "-m", "stackgan.data.birds", "--out", str(out), "--species", "6",
                 "--images-per-species", "6", "--seed", "0"])
    assert p.returncode == 0, p.stdout + p.stderr
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_birds, tmp_path_factory) -> Path:
    """The tiny set packed into webdataset shards (train + test) by shards/prepare.py."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    p = run_cmd([sys.executable, "shards/prepare.py", "--cub-root", str(tiny_birds / "CUB_200_2011"),
                 "--birds-root", str(tiny_birds / "birds"), "--out", str(out), "--shard-size", "8",
                 "--workers", "1"])
    assert p.returncode == 0, p.stdout + p.stderr
    return out


@pytest.fixture(scope="session")
def tiny_stage1_run(tiny_shards, tmp_path_factory) -> Path:
    """A finished 2-step stage-I run of tests/test_train.py's TINY networks on the tiny shards
    (checkpoint and export at step 2), made once per session: tests that change it copy it."""
    from .test_train import train_args

    run = tmp_path_factory.mktemp("stage1") / "run"
    p = run_cmd(train_args(tiny_shards, run, "train.steps=2", "train.ckpt_every=2"))
    assert p.returncode == 0, p.stderr[-3000:]
    return run
