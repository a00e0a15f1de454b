"""The precision rule (``train.mixed_precision`` against the launcher's), on its own and through a
real ``accelerate launch``: the launcher's precision is used unless the config sets one, a
conflict is refused with both named, and the precision in force is printed and logged."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from stackgan.backends import base, resolve_precision
from stackgan.backends.base import cpu_has_bf16
from stackgan.config import ConfigError, load_config

from .conftest import ROOT, run_cmd
from .test_train import TINY, log_records

ENV = "ACCELERATE_MIXED_PRECISION"


@pytest.mark.parametrize("configured, launcher, expect", [
    ("auto", None, ("no", "default")),
    ("auto", "no", ("no", "default")),  # accelerate launch exports "no" when nothing names a precision
    ("auto", "bf16", ("bf16", "launcher")),
    ("auto", "FP16", ("fp16", "launcher")),
    ("bf16", None, ("bf16", "config")),
    ("bf16", "no", ("bf16", "config")),
    ("bf16", "bf16", ("bf16", "config")),
    ("no", None, ("no", "config")),
])
def test_the_launcher_decides_only_what_the_config_leaves_open(configured, launcher, expect):
    env = {} if launcher is None else {ENV: launcher}
    p = resolve_precision(configured, env)
    assert (p.value, p.source) == expect


@pytest.mark.parametrize("configured, launcher", [("no", "bf16"), ("fp16", "bf16"), ("bf16", "fp16")])
def test_a_conflict_is_refused_with_both_named(configured, launcher):
    with pytest.raises(ConfigError, match=f"train.mixed_precision={configured}.*sets {launcher}"):
        resolve_precision(configured, {ENV: launcher})


def test_an_unsupported_launcher_precision_is_refused():
    with pytest.raises(ConfigError, match=f"{ENV}=fp8"):
        resolve_precision("auto", {ENV: "fp8"})


def test_the_default_leaves_the_choice_to_the_launcher():
    assert load_config(None, []).train.mixed_precision == "auto"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML: `no` = false


def _launch(shards: Path, run: Path, launcher: list[str], *extra: str, tmp: Path):
    """``accelerate launch <launcher> -m stackgan.train``: one CPU process, no user accelerate config."""
    args = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "stackgan.train",
            "--config", "configs/birds_stage1.yaml", f"data.shards={shards}", f"train.run_dir={run}", *TINY,
            *extra]
    env = {"HF_HOME": str(tmp / "hf"), "OMP_NUM_THREADS": "1"}  # not this machine's default_config.yaml
    return run_cmd(args, env=env, timeout=600)


def test_accelerate_launch_mixed_precision_bf16_trains_in_bf16(tiny_shards, tmp_path):
    run = tmp_path / "run"
    flags = ["--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no",
             "--mixed_precision", "bf16"]
    p = _launch(tiny_shards, run, flags, "train.steps=2", "train.log_every=1", tmp=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "precision bf16 (source: launcher)" in p.stdout, p.stdout[-2000:]
    assert "bf16 (torch autocast" in p.stdout  # the backend's own account
    # emulated bf16 is flagged exactly where it is emulated: a CPU run on a CPU without bf16 units
    emulated = not cpu_has_bf16() and not torch.cuda.is_available()
    assert ("WARNING: mixed_precision=bf16 on a CPU without bf16 units" in p.stdout) == emulated, p.stdout[-2000:]
    start = [r for r in log_records(run) if r.get("event") == "start"]
    assert [(r["precision"], r["precision_source"]) for r in start] == [("bf16", "launcher")]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"


def test_a_launcher_config_file_that_disagrees_is_refused(tiny_shards, tmp_path):
    conf = yaml.safe_load((ROOT / "configs/accelerate/single_gpu.yaml").read_text())
    conf["mixed_precision"] = "bf16"
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(conf))
    run = tmp_path / "run"
    p = _launch(tiny_shards, run, ["--config_file", str(path)], "train.steps=2", "train.mixed_precision=no",
                tmp=tmp_path)
    # the trainer exits 2; accelerate's launcher reports its child's status and exits 1 itself
    assert p.returncode != 0, p.stdout[-2000:]
    assert "returned non-zero exit status 2" in p.stderr, p.stdout[-2000:] + p.stderr[-3000:]
    assert "train.mixed_precision=no" in p.stderr and "the launcher sets bf16" in p.stderr, p.stderr[-2000:]
    assert not (run / "log.jsonl").exists()
    # what the launcher hands its processes, without the launcher in between: exit 2
    p = run_cmd([sys.executable, "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
                 f"data.shards={tiny_shards}", f"train.run_dir={run}", *TINY, "train.mixed_precision=fp16"],
                env={ENV: "bf16"})
    assert p.returncode == 2, p.stderr[-3000:]
    assert "train.mixed_precision=fp16" in p.stderr and "sets bf16" in p.stderr, p.stderr


@pytest.mark.parametrize("flags, slow", [(set(), True), ({"avx512f"}, True), ({"avx512_bf16"}, False),
                                         ({"amx_bf16", "amx_tile"}, False)])
def test_bf16_is_flagged_on_cpus_that_emulate_it(monkeypatch, flags, slow):
    """The quality recipe asks for bf16 (tuned on a CPU with AMX); elsewhere autocast emulates it,
    slower than fp32: the run says so at start. Only bf16, only on CPUs."""
    monkeypatch.setattr(base, "cpu_flags", lambda: flags)
    note = base.slow_bf16_note("bf16", cpu=True)
    assert (note is not None) == slow
    if slow:
        assert "without bf16 units" in note and "train.mixed_precision=no" in note
    assert base.slow_bf16_note("no", cpu=True) is None
    assert base.slow_bf16_note("bf16", cpu=False) is None
