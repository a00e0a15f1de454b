"""The benchmark's peak: every dense kernel measured, the best one is the denominator, and a
step faster than it is marked "peak understated" instead of a share above 100%."""
from __future__ import annotations

import torch

from stackgan.bench.report import derive, format_tables, peaks
from stackgan.bench.workers import peak_precisions, run_peak

KERNELS = {"matmul", "conv1x1_cl", "conv3x3_cl"}


def test_peak_part_measures_every_kernel_and_the_best_is_the_peak():
    spec = {"device": "cpu", "matmul_n": 256, "conv_batch": 2, "conv_reps": 1, "conv_scale": 8}
    res = run_peak(spec)
    assert set(res["kernels"]) == set(peak_precisions(torch.device("cpu")))
    for prec, kernels in res["kernels"].items():
        assert set(kernels) == KERNELS
        assert all(v["gflops"] > 0 and v["shape"] for v in kernels.values())
    report = {"peak": res, "cases": []}
    best = peaks(report)
    for prec, kernels in res["kernels"].items():
        top = max(kernels, key=lambda k: kernels[k]["gflops"])
        assert best[prec] == {"gflops": kernels[top]["gflops"], "kernel": top}


def _report(step_gflops: float) -> dict:
    """A run whose peak part measured 100 GFLOP/s at best, and one case whose step did
    ``step_gflops`` (1 GFLOP per iteration)."""
    kernels = {"matmul": {"gflops": 40.0, "shape": "4096^2"}, "conv1x1_cl": {"gflops": 100.0, "shape": "x"},
               "conv3x3_cl": {"gflops": 90.0, "shape": "y"}}
    case = {"part": "stage1", "name": "official-s1-b64", "precision": "fp32",
            "case": {"size": "official", "stage": 1},
            "matmul_gflops": 35.0, "matmul_gflops_end": 38.0,
            "runners": {"original": {"flops": 2e9, "s_per_iter": 1.0, "img_per_s": 64.0},
                        "ours": {"flops": 1e9, "s_per_iter": 1.0 / step_gflops, "img_per_s": 64.0,
                                 "vs_original": 0.4}}}
    return {"machine": {"cpus": 2, "torch": torch.__version__}, "load_start": [0.0], "load_end": [0.0],
            "peak": {"kernels": {"fp32": kernels}, "conv": [], "theoretical": {}}, "cases": [case]}


def test_a_step_within_the_peak_gets_its_share():
    rep = _report(step_gflops=75.0)
    derive(rep)
    assert rep["peak_gflops"]["fp32"] == {"gflops": 100.0, "kernel": "conv1x1_cl"}  # not the slow matmul
    ours = rep["cases"][0]["runners"]["ours"]
    assert abs(ours["frac_peak"] - 0.75) < 1e-9 and not ours["peak_understated"]
    (target,) = [t for t in rep["targets"] if t["step"] == "ours"]
    assert target["ok_peak"] and target["ok_time"]


def test_a_step_above_the_peak_is_marked_peak_understated_never_above_100_percent():
    rep = _report(step_gflops=130.0)
    derive(rep)
    ours = rep["cases"][0]["runners"]["ours"]
    assert ours["frac_peak"] is None and ours["peak_understated"]
    (target,) = [t for t in rep["targets"] if t["step"] == "ours"]
    assert target["peak_understated"] and not target["ok_peak"]
    text = format_tables(rep)
    assert "peak understated" in text and "130%" not in text
    row = [line for line in text.splitlines() if line.startswith("| official-s1-b64 | fp32 | ours |")]
    assert row and "peak understated" in row[0]
