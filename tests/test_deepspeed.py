"""The DeepSpeed backend end to end: 2 CPU processes (gloo), ZeRO-1 and ZeRO-2, against DDP.

Tolerance of the DeepSpeed-vs-DDP comparison: none beyond 1e-6, and both runs are in fact
bit-identical here. With 2 processes the gradient average is a sum of two numbers (order-free)
divided by 2 (exact), both backends run the same torch Adam arithmetic, and the runs use
``train.channels_last=false`` (DeepSpeed flattens weights to contiguous memory; NHWC convolutions
round differently). Anything that is not rounding -- learning rate, a hidden gradient clip
(accelerate's DeepSpeed default is 1.0), averaging, D's gradients leaking into G's step, RNG
use -- shows up far above 1e-6. Loosening would not help anyway: Adam turns a 1e-7 difference in
a near-zero gradient into a +-lr step (its update is about lr x sign(g)), and the GAN amplifies
that within a few steps (measured: 2.4% relative difference in G's update after one step with
channels_last on, 16% after three). For the same reason runs with an active gradient clip are
not compared (DeepSpeed computes the norm and the clip factor in another order: last-bit
differences, amplified the same way); the bf16 + clipping test checks what the engines report.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackgan import checkpoint as ckpt
from stackgan.export import load_generator

from .conftest import ROOT, run_cmd
from .test_train import TINY, final_state, log_records

pytest.importorskip("deepspeed", reason="needs the extra: DS_BUILD_OPS=0 pip install -e '.[deepspeed]'")
pytest.importorskip("transformers", reason="accelerate's DeepSpeed plugin needs transformers")
pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed]

STEPS = 10
COMMON = [*TINY, f"train.steps={STEPS}", "train.channels_last=false", "train.log_every=1",
          "train.sample_every=100"]
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_ops_built() -> None:
    """Build DeepSpeed's CPU shared-memory comm op once, in one process, before any run.

    On CPU DeepSpeed JIT-compiles it at its first process-group start (~100 s, cached in
    ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``): built here once per machine,
    not raced by two ranks inside a test's time limit. GPUs do not use it.
    """
    if torch.cuda.is_available():
        return
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "b is None or b.load(verbose=False)\n")
    t0 = time.time()
    p = run_cmd([sys.executable, "-c", code], env=ENV, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    print(f"DeepSpeed CPU comm op ready in {time.time() - t0:.0f}s")


def launch(config: str, run_dir: Path, shards: Path, *extra: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` with one of configs/accelerate/*.yaml (2 processes)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                f"configs/accelerate/{config}", "--main_process_port", str(_free_port())]
    args = [*launcher, "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
            f"data.shards={shards}", f"train.run_dir={run_dir}", *COMMON, *extra]
    return run_cmd(args, env=ENV, timeout=600)


def spawn_ranks(run_dir: Path, shards: Path, *extra: str, resume: str = "auto",
                entry: tuple[str, ...] = ("-m", "stackgan.train"),
                env: dict | None = None) -> list[subprocess.Popen]:
    """Two trainer processes started directly, one per rank, as slurm/common.sh does (no launcher)."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env_r = {**os.environ, **ENV, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(rank),
                 "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        args = [sys.executable, *entry, "--config", "configs/birds_stage1.yaml",
                "--resume", resume, f"data.shards={shards}", f"train.run_dir={run_dir}", *COMMON,
                "train.backend=deepspeed", *extra]
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env_r, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finished(run_dir: Path) -> dict:
    fin = [r for r in log_records(run_dir) if r.get("event") == "finished"]
    assert fin, f"no 'finished' record in {run_dir}/log.jsonl"
    return fin[-1]


def assert_states_match(a: dict, b: dict, atol: float = 1e-6) -> None:
    """G, D (weights and BatchNorm statistics) and the EMA generator agree within ``atol``."""
    assert a["step"] == b["step"], (a["step"], b["step"])
    for part, pa, pb in _parts(a, b):
        assert pa.keys() == pb.keys(), part
        for k, ta in pa.items():
            if ta.dtype.is_floating_point:
                d = (ta.float() - pb[k].float()).abs().max().item()
                assert d <= atol, f"{part}.{k} differs by {d:.3g} (limit {atol})"
            else:
                assert torch.equal(ta, pb[k]), f"{part}.{k} differs"


def assert_same_trajectory(a: dict, b: dict, lr: dict[str, float]) -> None:
    """Two backends' states after the same steps: the same training up to reduction order.

    DDP and DeepSpeed sum gradients in different orders; Adam moves a weight by ~lr whatever the
    gradient's size, so a near-zero gradient whose sign flips by rounding moves that weight up to
    2 lr a step, and a GAN amplifies such differences step by step (measured here after 10 steps:
    G's weights differ by 0.18 lr_g on average, 3.2 lr_g at most; D by 0.04 lr_d). A backend that
    trained differently (a missed or doubled update, another lr, unsynchronised ranks) is off by
    about the weights' whole movement, several lr on average. Bounds: mean 0.5 lr, max 10 lr."""
    assert a["step"] == b["step"], (a["step"], b["step"])
    for part, pa, pb in _parts(a, b):
        assert pa.keys() == pb.keys(), part
        step = lr["D" if part == "D" else "G"]
        diffs = [(ta.float() - pb[k].float()).abs().flatten() for k, ta in pa.items() if ta.is_floating_point()]
        d = torch.cat(diffs)
        assert d.mean() <= 0.5 * step and d.max() <= 10 * step, (
            f"{part}: weights differ by {d.mean():.3g} on average, {d.max():.3g} at most (lr {step})")
        for k, ta in pa.items():
            if not ta.is_floating_point():
                assert torch.equal(ta, pb[k]), f"{part}.{k} differs"


def _parts(a: dict, b: dict):
    for part in ("G", "D", "ema"):
        yield (part, a[part], b[part]) if part != "ema" else (part, a[part]["model"], b[part]["model"])


def assert_same_losses(a: Path, b: Path, exact_until: int) -> None:
    """Per-step losses of two runs: equal to 1e-5 up to ``exact_until``, within 1% after."""
    la, lb = ([r for r in log_records(run) if "loss_d" in r] for run in (a, b))
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        rel = 1e-5 if ra["step"] <= exact_until else 1e-2
        for key in ("loss_d", "loss_g"):
            assert ra[key] == pytest.approx(rb[key], rel=rel), (ra["step"], key, ra[key], rb[key])


LR = {"G": 5e-4, "D": 2e-4}  # TINY's learning rates


@pytest.fixture(scope="module")
def ddp_reference(tiny_shards, tmp_path_factory, ds_ops_built) -> Path:
    """The same run on the DDP backend: what DeepSpeed must reproduce (its folder)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    p = launch("cpu_2proc.yaml", run, tiny_shards)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert finished(run)["world_size"] == 2
    return run


def test_zero1_matches_ddp_and_ranks_agree(tiny_shards, tmp_path, ddp_reference):
    run = tmp_path / "zero1"
    p = launch("deepspeed_zero1.yaml", run, tiny_shards, f"train.ckpt_every={STEPS // 2}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    described = "backend deepspeed: ZeRO-1, one engine each for G and D, gradient clipping off, fp32"
    assert described in p.stdout, p.stdout[-2000:]
    fin = finished(run)
    assert fin["world_size"] == 2 and len(fin["fingerprints"]) == 2 and fin["ranks_identical"], fin
    # the config file alone chose the backend; the run folder records it
    assert "backend: deepspeed" in (run / "config.yaml").read_text()
    # checkpoint: rank 0's full state plus every rank's ZeRO partition of both engines
    assert [c.name for c in ckpt.list_complete(run)] == [f"step-{STEPS // 2:08d}", f"step-{STEPS:08d}"]
    last = ckpt.latest(run)
    for tag in ("G", "D"):
        for r in range(2):
            assert (last / "deepspeed" / tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file()
    assert not list(ckpt.ckpt_root(run).glob(".*")), "staging/temporary folders left behind"
    state = final_state(run)
    assert state["backend"] == "deepspeed" and state["opt_g"] is None and state["world_size"] == 2
    assert_same_losses(run, ddp_reference, exact_until=STEPS // 2)
    assert_same_trajectory(state, final_state(ddp_reference), LR)
    g, info = load_generator(run / "export" / "generator.pt")
    assert info.step == STEPS and info.image_size == 64
    ref = state["ema"]["model"]
    assert all(torch.equal(v, ref[k]) for k, v in g.state_dict().items())


def test_zero2_sigterm_checkpoints_then_resumes_exactly(tiny_shards, tmp_path, ddp_reference):
    """SIGTERM to one rank: both save (each its ZeRO partition) and exit 3; --resume auto then
    finishes the run, ending exactly where the uninterrupted DDP run ends."""
    run = tmp_path / "zero2"
    procs = spawn_ranks(run, tiny_shards, "train.steps=100000", "train.ckpt_every=100000")
    deadline = time.time() + 300
    log = run / "log.jsonl"
    while not log.exists() or log.read_text().count("loss_d") < 2:
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            for p in procs:
                p.kill()
            pytest.fail("ranks ended or stalled before training: " + procs[0].communicate()[1][-3000:])
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # rank 1 only: the ranks must agree to stop together
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [3, 3], outs[0][1][-3000:] + outs[1][1][-3000:]
    stopped = ckpt.latest(run)
    assert stopped is not None
    at = torch.load(stopped / "state.pt", map_location="cpu", weights_only=False)["step"]
    assert 2 <= at < STEPS, f"stopped at step {at}: raise STEPS"
    assert (stopped / "deepspeed" / "D" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()

    procs = spawn_ranks(run, tiny_shards, f"train.ckpt_every={STEPS}")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert f"resumed from {stopped} at step {at}" in outs[0][0]
    assert "backend deepspeed: ZeRO-2" in outs[0][0]  # stage 2 is the default without a launcher config
    fin = finished(run)
    assert fin["step"] == STEPS and fin["world_size"] == 2 and fin["ranks_identical"], fin
    assert_same_losses(run, ddp_reference, exact_until=at)
    assert_same_trajectory(final_state(run), final_state(ddp_reference), LR)


def test_single_process_bf16_clipping_and_backend_mismatch(tiny_shards, tmp_path):
    """Plain ``python`` (no launcher), bf16 through DeepSpeed's torch_autocast, a gradient clip
    the engines must report; then the DDP backend refuses the DeepSpeed checkpoint (status 2)."""
    run = tmp_path / "bf16"
    base = [sys.executable, "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
            f"data.shards={tiny_shards}", f"train.run_dir={run}", *TINY]
    p = run_cmd([*base, "train.steps=2", "train.backend=deepspeed", "train.mixed_precision=bf16",
                 "optim.grad_clip=0.5"], env=ENV)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert ("backend deepspeed: ZeRO-2, one engine each for G and D, gradient clipping 0.5, "
            "bf16 (torch autocast, fp32 weights)") in p.stdout
    recs = [r for r in log_records(run) if "loss_d" in r]
    assert [r["step"] for r in recs] == [2]
    assert all(abs(r[k]) < 1e4 for r in recs for k in ("loss_d", "loss_g"))
    g, info = load_generator(run / "export" / "generator.pt")
    assert info.step == 2
    assert all(v.dtype == torch.float32 for v in g.state_dict().values() if v.is_floating_point())
    assert finished(run)["world_size"] == 1

    p = run_cmd([*base, "train.steps=3", "train.backend=ddp"], env=ENV)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert "written by the deepspeed backend" in p.stderr
    assert ckpt.latest(run).name == "step-00000002"


FP16_ON_CPU = ("tests/ds_fp16_cpu.py",)  # DeepSpeed's CPU accelerator told it has fp16 (see the file)


def _engine_amp(checkpoint: Path, tag: str) -> tuple[int, float]:
    """(skipped steps, current loss scale) of one engine, from its checkpoint files."""
    folder = checkpoint / "deepspeed" / tag
    model = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    optim = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                       weights_only=False)
    return model["skipped_steps"], optim["optimizer_state_dict"]["loss_scaler"].cur_scale


@pytest.mark.slow
def test_fp16_engines_scale_their_losses_apart_and_resume_exactly(tiny_shards, tmp_path, ds_ops_built):
    """fp16 on DeepSpeed (what a GPU run uses), 2 ranks on the CPU: fp16 weights and buffers in
    the engines, fp32 EMA and export, one dynamic loss scaler per engine whose scale halves at
    every skipped step of its own engine only (hysteresis 1 and a small initial scale, from a
    DeepSpeed config file, so the 10 steps both overflow and train), ranks identical, and a
    resume from the middle checkpoint ends bit-identical to the uninterrupted run."""
    ds_conf = tmp_path / "ds_fp16.json"
    ds_conf.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                                   "train_micro_batch_size_per_gpu": "auto",
                                   "fp16": {"initial_scale_power": 12, "hysteresis": 1}}))
    env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_conf)}
    fp16 = ["train.mixed_precision=fp16", f"train.ckpt_every={STEPS // 2}"]
    run = tmp_path / "fp16"
    procs = spawn_ranks(run, tiny_shards, *fp16, entry=FP16_ON_CPU, env=env)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert ("fp16 (fp16 weights, fp32 master copy, dynamic loss scale per engine from 4096)") in outs[0][0]
    fin = finished(run)
    assert fin["step"] == STEPS and fin["ranks_identical"], fin
    last = ckpt.latest(run)
    amp = {tag: _engine_amp(last, tag) for tag in ("G", "D")}
    for tag, (skipped, scale) in amp.items():
        assert scale == 4096 * 0.5 ** skipped, (tag, amp)  # each engine backs off on its own overflows
    assert sum(s for s, _ in amp.values()) < 2 * STEPS, amp  # and steps were taken
    state = final_state(run)
    assert state["G"]["ca_net.fc.weight"].dtype == torch.float16  # the engines' weights
    assert {v.dtype for v in state["ema"]["model"].values() if v.is_floating_point()} == {torch.float32}
    g, _ = load_generator(run / "export" / "generator.pt")
    assert next(g.parameters()).dtype == torch.float32

    resumed = tmp_path / "fp16-resumed"
    middle = ckpt.ckpt_root(run) / f"step-{STEPS // 2:08d}"
    procs = spawn_ranks(resumed, tiny_shards, *fp16, resume=str(middle), entry=FP16_ON_CPU, env=env)
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert_states_match(final_state(resumed), state, atol=0.0)
