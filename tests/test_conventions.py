"""The conventions defined once (issue 29): the error base class and exit statuses, the Slurm
environment shared by slurm/common.sh and the submitit jobs, atomic writes, the shipped configs,
and the image conventions."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stackgan import errors, images
from stackgan.checkpoint import CheckpointError
from stackgan.cluster.env import master_port
from stackgan.config import ConfigError, image_size, load_config
from stackgan.data.meta import ShardError, load_metadata
from stackgan.export import ExportError
from stackgan.files import atomic_path, atomic_write, config_path
from stackgan.metrics.core import MetricError
from stackgan.monitor import NonFiniteLoss
from stackgan.train import TrainInterrupted

from .conftest import ROOT, run_cmd


@pytest.mark.parametrize("cls", [ConfigError, ShardError, ExportError, CheckpointError, MetricError,
                                 NonFiniteLoss, TrainInterrupted])
def test_every_reported_error_has_one_base_with_an_exit_status(cls):
    assert issubclass(cls, errors.StackGANError)
    assert cls.exit_code in errors.EXIT_CODES.values() and cls.exit_code != errors.EXIT_OK


@pytest.mark.parametrize("module,args", [
    ("stackgan.train", ["--config", "no/such.yaml"]),
    ("stackgan.evaluate", ["--export", "no/such.pt", "--shards", "no/such"]),
    ("stackgan.sample", ["--export", "no/such.pt", "--prompt", "a red bird"]),
    ("stackgan.data.prepare", ["--inspect", "no/such"]),
])
def test_bad_input_is_one_line_and_the_bad_input_status(module, args, tmp_path):
    p = run_cmd([sys.executable, "-m", module, *args], cwd=tmp_path)
    assert p.returncode == errors.EXIT_BAD_INPUT, p.stderr
    assert "Traceback" not in p.stderr and "error: " in p.stderr and "no/such" in p.stderr


def test_slurm_scripts_take_statuses_and_port_from_python(tmp_path):
    """slurm/common.sh's stackgan_setup exports what stackgan.cluster.env computes."""
    env = {**os.environ, "SLURM_JOB_ID": "4711", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)",
           "STACKGAN_ROOT": str(ROOT), "STACKGAN_PYTHON": sys.executable, "STACKGAN_SITE": ""}
    env.pop("STACKGAN_MASTER_PORT", None)
    script = ('source slurm/common.sh; stackgan_setup >/dev/null; echo "$STACKGAN_EXIT_OK '
              '$STACKGAN_EXIT_BAD_INPUT $STACKGAN_EXIT_REQUEUE $STACKGAN_EXIT_NONFINITE $MASTER_PORT '
              '$WORLD_SIZE $LOCAL_WORLD_SIZE"')
    p = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ok, bad, requeue, nonfinite, port, world, local = p.stdout.split()
    assert [int(ok), int(bad), int(requeue), int(nonfinite)] == [
        errors.EXIT_OK, errors.EXIT_BAD_INPUT, errors.EXIT_REQUEUE, errors.EXIT_NONFINITE]
    assert int(port) == master_port("4711", {}) and (world, local) == ("4", "2")
    assert master_port("4711", {}) != master_port("4712", {})  # two jobs on one node: two ports
    assert master_port("4711", {"STACKGAN_MASTER_PORT": "29500"}) == 29500


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["report.json"]
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"


def test_configs_are_found_from_any_folder_and_a_real_path_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("configs/birds_stage1.yaml", "birds_stage1", "birds_stage1.yaml"):
        assert config_path(name).read_text() == (ROOT / "configs" / "birds_stage1.yaml").read_text()
    assert load_config("configs/birds_stage2.yaml").model.stage == 2
    mine = tmp_path / "configs" / "birds_stage1.yaml"
    mine.parent.mkdir()
    mine.write_text("train:\n  seed: 7\n")
    assert load_config("configs/birds_stage1.yaml").train.seed == 7
    with pytest.raises(ConfigError, match="no_such_config"):
        load_config("configs/no_such_config.yaml")


def test_prepared_shards_hold_the_stored_size_of_each_stage(tiny_shards):
    meta = load_metadata(tiny_shards)
    assert sorted(meta.image_sizes) == sorted(images.stored_size(image_size(s)) for s in (1, 2))
    for stored in meta.image_sizes:
        assert images.CROP_OF[stored] < stored


def test_image_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    arr = torch.randint(0, 256, (3, 9, 7, 3), generator=g, dtype=torch.uint8).numpy()
    x = images.from_hwc_uint8(arr)
    assert x.shape == (3, 3, 9, 7) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert np.array_equal(images.to_uint8(x), arr)
    up = images.upsample(x[:, :, :7, :7], 28)
    assert up.shape[-1] == 28 and up.abs().max() <= 1
    assert images.resize(up, 7).shape[-1] == 7
    with pytest.raises(TypeError):
        images.to_unit(x)
