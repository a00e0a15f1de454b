"""The DeepSpeed backend's precision settings and loss-scale report, without starting engines
(tests/test_deepspeed.py runs them)."""
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
