"""CUDA-only paths (marker ``gpu``; skipped without a CUDA device). ``bash tests/gpu/check.sh``
runs them with ``python -m pytest -m gpu``.

"No host sync" is checked with ``torch.cuda.set_sync_debug_mode("error")`` (a blocking copy
or a read of a device value raises) and with :class:`tests.devicecheck.DeviceGuard` (which
also names host->device copies that are not pinned + non-blocking).
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch
from torch import nn

from stackgan import checkpoint as ckpt
from stackgan.amp import update
from stackgan.config import load_config
from stackgan.data.stream import TrainStream, to_device, to_unit_range
from .devicecheck import DeviceGuard
from stackgan.diversity import diversity_score
from stackgan.ema import EMA
from stackgan.export import read_export, save_export
from stackgan.grid import to_uint8
from stackgan.models import build_generator

from .conftest import run_cmd
from .test_devicecheck import ALL_OPTIONS, STAGE2_OPTIONS, _cfg, run_gan_step
from .test_train import TINY, log_records

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@contextlib.contextmanager
def no_host_sync():
    """Raise on any blocking copy or device read inside the block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _tiny_g(device=CUDA):
    cfg = load_config(None, ["model.gf_dim=8", "model.z_dim=8", "model.cond_dim=8"])
    torch.manual_seed(0)
    return build_generator(cfg.model, 12).to(device), cfg


# ---- stream ------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_stream_batches_arrive_pinned_and_copy_without_waiting(tiny_shards, workers):
    stream = TrainStream(str(tiny_shards), "train", 64, 4, seed=0, num_workers=workers, pin_memory=True,
                         img_dtype="uint8")
    batch = next(stream.iterate())
    assert batch["img"].is_pinned() and batch["emb"].is_pinned() and batch["cls"].is_pinned()
    with no_host_sync():
        dev = to_device(batch, CUDA)
        real = to_unit_range(dev["img"], memory_format=torch.channels_last)
    assert real.is_cuda and real.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(real.cpu(), to_unit_range(batch["img"]))
    assert dev["caption"] == batch["caption"]


def test_to_device_pins_small_per_step_tensors():
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with DeviceGuard(CUDA) as guard, no_host_sync():
        on = to_device(z, CUDA)
    assert not guard.findings, guard.report()
    assert torch.equal(on.cpu(), z)
    with DeviceGuard(CUDA) as guard:
        z.to(CUDA)  # what the trainer does today: a blocking copy from pageable memory
    assert [f.kind for f in guard.findings] == ["host-copy"]


# ---- EMA, checkpoint, export, grid, diversity ----------------------------------------------
def test_ema_follows_g_to_the_gpu_and_updates_without_syncs():
    G, _ = _tiny_g("cpu")
    ema = EMA(G, decay=0.9)
    G.to(CUDA)
    ema.update(G, 0)
    assert ema.device.type == "cuda"
    with no_host_sync():
        for step in range(1, 4):
            ema.update(G, step)
    G.half()  # DeepSpeed fp16 holds G in fp16: the average stays fp32
    ema.update(G, 4)
    assert {p.dtype for p in ema.model.parameters()} == {torch.float32}


def test_checkpoint_keeps_this_devices_rng_and_writes_host_tensors(tmp_path):
    torch.randn(1, device=CUDA)
    state = ckpt.rng_state()
    assert torch.is_tensor(state["cuda"])
    a = torch.randn(4, device=CUDA)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.randn(4, device=CUDA), a)
    G, _ = _tiny_g()
    path = ckpt.save(tmp_path, 1, lambda: {"G": G.state_dict(), "step": 1}, {}, rank=0, barrier=lambda: None,
                     keep_last=1)
    loaded = torch.load(path / "state.pt", weights_only=False)  # no map_location: must be host tensors
    assert all(v.device.type == "cpu" for v in loaded["G"].values())


def test_export_of_a_gpu_fp16_generator_is_host_fp32(tmp_path):
    G, cfg = _tiny_g()
    G.half()
    path = save_export(tmp_path / "g.pt", G, cfg.model, text_encoder="x", text_dim=12, step=1, config={})
    sd = read_export(path)["state_dict"]
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float32}
    assert all(v.device.type == "cpu" for v in sd.values())


def test_grid_quantises_on_the_gpu_as_on_the_host():
    x = torch.rand(2, 3, 8, 8, device=CUDA) * 2.2 - 1.1
    assert np.array_equal(to_uint8(x), to_uint8(x.cpu()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_diversity_score_on_the_gpu_is_reproducible_and_leaves_the_rng(dtype):
    G, _ = _tiny_g()
    G.to(dtype)
    emb = torch.randn(3, 12, device=CUDA)
    state = torch.cuda.get_rng_state()
    a = diversity_score(G, emb, 4, torch.Generator().manual_seed(0))
    b = diversity_score(G, emb, 4, torch.Generator().manual_seed(0))
    assert a == b and 0 < a < 2
    assert torch.equal(torch.cuda.get_rng_state(), state)


# ---- fp16 loss scaling with two optimisers, fused Adam ---------------------------------------
def _fp16_pair():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from accelerate.utils import GradScalerKwargs

    AcceleratorState._reset_state()  # a modest first scale: the clean steps below must not overflow
    acc = Accelerator(mixed_precision="fp16", kwargs_handlers=[GradScalerKwargs(init_scale=2.0**10)])
    assert acc.scaler is not None
    torch.manual_seed(0)
    G, D = nn.Linear(16, 8), nn.Linear(8, 1)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, fused=True)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, fused=True)
    return (acc, *acc.prepare(G, D, opt_g, opt_d))


def test_fp16_updates_queue_without_syncs_and_skip_only_the_overflowing_network():
    acc, G, D, opt_g, opt_d = _fp16_pair()
    x = torch.randn(32, 16, device=acc.device)
    scale = acc.scaler.get_scale()
    with no_host_sync():
        for clip in (0.0, 1.0):
            with acc.autocast():
                fake = G(x)
                loss_d = D(fake.detach()).float().pow(2).mean()
            up_d = update(acc, opt_d, loss_d, grad_clip=clip, want_norm=True)
            D.requires_grad_(False)
            with acc.autocast():
                loss_g = D(fake).float().mean()
            up_g = update(acc, opt_g, loss_g, grad_clip=clip)
            D.requires_grad_(True)
    assert up_d.skipped.item() == 0 and up_g.skipped.item() == 0 and torch.isfinite(up_d.grad_norm)
    hook = D.weight.register_hook(lambda g: g * float("inf"))
    before = [p.detach().clone() for p in D.parameters()]
    with acc.autocast():
        loss_d = D(G(x).detach()).float().pow(2).mean()
    up = update(acc, opt_d, loss_d)
    hook.remove()
    assert up.skipped.item() == 1 and all(torch.equal(a, b) for a, b in zip(before, D.parameters()))
    assert acc.scaler.get_scale() == scale / 2


# ---- the training step ---------------------------------------------------------------------
def _cuda_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision)


@pytest.mark.parametrize("stage", [1, 2])
def test_gan_step_on_the_gpu_does_no_host_work(stage):
    options = ALL_OPTIONS if stage == 1 else ALL_OPTIONS + STAGE2_OPTIONS
    guard = run_gan_step(_cuda_accelerator("bf16"), _cfg(stage, *options), CUDA, batch=4)
    assert not guard.findings, guard.report()


def test_gan_step_bf16_runs_every_convolution_in_bf16_on_the_gpu():
    guard = run_gan_step(_cuda_accelerator("bf16"), _cfg(1, *ALL_OPTIONS), CUDA, batch=4)
    for kind in ("convolution", "convolution_backward"):
        assert set(guard.dtypes(kind)) == {"bfloat16"}, (kind, guard.dtypes(kind))


# ---- DeepSpeed fp16 engines on one GPU -------------------------------------------------------
@pytest.mark.deepspeed
def test_deepspeed_fp16_engines_train_on_one_gpu(tiny_shards, tmp_path):
    pytest.importorskip("deepspeed", reason="needs the deepspeed extra")
    run = tmp_path / "ds-fp16"
    p = run_cmd([sys.executable, "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
                 f"data.shards={tiny_shards}", f"train.run_dir={run}", *TINY, "train.steps=30",
                 "train.backend=deepspeed", "train.mixed_precision=fp16", "train.channels_last=false"],
                timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "fp16 (fp16 weights, fp32 master copy, dynamic loss scale per engine" in p.stdout
    recs = [r for r in log_records(run) if "loss_d" in r]
    assert recs and all(np.isfinite([r["loss_d"], r["loss_g"]]).all() for r in recs)
    sd = read_export(run / "export" / "generator.pt")["state_dict"]
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float32}
