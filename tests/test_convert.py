"""Official StackGAN-Pytorch checkpoints into our models (``stackgan.convert --from-official``).

The key lists and shapes below are facts read off hanzhanggit/StackGAN-Pytorch code/model.py
with its default cfg (miscc/config.py: Z_DIM 100, GAN.CONDITION_DIM 128, GF_DIM 128, DF_DIM 64,
R_NUM 4, TEXT.DIMENSION 1024). ``a.{x,y} N`` stands for ``a.x N`` and ``a.y N``. Every
BatchNorm also has ``num_batches_tracked`` (shape ()) when saved by PyTorch >= 0.4.1. The
reference forwards are the official networks written out with torch.nn.functional, from the
same reading, independent of stackgan.models.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stackgan.convert import ConvertError, convert_official_d, convert_official_g, our_key
from stackgan.config import ModelConfig
from stackgan.models import build_discriminator, build_generator

ROOT = Path(__file__).resolve().parents[1]
BN = "{weight,bias,running_mean,running_var}"

STAGE1_G = f"""
ca_net.fc.weight 256x1024
ca_net.fc.bias 256
fc.0.weight 16384x228
fc.1.{BN} 16384
upsample1.1.weight 512x1024x3x3
upsample1.2.{BN} 512
upsample2.1.weight 256x512x3x3
upsample2.2.{BN} 256
upsample3.1.weight 128x256x3x3
upsample3.2.{BN} 128
upsample4.1.weight 64x128x3x3
upsample4.2.{BN} 64
img.0.weight 3x64x3x3
"""

STAGE2_G_OWN = f"""
ca_net.fc.weight 256x1024
ca_net.fc.bias 256
encoder.0.weight 128x3x3x3
encoder.2.weight 256x128x4x4
encoder.3.{BN} 256
encoder.5.weight 512x256x4x4
encoder.6.{BN} 512
hr_joint.0.weight 512x640x3x3
hr_joint.1.{BN} 512
residual.0.block.0.weight 512x512x3x3
residual.0.block.1.{BN} 512
residual.0.block.3.weight 512x512x3x3
residual.0.block.4.{BN} 512
residual.1.block.0.weight 512x512x3x3
residual.1.block.1.{BN} 512
residual.1.block.3.weight 512x512x3x3
residual.1.block.4.{BN} 512
residual.2.block.0.weight 512x512x3x3
residual.2.block.1.{BN} 512
residual.2.block.3.weight 512x512x3x3
residual.2.block.4.{BN} 512
residual.3.block.0.weight 512x512x3x3
residual.3.block.1.{BN} 512
residual.3.block.3.weight 512x512x3x3
residual.3.block.4.{BN} 512
upsample1.1.weight 256x512x3x3
upsample1.2.{BN} 256
upsample2.1.weight 128x256x3x3
upsample2.2.{BN} 128
upsample3.1.weight 64x128x3x3
upsample3.2.{BN} 64
upsample4.1.weight 32x64x3x3
upsample4.2.{BN} 32
img.0.weight 3x32x3x3
"""

D_LOGITS = f"""
get_cond_logits.outlogits.0.weight 512x640x3x3
get_cond_logits.outlogits.1.{BN} 512
get_cond_logits.outlogits.3.{{weight,bias}} 1x512x4x4 1
"""

STAGE1_D = f"""
encode_img.0.weight 64x3x4x4
encode_img.2.weight 128x64x4x4
encode_img.3.{BN} 128
encode_img.5.weight 256x128x4x4
encode_img.6.{BN} 256
encode_img.8.weight 512x256x4x4
encode_img.9.{BN} 512
""" + D_LOGITS

STAGE2_D = f"""
encode_img.0.weight 64x3x4x4
encode_img.2.weight 128x64x4x4
encode_img.3.{BN} 128
encode_img.5.weight 256x128x4x4
encode_img.6.{BN} 256
encode_img.8.weight 512x256x4x4
encode_img.9.{BN} 512
encode_img.11.weight 1024x512x4x4
encode_img.12.{BN} 1024
encode_img.14.weight 2048x1024x4x4
encode_img.15.{BN} 2048
encode_img.17.weight 1024x2048x3x3
encode_img.18.{BN} 1024
encode_img.20.weight 512x1024x3x3
encode_img.21.{BN} 512
get_uncond_logits.outlogits.0.{{weight,bias}} 1x512x4x4 1
""" + D_LOGITS


def keys(table: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The table as {official key: shape}."""
    out = {}
    for line in filter(None, map(str.strip, table.splitlines())):
        name, *shapes = line.split()
        m = re.fullmatch(r"(.*)\.\{(.*)\}", name)
        names = [f"{m.group(1)}.{s}" for s in m.group(2).split(",")] if m else [name]
        shapes = shapes * len(names) if len(shapes) == 1 else shapes
        for n, s in zip(names, shapes):
            out[prefix + n] = tuple(int(d) for d in s.split("x"))
    return out


G1 = keys(STAGE1_G)
G2 = {**keys(STAGE1_G, "STAGE1_G."), **keys(STAGE2_G_OWN)}
D1, D2 = keys(STAGE1_D), keys(STAGE2_D)


def official_state(table: dict, seed: int, num_batches_tracked: bool = True) -> dict[str, torch.Tensor]:
    """Random values under the official names and shapes (BN statistics kept plausible)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in table.items():
        if k.endswith("running_var"):
            v = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith("bias"):
            v = torch.randn(shape, generator=g) * 0.1
        elif k.endswith("weight") and len(shape) == 1:  # BN scale
            v = 1 + torch.randn(shape, generator=g) * 0.1
        else:
            v = torch.randn(shape, generator=g) / (torch.tensor(shape[1:]).prod().float().sqrt())
        sd[k] = v
        if num_batches_tracked and k.endswith("running_var"):
            sd[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
    return sd


# ---- the official networks, written out with functional ops ---------------------------
def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                        training=False, eps=1e-5)


def _ca(sd, p, emb, eps):
    x = F.relu(F.linear(emb, sd[p + "ca_net.fc.weight"], sd[p + "ca_net.fc.bias"]))
    c = x.shape[1] // 2
    mu, logvar = x[:, :c], x[:, c:]
    return mu + eps * torch.exp(0.5 * logvar), mu


def _up(h, sd, p):
    h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), sd[p + ".1.weight"], padding=1)
    return F.relu(_bn(h, sd, p + ".2."))


def ref_stage1_g(sd, emb, z, eps, p=""):
    c, mu = _ca(sd, p, emb, eps)
    h = F.relu(_bn(F.linear(torch.cat((z, c), 1), sd[p + "fc.0.weight"]), sd, p + "fc.1."))
    h = h.view(emb.shape[0], -1, 4, 4)
    for i in range(1, 5):
        h = _up(h, sd, f"{p}upsample{i}")
    return torch.tanh(F.conv2d(h, sd[p + "img.0.weight"], padding=1)), mu


def ref_stage2_g(sd, emb, z, eps1, eps2):
    low, _ = ref_stage1_g(sd, emb, z, eps1, "STAGE1_G.")
    c, mu = _ca(sd, "", emb, eps2)
    h = F.relu(F.conv2d(low, sd["encoder.0.weight"], padding=1))
    h = F.relu(_bn(F.conv2d(h, sd["encoder.2.weight"], stride=2, padding=1), sd, "encoder.3."))
    h = F.relu(_bn(F.conv2d(h, sd["encoder.5.weight"], stride=2, padding=1), sd, "encoder.6."))
    h = torch.cat((h, c[:, :, None, None].repeat(1, 1, 16, 16)), 1)
    h = F.relu(_bn(F.conv2d(h, sd["hr_joint.0.weight"], padding=1), sd, "hr_joint.1."))
    for i in range(4):
        p = f"residual.{i}.block."
        r = F.relu(_bn(F.conv2d(h, sd[p + "0.weight"], padding=1), sd, p + "1."))
        h = F.relu(h + _bn(F.conv2d(r, sd[p + "3.weight"], padding=1), sd, p + "4."))
    for i in range(1, 5):
        h = _up(h, sd, f"upsample{i}")
    return torch.tanh(F.conv2d(h, sd["img.0.weight"], padding=1)), mu


def ref_d(sd, img, cond):
    """Official D logits (before its Sigmoid): (conditional, unconditional or None)."""
    idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("encode_img.") and k.endswith(".weight")
                  and sd[k].dim() == 4})
    h = img
    for i in idx:
        w = sd[f"encode_img.{i}.weight"]
        h = F.conv2d(h, w, stride=2 if w.shape[-1] == 4 else 1, padding=1)
        if f"encode_img.{i + 1}.running_mean" in sd:
            h = _bn(h, sd, f"encode_img.{i + 1}.")
        h = F.leaky_relu(h, 0.2)
    p = "get_cond_logits.outlogits."
    hc = torch.cat((h, cond[:, :, None, None].repeat(1, 1, 4, 4)), 1)
    hc = F.leaky_relu(_bn(F.conv2d(hc, sd[p + "0.weight"], padding=1), sd, p + "1."), 0.2)
    cond_logits = F.conv2d(hc, sd[p + "3.weight"], sd[p + "3.bias"], stride=4).view(-1)
    u = "get_uncond_logits.outlogits.0."
    uncond = F.conv2d(h, sd[u + "weight"], sd[u + "bias"], stride=4).view(-1) if u + "weight" in sd else None
    return cond_logits, uncond


# ---- tests -----------------------------------------------------------------------------
def test_facts_agree_with_the_published_parameter_counts():
    """Stage-I G 10,301,248 and stage-II D 71,269,122 parameters (issue 24's count of the
    official models): the tables above describe those networks."""
    n = lambda t: sum(torch.Size(s).numel() for k, s in t.items() if "running" not in k)  # noqa: E731
    assert n(G1) == 10_301_248 and n(D2) == 71_269_122


@pytest.mark.parametrize("table,stage,kind", [(G1, 1, "G"), (G2, 2, "G"), (D1, 1, "D"), (D2, 2, "D")])
def test_every_official_key_maps_onto_ours_with_its_shape(table, stage, kind):
    mcfg = ModelConfig(stage=stage)
    if kind == "G":
        s1 = build_generator(ModelConfig(stage=1), 1024)
        model = s1 if stage == 1 else build_generator(mcfg, 1024, stage1=s1)
    else:
        model = build_discriminator(mcfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {our_key(k): s for k, s in table.items()} == ours


@torch.no_grad()
def test_stage1_and_stage2_generators_compute_the_official_function():
    torch.manual_seed(0)
    emb, z = torch.randn(2, 1024, dtype=torch.float64), torch.randn(2, 100, dtype=torch.float64)
    for stage, table in ((1, G1), (2, G2)):
        sd = official_state(table, seed=stage, num_batches_tracked=stage == 1)  # older saves lack it
        g, mcfg, s1cfg, text_dim = convert_official_g(sd, stage)
        assert (text_dim, mcfg.gf_dim, mcfg.z_dim, mcfg.cond_dim) == (1024, 128, 100, 128)
        g = g.double()
        sd64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
        torch.manual_seed(5)
        out, mu, _ = g(emb, z)
        torch.manual_seed(5)
        eps = [torch.randn(2, 128, dtype=torch.float64) for _ in range(stage)]
        ref, ref_mu = ref_stage1_g(sd64, emb, z, eps[0]) if stage == 1 else ref_stage2_g(sd64, emb, z, *eps)
        assert out.shape == (2, 3, 64 * 4 ** (stage - 1), 64 * 4 ** (stage - 1))
        torch.testing.assert_close(mu, ref_mu, rtol=0, atol=1e-12)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)
        assert out.std() > 0.05  # not a saturated or constant image
    assert s1cfg is not None and s1cfg.stage == 1 and mcfg.r_num == 4


@torch.no_grad()
def test_discriminators_compute_the_official_logits():
    torch.manual_seed(0)
    for stage, table in ((1, D1), (2, D2)):
        sd = official_state(table, seed=10 + stage)
        d, mcfg = convert_official_d(sd, stage)
        assert (mcfg.df_dim, mcfg.cond_dim) == (64, 128)
        d = d.double()
        sd64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
        img = torch.randn(2, 3, 64 * 4 ** (stage - 1), 64 * 4 ** (stage - 1), dtype=torch.float64)
        cond = torch.randn(2, 128, dtype=torch.float64)
        out = d(img, cond)
        ref_cond, ref_uncond = ref_d(sd64, img, cond)
        torch.testing.assert_close(out.cond, ref_cond, rtol=1e-9, atol=1e-9)
        if stage == 2:
            torch.testing.assert_close(out.uncond, ref_uncond, rtol=1e-9, atol=1e-9)
        else:
            assert out.uncond is None and ref_uncond is None


def test_a_wrong_shape_or_an_unknown_key_is_refused_with_the_key_named():
    sd = official_state(G1, seed=0)
    bad = dict(sd, **{"upsample2.1.weight": torch.zeros(256, 512, 4, 4)})
    with pytest.raises(ConvertError, match=r"'upsample2\.1\.weight' has shape \(256, 512, 4, 4\)"
                                           r".*needs \(256, 512, 3, 3\)"):
        convert_official_g(bad, 1)
    with pytest.raises(ConvertError, match=r"unknown key 'upsample5\.1\.weight'"):
        convert_official_g(dict(sd, **{"upsample5.1.weight": torch.zeros(3)}), 1)
    with pytest.raises(ConvertError, match=r"missing 1 weight.*img\.0\.weight"):
        convert_official_g({k: v for k, v in sd.items() if k != "img.0.weight"}, 1)
    with pytest.raises(ConvertError, match=r"stage-II netG .*no 'STAGE1_G\.ca_net\.fc\.weight'"):
        convert_official_g(sd, 2)  # a stage-I file given as stage II


def test_cli_converts_an_official_pair_that_sample_and_evaluate_use(tmp_path):
    """The user's path: .pth files as torch.save wrote them, the CLI, then stackgan.sample and
    stackgan.evaluate on shards of 1024-d char-CNN-RNN embeddings (prepared from a replica)."""
    from stackgan.data import prepare as prep
    from tests.test_cub_layout import make_replica

    g_sd, d_sd = official_state(G1, seed=3), official_state(D1, seed=4)
    torch.save(g_sd, tmp_path / "netG_epoch_120.pth")
    torch.save(d_sd, tmp_path / "netD_epoch_last.pth")
    out = tmp_path / "official" / "export"
    cmd = [sys.executable, "-m", "stackgan.convert", "--from-official", str(tmp_path / "netG_epoch_120.pth"),
           "--netD", str(tmp_path / "netD_epoch_last.pth"), "--stage", "1", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    meta = json.loads((out / "generator.json").read_text())
    assert (meta["stage"], meta["text_encoder"], meta["text_dim"]) == (1, "char-CNN-RNN", 1024)
    assert meta["config"]["converted_from"]["epoch"] == 120
    weights = load_file(str(out / "generator.safetensors"))
    assert all(torch.equal(weights[our_key(k)], v) for k, v in g_sd.items())
    d = build_discriminator(ModelConfig(stage=1))
    d.load_state_dict(load_file(str(out / "discriminator.safetensors")))
    assert torch.equal(d.state_dict()["get_cond_logits.outlogits.0.weight"],
                       d_sd["get_cond_logits.outlogits.0.weight"])

    rep = make_replica(tmp_path / "data", dim=1024)
    shards = tmp_path / "shards"
    args = ["--cub-root", str(rep["cub_root"]), "--out", str(shards), "--workers", "1", "--quiet"]
    assert prep.main(args) == 0
    r = subprocess.run([sys.executable, "-m", "stackgan.sample", "--export", str(out), "--split", "test",
                        "--shards", str(shards), "--limit", "2", "--n", "2", "--out", str(tmp_path / "gen")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "gen" / "prompts.json").read_text())["stage"] == 1
    assert len(list((tmp_path / "gen").rglob("*.png"))) >= 4
    jsonl = tmp_path / "m.jsonl"
    r = subprocess.run([sys.executable, "-m", "stackgan.evaluate", "--export",
                        str(out / "generator.safetensors"), "--shards", str(shards), "--metrics", "diversity", "--diversity-captions", "2",
                        "--diversity-z", "2", "--jsonl", str(jsonl)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads(jsonl.read_text().splitlines()[-1])
    assert rec["metric"] == "diversity" and rec["score"] > 0


def test_a_checkpoint_converts_to_the_export_the_trainer_wrote(tiny_stage1_run, tmp_path):
    """``--from-checkpoint`` on the run's last checkpoint gives the trainer's own export at that
    step, tensor for tensor (EMA weights, standing BatchNorm statistics); a folder without a
    checkpoint is refused with its path and exit status 2."""
    ck = tiny_stage1_run / "checkpoints" / "step-00000002"

    def convert(source, out, *more):
        return subprocess.run([sys.executable, "-m", "stackgan.convert", "--from-checkpoint", str(source),
                               "--out", str(out), *more],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)

    p = convert(ck, tmp_path / "ck2")
    assert p.returncode == 0, p.stderr[-2000:]
    ours = load_file(tmp_path / "ck2" / "generator.safetensors")
    trainers = load_file(tiny_stage1_run / "export" / "generator.safetensors")
    assert ours.keys() == trainers.keys() and any("running_mean" in k for k in ours)
    assert all(torch.equal(ours[k], trainers[k]) for k in ours), [
        k for k in ours if not torch.equal(ours[k], trainers[k])]
    info = json.loads((tmp_path / "ck2" / "generator.json").read_text())
    assert info["step"] == 2 and info["stage"] == 1
    # the earlier rule: the EMA's statistics as copied from the live G (what the checkpoint holds)
    p = convert(ck, tmp_path / "copied", "--bn-stats", "copied")
    assert p.returncode == 0, p.stderr[-2000:]
    copied = load_file(tmp_path / "copied" / "generator.safetensors")
    state = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
    stats = [k for k in copied if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(copied[k], state["G"][k].float()) for k in stats)  # the live G's
    weights = [k for k in copied if k not in stats and "num_batches" not in k]
    assert all(torch.equal(copied[k], ours[k]) for k in weights)  # the same EMA weights
    assert any(not torch.equal(copied[k], ours[k]) for k in stats)  # standing statistics are not these
    bad = convert(tmp_path, tmp_path / "x")
    assert bad.returncode == 2 and "not a checkpoint folder" in bad.stderr and str(tmp_path) in bad.stderr
