"""The device- and precision-dependent paths of checkpoints, exports, grids, the diversity
score and the stream helpers, exercised on the CPU (tests/test_cuda.py runs them on a GPU)."""
from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from stackgan import checkpoint as ckpt
from stackgan.config import load_config
from stackgan.data.stream import to_device, to_unit_range
from stackgan.diversity import diversity_score
from stackgan.export import load_generator, read_export, save_export
from stackgan.grid import to_uint8
from stackgan.models import build_generator


def _tiny_g():
    cfg = load_config(None, ["model.gf_dim=8", "model.z_dim=8", "model.cond_dim=8"])
    torch.manual_seed(0)
    return build_generator(cfg.model, 12), cfg


def test_to_host_keeps_structure_and_state_dict_versions():
    bn = nn.BatchNorm2d(3)
    sd = bn.state_dict()
    Pair = namedtuple("Pair", "a b")
    obj = {"bn": sd, "list": [torch.ones(2), (torch.zeros(1), 3)], "pair": Pair(1, 2), "n": 5}
    out = ckpt.to_host(obj)
    assert isinstance(out["bn"], OrderedDict) and out["bn"]._metadata == sd._metadata
    assert isinstance(out["list"][1], tuple) and out["list"][1][1] == 3 and out["pair"] == Pair(1, 2)
    nn.BatchNorm2d(3).load_state_dict(out["bn"])


def test_rng_state_keeps_one_cuda_state_per_rank():
    state = ckpt.rng_state()
    if not torch.cuda.is_available():
        assert "cuda" not in state
    one = torch.zeros(16, dtype=torch.uint8)
    assert ckpt._own_cuda_state(one) is one  # this format: the rank's own device
    assert ckpt._own_cuda_state(None) is None
    if not torch.cuda.is_available():  # an older checkpoint's list of every device's states
        assert ckpt._own_cuda_state([one, one]) is None
    ckpt.set_rng_state({**state, "cuda": [one]})  # old format on a machine without CUDA: ignored


def test_export_is_fp32_on_the_host_whatever_the_generator_holds(tmp_path):
    G, cfg = _tiny_g()
    G.half()  # as DeepSpeed fp16 holds G
    path = save_export(tmp_path / "g.pt", G, cfg.model, text_encoder="x", text_dim=12, step=3, config={})
    sd = read_export(path)["state_dict"]
    floats = {v.dtype for v in sd.values() if v.is_floating_point()}
    assert floats == {torch.float32} and all(v.device.type == "cpu" for v in sd.values())
    assert sd["fc.1.num_batches_tracked"].dtype == torch.long
    g, info = load_generator(path)
    assert info.step == 3 and next(g.parameters()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_to_uint8_rounds_as_before_for_any_dtype(dtype):
    x = (torch.rand(2, 3, 5, 5) * 2.4 - 1.2).to(dtype)
    ref = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 5, 5, 3) and np.array_equal(out, ref)


def test_diversity_score_runs_a_half_precision_generator_under_autocast():
    G, _ = _tiny_g()
    emb = torch.randn(3, 12)
    ref = diversity_score(G, emb, 4, torch.Generator().manual_seed(0))
    G.to(torch.bfloat16)  # fp32 inputs into bf16 weights fail without autocast
    half = diversity_score(G, emb, 4, torch.Generator().manual_seed(0))
    assert half == pytest.approx(ref, rel=0.1)


def test_to_device_on_the_host_and_bad_input():
    x = torch.arange(4)
    assert to_device(x, "cpu") is x
    batch = to_device({"img": x, "caption": ["a"]}, torch.device("cpu"))
    assert batch["img"] is x and batch["caption"] == ["a"]
    with pytest.raises(TypeError, match="tensor"):
        to_device([x], "cpu")


def test_to_unit_range_writes_the_layout_it_is_asked_for():
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    plain = to_unit_range(img)
    cl = to_unit_range(img, memory_format=torch.channels_last)
    assert torch.equal(plain, cl) and cl.is_contiguous(memory_format=torch.channels_last)
    assert plain.is_contiguous() and plain.min() >= -1 and plain.max() <= 1
