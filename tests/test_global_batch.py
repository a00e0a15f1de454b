"""The global batch (``data.batch_size``, ``data.batch_rule``): a run on K processes keeps the
recipe's global batch, or scales the learning rates by a named rule, and refuses what it cannot
split. The distributed test builds the run the way ``stackgan.train`` does (``build_run``) under
``accelerate launch`` and pulls the batches the training loop would pull, on 1 and on 2 gloo
processes: same steps, same samples per step.

Run as a script (``python tests/test_global_batch.py OUT key=value ...``) it is that driver.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from stackgan.config import ConfigError, load_config, lr_scale, process_batch

if __name__ != "__main__":
    from .conftest import ROOT, run_cmd


def test_rules_split_or_scale():
    cfg = load_config(None, ["data.batch_size=64"])
    assert [process_batch(cfg.data, k) for k in (1, 2, 4, 8)] == [64, 32, 16, 8]
    assert [lr_scale(cfg.data, k) for k in (1, 4)] == [1.0, 1.0]
    with pytest.raises(ConfigError, match=r"data.batch_size=64 .* does not split over 3 processes.*e\.g\. 66"):
        process_batch(cfg.data, 3)
    for rule, want in (("linear", 4.0), ("sqrt", 2.0)):
        cfg = load_config(None, ["data.batch_size=64", f"data.batch_rule={rule}"])
        assert process_batch(cfg.data, 4) == 64 and process_batch(cfg.data, 3) == 64
        assert math.isclose(lr_scale(cfg.data, 4), want)
    with pytest.raises(ConfigError, match="data.batch_rule"):
        load_config(None, ["data.batch_rule=double"])


def test_every_config_states_its_rule():
    """The presets say which global batch they were tuned for, and keep it."""
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.data.batch_rule == "keep_global", path
        text = path.read_text()
        if text.startswith("include:"):  # an old name of another preset
            continue
        assert "global" in text.split("batch_size:", 1)[1].split("\n", 1)[0], f"{path}: batch_size comment"


# --------------------------------------------------------------------------------------
# 1 vs 2 processes
# --------------------------------------------------------------------------------------
STEPS = 5


def _driver(out: str, overrides: list[str]) -> None:
    """Build the run as ``stackgan.train`` does and record what its first steps see."""
    import torch.distributed as dist

    from stackgan.run import build_run
    from stackgan.train import close_process_group

    run = build_run(load_config(ROOT_SCRIPT / "configs/birds_stage1.yaml", overrides), resume="none")
    it = run.stream.iterate(start=0)
    keys = [list(next(it)["key"]) for _ in range(STEPS)]
    it.close()
    lrs = {}
    for step in (0, run.steps_per_epoch, 2 * run.steps_per_epoch):  # lr_decay_epochs=1 halves every epoch
        run.step = step
        run.set_lr()
        lrs[step] = run.opt_g.param_groups[0]["lr"]
    gathered = [None] * run.world
    if run.world > 1:
        dist.all_gather_object(gathered, keys)
    else:
        gathered = [keys]
    if run.main:
        per_step = [[k for rank in gathered for k in rank[s]] for s in range(STEPS)]
        Path(out).write_text(json.dumps({"world": run.world, "n_steps": run.n_steps, "spe": run.steps_per_epoch,
                                         "batch": len(keys[0]), "keys": per_step, "lr": list(lrs.values())}))
    close_process_group()


def _launch(nproc: int, out: Path, shards: Path, run_dir: Path, *extra: str):
    launcher = [sys.executable, "tests/test_global_batch.py"] if nproc == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
        "--main_process_port", "29577", "tests/test_global_batch.py"]
    args = [str(out), f"data.shards={shards}", f"train.run_dir={run_dir}", "model.gf_dim=8", "model.df_dim=8",
            "model.z_dim=8", "model.cond_dim=8", "data.num_workers=0", "data.batch_size=6", "train.steps=0",
            "train.epochs=3", "optim.lr_decay_epochs=1", "optim.ema_decay=0", *extra]
    return run_cmd([*launcher, *args], env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


@pytest.mark.distributed
def test_two_processes_keep_the_global_batch(tiny_shards, tmp_path):
    """Same global batch on 1 and 2 gloo processes: the same number of steps, the same samples in
    every step, the same learning-rate schedule; linear scaling doubles the batch and the rates;
    an indivisible global batch is refused (exit 2) before any model is built."""
    res = {}
    for n in (1, 2):
        p = _launch(n, tmp_path / f"{n}.json", tiny_shards, tmp_path / f"run{n}")
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        res[n] = json.loads((tmp_path / f"{n}.json").read_text())
        assert f"batch: global 6 = {n} x {6 // n}" in p.stdout
    one, two = res[1], res[2]
    assert two["world"] == 2 and two["batch"] == 3 and one["batch"] == 6
    assert one["n_steps"] == two["n_steps"] == 3 * one["spe"] and one["spe"] == two["spe"] > 1
    assert one["keys"] == two["keys"]  # rank 0's half, then rank 1's: the one process's batch, in order
    assert len({k for s in one["keys"] for k in s}) > 6  # the steps differ (not one batch repeated)
    lr = load_config(ROOT / "configs/birds_stage1.yaml").optim.lr_g
    assert one["lr"] == two["lr"] == [lr, lr / 2, lr / 4]

    p = _launch(2, tmp_path / "lin.json", tiny_shards, tmp_path / "lin", "data.batch_rule=linear")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert lin["batch"] == 6 and lin["spe"] == one["spe"] // 2 and lin["lr"] == [2 * lr, lr, lr / 2]

    p = run_cmd(  # the trainer itself: the error, before the run folder gets a checkpoint
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
         "--main_process_port", "29578", "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
         f"data.shards={tiny_shards}", f"train.run_dir={tmp_path / 'bad'}", "data.batch_size=5"],
        env={"OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert "data.batch_size=5 (the global batch; data.batch_rule=keep_global) does not split over 2" in p.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


if __name__ == "__main__":
    ROOT_SCRIPT = Path(__file__).resolve().parents[1]
    _driver(sys.argv[1], sys.argv[2:])
