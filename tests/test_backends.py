"""The backend interface (no trainer module asks which backend it has; the DDP backend's
checkpoint state), and the DeepSpeed backend's precision settings and loss-scale report without
starting engines (tests/test_deepspeed.py runs them)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from stackgan.backends import FP16_LOSS_SCALING, DeepSpeedGAN
from stackgan.backends.deepspeed import _precision_sections
from stackgan.config import ConfigError


def test_bf16_is_torch_autocast_with_fp32_weights():
    conf: dict = {}
    _precision_sections(conf, "bf16")
    assert conf["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not conf["bf16"]["enabled"] and not conf["fp16"]["enabled"] and "data_types" not in conf


def test_fp16_is_deepspeeds_fp16_mode_with_dynamic_scaling_per_engine():
    conf: dict = {}
    _precision_sections(conf, "fp16")
    assert not conf["torch_autocast"]["enabled"]  # its fp16 mode scales losses only without ZeRO
    fp16 = conf["fp16"]
    assert fp16["enabled"] and fp16["auto_cast"] and fp16["loss_scale"] == 0  # 0 = dynamic
    assert {k: fp16[k] for k in FP16_LOSS_SCALING} == FP16_LOSS_SCALING
    assert conf["data_types"]["buffer_dtype"] == "fp16"  # BatchNorm statistics in the weights' dtype


def test_a_config_file_sets_the_scaling_but_not_the_precision():
    conf = {"fp16": {"enabled": "auto", "initial_scale_power": 8, "hysteresis": "auto"}}
    _precision_sections(conf, "fp16")
    assert conf["fp16"]["initial_scale_power"] == 8 and conf["fp16"]["hysteresis"] == 2
    for precision in ("no", "bf16"):
        with pytest.raises(ConfigError, match="enables 'fp16'"):
            _precision_sections({"fp16": {"enabled": True}}, precision)
    with pytest.raises(ConfigError, match="enables 'bf16'"):
        _precision_sections({"bf16": {"enabled": "true"}}, "fp16")
    conf = {}
    _precision_sections(conf, "no")
    assert not conf["fp16"]["enabled"] and not conf["torch_autocast"]["enabled"]


def _engine(fp16: bool, scale: float, skipped: int):
    return SimpleNamespace(fp16_enabled=lambda: fp16, optimizer=SimpleNamespace(loss_scale=scale),
                           skipped_steps=skipped)


def test_amp_state_reports_each_engine():
    gan = DeepSpeedGAN.__new__(DeepSpeedGAN)  # engines only: no process group needed here
    gan.G, gan.D = _engine(True, 1024.0, 3), _engine(True, 4096.0, 1)
    assert gan.amp_state() == {"loss_scale_g": 1024.0, "skipped_steps_g": 3,
                               "loss_scale_d": 4096.0, "skipped_steps_d": 1}
    gan.G, gan.D = _engine(False, 1.0, 0), _engine(False, 1.0, 0)
    assert gan.amp_state() == {}
    gan.G = None
    assert gan.amp_state() == {}


def test_the_trainer_never_asks_which_backend_it_has():
    """run.py, step.py and monitor.py talk to one interface (stackgan/backends): no branch on
    train.backend, no probing of the accelerator for what it offers."""
    import inspect

    from stackgan import monitor, run, step

    for module in (run, step, monitor):
        src = inspect.getsource(module)
        for probe in ("train.backend", "hasattr(", "getattr(run.acc", "getattr(acc", "DeepSpeedGAN"):
            assert probe not in src, f"{module.__name__} has {probe!r}"


def test_ddp_backend_checkpoint_state_round_trip(tmp_path):
    """The DDP backend's part of state.pt (both optimisers, the grad scaler) loads back after
    prepare into a fresh backend; a DeepSpeed checkpoint is refused with the backend named."""
    import torch
    from accelerate.state import AcceleratorState

    from stackgan import checkpoint as ckpt
    from stackgan.backends import AccelerateGAN, make_accelerator

    def backend_and_nets(scaled: bool):
        AcceleratorState._reset_state(reset_partial_state=True)
        acc = make_accelerator(True, "no")
        if scaled:  # what Accelerate builds on a GPU for fp16 (tests/test_amp.py)
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        backend = AccelerateGAN(acc, grad_clip=0.5)
        torch.manual_seed(0)
        G, D = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
        opts = torch.optim.Adam(G.parameters(), lr=0.1), torch.optim.Adam(D.parameters(), lr=0.1)
        return backend, *backend.prepare(G, D, *opts)

    backend, G, D, opt_g, opt_d = backend_and_nets(scaled=True)
    fake = G(torch.randn(8, 4))
    up = backend.update(D, opt_d, D(fake.detach()).pow(2).mean(), want_norm=True)
    assert up.skipped.item() == 0 and up.grad_norm > 0
    backend.update(G, opt_g, D(fake).mean())
    backend.accelerator.scaler.update(2.0**5)  # a scale no fresh scaler has
    assert backend.amp_state() == {"loss_scale": 2.0**5}
    state = backend.state_dict()
    assert state["backend"] == "ddp" and state["opt_g"]["state"] and state["opt_d"]["state"]
    other, *_ = backend_and_nets(scaled=True)
    other.check_resume(state, 1, tmp_path)
    other.load_checkpoint(tmp_path, state)
    assert other.amp_state() == {"loss_scale": 2.0**5}
    for mine, theirs in ((other.opt_g, opt_g), (other.opt_d, opt_d)):
        a, b = mine.state_dict()["state"], theirs.state_dict()["state"]
        assert all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in b)
    with pytest.raises(ckpt.CheckpointError, match="written by the deepspeed backend"):
        other.check_resume({**state, "backend": "deepspeed"}, 1, tmp_path)
    assert "gradient clipping 0.5" in other.describe() and "fp32" in other.describe()
    AcceleratorState._reset_state(reset_partial_state=True)
