"""The GPU check script (tests/gpu/check.py): its readers and scheduler, and its CPU smoke
mode end to end, so CI runs the very script a GPU machine will run."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from .gpu import check as gc

from .conftest import run_cmd


def test_log_readers(tmp_path):
    recs = [{"step": 2, "loss_d": 1.0, "loss_g": float("nan"), "img_per_s": 10.0},
            {"step": 4, "loss_d": float("inf"), "img_per_s": 30.0},
            {"step": 6, "img_per_s": 20.0, "loss_r1": 0.5},
            {"step": 6, "event": "finished", "ranks_identical": True}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    read = gc.log_records(tmp_path)
    assert gc.nonfinite_losses(read) == ["2:loss_g", "4:loss_d"]
    assert gc.finished_record(read)["ranks_identical"] is True
    assert gc.median_img_per_s(read, skip=1) == 25.0 and gc.median_img_per_s(read, skip=5) == 20.0
    assert gc.log_records(tmp_path / "missing") == [] and gc.finished_record([]) is None


def test_compare_states_is_bitwise_and_names_what_differs():
    a = {"G": {"w": torch.ones(3)}, "D": {"w": torch.zeros(2)}, "ema": {"model": {"w": torch.ones(1)}},
         "opt_g": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3}]}, "step": 4}
    same = gc.compare_states(a, json_roundtrip(a))
    assert same == {"equal": True, "max_abs_diff": 0.0, "differs": []}
    b = json_roundtrip(a)
    b["G"]["w"] = torch.tensor([1.0, 1.0, 1.5])
    b["step"] = 5
    out = gc.compare_states(a, b)
    assert not out["equal"] and out["differs"][:1] == ["G.w"] and "step" in out["differs"]
    assert math.isinf(out["max_abs_diff"])  # the step differs: no number makes that equal
    b["step"] = 4
    assert gc.compare_states(a, b)["max_abs_diff"] == 0.5
    b["D"] = {"v": torch.zeros(2)}
    assert "D (keys)" in gc.compare_states(a, b)["differs"]


def json_roundtrip(state: dict) -> dict:
    """A deep copy with fresh tensors (what a second checkpoint of the same state loads as)."""
    if isinstance(state, dict):
        return {k: json_roundtrip(v) for k, v in state.items()}
    if torch.is_tensor(state):
        return state.clone()
    if isinstance(state, list):
        return [json_roundtrip(v) for v in state]
    return state


def test_bench_figures_and_targets():
    report = {"peak_gflops": {"bf16": {"gflops": 1000.0, "kernel": "matmul"}},
              "cases": [{"name": "official-s1-b64", "precision": "bf16",
                         "runners": {"ours": {"img_per_s": 900.0, "gflops_per_s": 450.0,
                                              "frac_peak": 0.45}}},
                        {"name": "official-s2-b16", "precision": "bf16",
                         "runners": {"ours": {"img_per_s": 80.0, "gflops_per_s": 300.0, "frac_peak": 0.3}}},
                        {"label": "x", "error": "boom"}],
              "errors": [{"label": "stage2 fp16", "error": "CUDA out of memory"}]}
    fig = gc.bench_figures(report, "cuda")
    assert fig["target_bf16_stage1_b64"] == 0.45 and fig["stage2_b16_bf16"]["img_per_s"] == 80.0
    assert fig["errors"] == ["stage2 fp16: CUDA out of memory"]
    t = gc.targets({"parts": {"bench": fig, "ddp": {"scaling": 0.85}}})
    assert [(x["met"]) for x in t] == [True, False, None] and t[2]["img_per_s"] == 80.0
    assert [x["met"] for x in gc.targets({"parts": {}})] == [None, None, None]


def test_nondeterministic_ops_are_named():
    text = ("UserWarning: upsample_nearest2d_backward_out_cuda does not have a deterministic implementation, "
            "but you set 'torch.use_deterministic_algorithms(True, warn_only=True)'\nother line\n")
    assert gc._nondeterministic_ops(text * 2) == ["upsample_nearest2d_backward_out_cuda"]


def _job(name: str, code: str, timeout: float = 60, after: tuple[str, ...] = ()) -> gc.Job:
    return gc.Job(name, [sys.executable, "-c", code], timeout, after=after)


def test_runner_orders_skips_and_times_out(tmp_path):
    runner = gc.Runner(tmp_path / "logs", time.time() + 120, say=lambda m: None)
    out = runner.run([_job("a", "print('hi')"), _job("b", "raise SystemExit(3)"),
                      _job("c", "print('after a')", after=("a",)), _job("d", "pass", after=("b",)),
                      _job("e", "import time; time.sleep(30)", timeout=1),
                      _job("f", "pass", after=("nowhere",))], parallel=3)
    assert {k: r.status for k, r in out.items()} == {"a": "ok", "b": "failed", "c": "ok", "d": "skipped",
                                                      "e": "failed", "f": "skipped"}
    assert out["b"].rc == 3 and "exit 3" in out["b"].reason and "timed out" in out["e"].reason
    assert "needs b" in out["d"].reason and "hi" in out["a"].tail()
    late = gc.Runner(tmp_path / "logs2", time.time() + 2, say=lambda m: None)
    assert late.run([_job("g", "pass")], 1)["g"].reason == "the check's time budget was used up"


def test_cli_refuses_bad_input(tmp_path):
    p = run_cmd([sys.executable, "-m", "tests.gpu.check", "--shards", str(tmp_path), "--out",
                 str(tmp_path / "x.json")])
    assert p.returncode == 2 and "metadata.json" in p.stderr
    if not torch.cuda.is_available():
        p = run_cmd([sys.executable, "-m", "tests.gpu.check", "--out", str(tmp_path / "x.json")])
        assert p.returncode == 2 and "--smoke" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_smoke_mode_runs_every_part(tiny_shards, tmp_path):
    """The CPU smoke mode: tiny stage I and II in bf16 with exact resume, 2-process gloo
    DDP, the gpu test marker, the quick benchmark; DeepSpeed skipped with its reason."""
    out = tmp_path / "gpucheck.json"
    p = run_cmd([sys.executable, "-m", "tests.gpu.check", "--smoke", "--shards", str(tiny_shards),
                 "--out", str(out), "--jobs", "2"], env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["mode"] == "smoke (CPU)" and rep["failed_parts"] == []
    parts = rep["parts"]
    runs = parts["train"]["runs"]
    assert set(runs) == {"s1-bf16", "s2-bf16"}  # the smoke plan's one precision, both stages
    assert all(r["exact_resume"] and r["straight"]["finished"] for r in runs.values()), runs
    assert parts["ddp"]["world_size"] == 2 and parts["ddp"]["ranks_identical"]
    assert parts["deepspeed"]["status"] == "skipped" and "no CUDA" in parts["deepspeed"]["reason"]
    assert parts["pytest"]["status"] == "ok" and parts["pytest"]["failures"] == 0
    assert parts["bench"]["status"] == "ok" and "tiny-s1-b4 fp32" in parts["bench"]["cases"]
    assert [t["met"] for t in rep["targets"]] == [None, None, None]  # measured on GPUs only
    assert "gpucheck (smoke (CPU)): OK" in p.stdout
    assert Path(rep["work"], "logs", "s1-bf16-resumed.log").is_file()
