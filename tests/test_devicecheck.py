"""Device placement and host syncs of the training step, checked on a CPU-only machine.

The networks and inputs live on the ``meta`` device (shapes, no data) and the code runs
under :class:`tests.devicecheck.DeviceGuard`, which names every host->device copy that
would make a GPU run wait and every read of a device value. bf16 autocast through the whole
step is checked on the CPU with real numbers: every convolution, forward and backward, in
bf16.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from stackgan.config import load_config
from .devicecheck import DeviceGuard
from stackgan.diversity import diversity_score
from stackgan.ema import EMA
from stackgan.losses import CaptionBank
from stackgan.models import CODE_DIM, build_discriminator, build_generator

META = torch.device("meta")
TEXT = 12
ALL_OPTIONS = ["model.d_cond=text", "model.g_film=true", "loss.contrastive_coef=1", "loss.contrastive_bank=16",
               "loss.class_coef=1", "optim.grad_clip=1"]
STAGE2_OPTIONS = ["model.upsample_skip=true", "loss.recon_coef=1"]


def _cfg(stage: int, *extra: str):
    return load_config(None, [f"model.stage={stage}", "model.gf_dim=8", "model.df_dim=4", "model.z_dim=8",
                              "model.cond_dim=8", "model.r_num=1", "model.stage1_export=x", *extra])


def _nets(cfg, device, classes: int = 0):
    torch.manual_seed(0)
    stage1 = None
    if cfg.model.stage == 2:
        s1 = load_config(None, ["model.gf_dim=8", "model.z_dim=8", "model.cond_dim=8"]).model
        stage1 = build_generator(s1, TEXT)
    G = build_generator(cfg.model, TEXT, stage1=stage1)
    D = build_discriminator(cfg.model, TEXT, code_dim=CODE_DIM if cfg.loss.contrastive_coef > 0 else 0,
                            num_classes=classes)
    return G.to(device), D.to(device)


class _MetaAccelerator:
    """What gan_step reads off an Accelerator, for networks on ``meta`` (Accelerate has no meta device)."""

    device = META
    scaler = None

    def autocast(self):
        return contextlib.nullcontext()

    def unwrap_model(self, m):
        return m

    def backward(self, loss):
        loss.backward()

    def unscale_gradients(self, optimizer=None):
        pass


def run_gan_step(acc, cfg, device, batch: int = 6, diag: bool = False):
    """One ``stackgan.step.gan_step`` on ``device`` with every option ``cfg`` turns on.
    (The one place to adapt when the trainer's step changes its signature.)"""
    from stackgan.backends import AccelerateGAN
    from stackgan.step import Batch, gan_step

    classes = 3 if cfg.loss.class_coef > 0 else 0
    G, D = _nets(cfg, device, classes)
    opt_g = torch.optim.Adam(G.parameters(), foreach=False)
    opt_d = torch.optim.Adam(D.parameters(), foreach=False)
    if not isinstance(acc, _MetaAccelerator):
        G, D, opt_g, opt_d = acc.prepare(G, D, opt_g, opt_d)
    size = 64 if cfg.model.stage == 1 else 256
    real = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    emb, z = torch.randn(batch, TEXT, device=device), torch.randn(batch, cfg.model.z_dim, device=device)
    cls = (torch.arange(batch) % 3).to(device)
    bank = CaptionBank(cfg.loss.contrastive_bank, TEXT, device) if cfg.loss.contrastive_bank else None
    widx = torch.roll(torch.arange(batch), 1).to(device)
    low = torch.rand(batch, 3, 64, 64, device=device) if cfg.loss.recon_coef > 0 else None
    b = Batch(real=real, emb=emb, z=z, wrong=widx, cls=cls, species=cls if classes else None, real_low=low)
    backend = AccelerateGAN(acc, grad_clip=cfg.optim.grad_clip)  # the trainer's DDP backend around acc
    with DeviceGuard(device) if device.type != "cpu" else contextlib.nullcontext() as guard:
        gan_step(backend, G, D, opt_g, opt_d, b, cfg, bank, diag=diag)
    return guard


def test_guard_names_host_copies_and_reads():
    with DeviceGuard(META) as guard:
        x = torch.ones(3, device=META)
        y = x + torch.arange(3).to(META)  # a host tensor moved inside the step
        assert y.sum().item() == 0  # meta has no data: the read is reported and answered with 0
        torch.empty(2, device=META).copy_(torch.ones(2))
    kinds = [(f.kind, f.op) for f in guard.findings]
    assert kinds == [("host-copy", "_to_copy"), ("sync", "_local_scalar_dense"), ("host-copy", "copy_")]
    assert all("test_devicecheck.py" in f.where for f in guard.findings)
    assert "1 x sync" in guard.report()
    with pytest.raises(ValueError, match="host"):
        DeviceGuard("cpu")


def test_ema_update_on_the_device_does_no_host_work():
    G, _ = _nets(_cfg(2), META)
    ema = EMA(G, decay=0.9)
    with DeviceGuard(META) as guard:
        for step in range(3):
            ema.update(G, step)
    assert not guard.findings, guard.report()


def test_ema_follows_its_generator_to_the_device():
    """Made before the trainer moves G (accelerate.prepare): the first update moves the copy once."""
    G, _ = _nets(_cfg(1), "cpu")
    ema = EMA(G, decay=0.9)
    G.to(META)
    ema.update(G, 0)
    assert ema.device.type == "meta" and all(b.device.type == "meta" for b in ema.model.buffers())
    with DeviceGuard(META) as guard:
        ema.update(G, 1)
    assert not guard.findings, guard.report()
    assert ema.to(META) is ema


def test_caption_bank_stays_on_the_device():
    bank = CaptionBank(8, TEXT, META)
    with DeviceGuard(META) as guard:
        for _ in range(3):
            bank.push(torch.empty(6, TEXT, device=META), torch.zeros(6, dtype=torch.long, device=META))
        emb, cls = bank.get()
    assert not guard.findings, guard.report()
    assert emb.shape == (8, TEXT) and cls.device == META


def test_diversity_score_moves_its_noise_in_and_one_number_out():
    G, _ = _nets(_cfg(1), META)
    with DeviceGuard(META) as guard:
        diversity_score(G, torch.randn(3, TEXT, device=META), 4, torch.Generator().manual_seed(0))
    mine = [(f.kind, f.op) for f in guard.findings if "diversity.py" in f.where]
    assert sorted(mine) == [("host-copy", "_to_copy"), ("sync", "_local_scalar_dense")], guard.report()


@pytest.mark.parametrize("stage", [1, 2])
def test_gan_step_queues_device_work_only(stage):
    """The whole step (every loss option on) with networks and batch on the device: no host
    tensors copied in, no values read out (diag=False: the gradient norms of diag steps are
    meant to be read)."""
    options = ALL_OPTIONS if stage == 1 else ALL_OPTIONS + STAGE2_OPTIONS
    guard = run_gan_step(_MetaAccelerator(), _cfg(stage, *options), META, batch=4)
    assert not guard.findings, guard.report()


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_autocast_runs_every_convolution_of_the_step_in_bf16(stage, one_torch_thread):
    """CPU, real numbers: under the trainer's bf16 autocast every convolution of G and D, forward
    and backward, runs in bf16 (a module called outside autocast would show up as float32)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    cfg = _cfg(stage, "model.d_cond=text", "loss.contrastive_coef=1", *(STAGE2_OPTIONS if stage == 2 else ()))
    guard = DeviceGuard(META)  # only its precision counter is used: the step runs on the CPU
    with guard:
        run_gan_step(acc, cfg, torch.device("cpu"), batch=2)
    for kind in ("convolution", "convolution_backward"):
        assert set(guard.dtypes(kind)) == {"bfloat16"}, (kind, guard.dtypes(kind))
    AcceleratorState._reset_state()
