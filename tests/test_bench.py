"""The benchmark: its baseline is the original step (same losses), its rewrite is exact, it runs.

Everything here uses tiny networks; the real figures come from ``python -m stackgan.bench``
(see docs/performance.md).
"""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn as nn

from stackgan.bench.cases import build_models, make_batch, tiny_case
from stackgan.bench.cli import main
from stackgan.bench.measure import CONV_LAYERS
from stackgan.bench.original import OriginalStep, use_plain_upsample
from stackgan.bench.ours import check_original_matches, make_accelerator
from stackgan.bench.plan import MAIN_RUNNERS


@pytest.fixture(scope="module")
def acc():
    return make_accelerator("cpu")


@pytest.mark.parametrize("stage", [1, 2])
def test_original_step_gives_our_losses(acc, stage):
    """Same weights, inputs, CA noise and wrong pairs: the sigmoid + BCELoss original and our
    logits step give the same D, G and KL losses for two steps (the second after both
    optimisers moved), and the same parameters afterwards. The second step's losses see the
    few ~0-gradient weights that Adam moved apart by rounding (below), so they agree to a
    relative 1e-4 (measured 1.2e-5 on this machine's oneDNN kernels), the first to 1e-5."""
    r = check_original_matches(tiny_case(stage), acc, steps=2)
    first, second = r["losses"]
    assert max(abs(a - b) for a, b in zip(first["original"], first["ours"])) < 1e-5, r["losses"]
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(second["original"], second["ours"])), r["losses"]
    # Adam moves a weight by ~lr whatever its gradient's size, so a ~0 gradient whose sign differs
    # by rounding moves it by up to 2 lr: a few percent of a tiny stage II's weights here (1.0% on
    # this machine's oneDNN kernels, < 0.1% on others); a different step would move most of them
    assert r["frac_params_off"] < 0.03
    assert r["max_param_diff"] < 5e-4  # and never by more than ~2 lr
    first = r["losses"][0]["original"]
    assert all(v == v and abs(v) < 1e3 for v in first)  # real numbers, not NaN
    assert r["losses"][0]["original"] != r["losses"][1]["original"]  # the second step saw updated weights


def test_check_detects_a_different_step(acc):
    """The comparison is sensitive: the original's own wrong pairs (features[:-1] with
    cond[1:]) differ from our full-batch shift, and the check sees it."""
    case = tiny_case(1)
    G, D = build_models(case, "cpu")
    orig = OriginalStep(G, D)
    b = make_batch(case, "cpu", seed=3)
    torch.manual_seed(0)
    official = orig.d_loss(b.real, *G(b.emb, b.z)[:2], widx=None)[0].detach()
    torch.manual_seed(0)
    shifted = orig.d_loss(b.real, *G(b.emb, b.z)[:2], widx=b.widx)[0].detach()
    assert abs(float(official) - float(shifted)) > 1e-4


def test_plain_upsample_keeps_the_generator():
    """The original step's G (Upsample + plain conv, sharing the weights) computes what ours
    computes with the transposed-conv up-blocks (stage II: both generators' blocks)."""
    case = tiny_case(2)
    G, _ = build_models(case, "cpu")
    G2, _ = build_models(case, "cpu")
    assert not any(isinstance(m, nn.Upsample) for m in G2.modules())
    assert use_plain_upsample(G2) == 8  # 4 in stage II + 4 in the frozen stage-I G
    assert sum(isinstance(m, nn.Upsample) for m in G2.modules()) == 8
    assert G.state_dict().keys() == G2.state_dict().keys()
    G.eval(), G2.eval()
    emb, z = torch.randn(2, case.text), torch.randn(2, case.z)
    torch.manual_seed(1)
    a = G(emb, z)[0]
    torch.manual_seed(1)
    b = G2(emb, z)[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_options_are_refused(capsys):
    assert main(["--only", "stage1,nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--device", "cuda"]) == 2
        assert "CUDA" in capsys.readouterr().err


def test_quick_run_writes_the_report(tmp_path, capsys):
    """The whole pipeline on tiny networks: workers, interleaved timing, FLOPs, fp32 and
    bf16 (the same precision loop the CUDA mode runs), 1 vs 2 DDP processes, JSON + table."""
    out = tmp_path / "b.json"
    rc = main(["--quick", "--only", "peak,stage1,bf16,procs", "--out", str(out)])
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rc == 0, rep["errors"]
    assert rep["machine"]["torch"] == torch.__version__ and rep["load_start"]
    assert rep["peak"]["kernels"]["fp32"]["matmul"]["gflops"] > 0 and rep["peak_gflops"]["fp32"]["gflops"] > 0
    assert {r["layer"] for r in rep["peak"]["conv"]} == {c[0] for c in CONV_LAYERS}
    cases = {(c["name"], c["precision"]): c for c in rep["cases"]}
    assert set(cases) == {("tiny-s1-b4", "fp32"), ("tiny-s1-b4", "bf16")}
    for c in cases.values():
        runners = c["runners"]
        assert set(runners) == set(MAIN_RUNNERS)
        for name, r in runners.items():
            assert r["s_per_iter"] > 0 and r["img_per_s"] > 0 and r["flops"] > 0
            assert r["gflops_per_s"] > 0
            prec = "fp32" if name == "original" else c["precision"]
            if prec not in rep["peak_gflops"]:  # bf16 on a CPU without bf16 units: no peak of its own
                assert r["frac_peak"] is None and not r["peak_understated"]
            else:
                assert r["peak_understated"] or 0 < r["frac_peak"] <= 1
            assert r["peak_mem_mb"] > 50
        assert runners["ours"]["peak_mem_isolated"] and "vs_original" in runners["ours"]
        # the up-conv rewrite does less arithmetic; the original also computes D's weight grads in G's step
        assert runners["ours"]["flops"] < runners["ours-before"]["flops"] < runners["original"]["flops"]
    procs = {r["processes"]: r for r in rep["procs"]}
    assert set(procs) == {1, 2} and procs[2]["global_batch"] == procs[1]["global_batch"]
    assert all(r["img_per_s"] > 0 for r in procs.values())
    assert "| tiny-s1-b4 | bf16 | ours |" in text and "x original" in text


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_benchmark_builds_the_trainers_accelerator(monkeypatch, tmp_path, precision):
    """The benchmark measures the trainer's DDP setup: its accelerator and the trainer's are the
    same type, built by the same function (the caller of ``Accelerator(...)``) with the same
    keyword arguments (DDP and process-group handlers included), recorded at the constructor."""
    import accelerate
    from accelerate.state import AcceleratorState

    from stackgan.backends import AccelerateGAN, ddp, make_backend
    from stackgan.bench.ours import PRECISIONS
    from stackgan.config import load_config

    built = []

    class Recording(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            built.append((sys._getframe(1).f_code, args, kwargs))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Recording)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = load_config(None, [f"train.run_dir={tmp_path}", "train.report_to=none",
                             f"train.mixed_precision={PRECISIONS[precision]}"])
    backends = []
    for build in (lambda: make_backend(cfg), lambda: make_accelerator("cpu", precision)):
        AcceleratorState._reset_state(reset_partial_state=True)
        backends.append(build())
    (trainer_fn, *trainer_call), (bench_fn, *bench_call) = built
    assert trainer_fn is bench_fn is ddp.make_accelerator.__code__
    assert trainer_call == bench_call and bench_call[1]["mixed_precision"] == PRECISIONS[precision]
    handler = bench_call[1]["kwargs_handlers"][0]  # what the benchmark's own copy lacked
    assert handler.gradient_as_bucket_view and handler.broadcast_buffers
    assert all(type(b) is AccelerateGAN and type(b.accelerator) is Recording for b in backends)
    AcceleratorState._reset_state(reset_partial_state=True)
