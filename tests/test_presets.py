"""The CUB presets are the networks they are named for: parameter counts equal the official
codes' (facts below, with the arithmetic from the official layer shapes), the TF birds stage-I
generator trains, and the TF stage II's discriminator has no unconditional head."""
from __future__ import annotations

import pytest
import torch

from stackgan.config import ConfigError, load_config
from stackgan.export import load_generator, save_export
from stackgan.losses import d_loss, g_loss
from stackgan.models import Stage2D, TFStage1G, build_discriminator, build_generator, count_parameters

from .conftest import ROOT

TEXT_DIM = 1024  # the char-CNN-RNN embeddings of CUB

# hanzhanggit/StackGAN-Pytorch (code/model.py), counted from its modules (issue 24):
PYTORCH = {"G1": 10_301_248, "D2": 71_269_122}

# hanzhanggit/StackGAN (TensorFlow; stageI/model.py, stageII/model.py, misc/custom_ops.py), trainable variables
# (BN moving mean/variance are not trainable there, buffers here). custom_conv2d has no bias,
# custom_fully_connected has one; conv_batch_norm / fc_batch_norm have gamma + beta. gf=128, df=64, ef=128, z=100.
# Stage-I g_net: CA fc 1024*256+256 = 262,400; fc (128+100)*16384+16384 = 3,751,936, BN 32,768;
#   residual at 4x4: 1x1 1024*256 + 3x3 256*256*9 + 3x3 256*1024*9 = 3,211,264, BNs 512+512+2048 -> 3,214,336;
#   up to 8: 3x3 1024*512*9 = 4,718,592 + BN 1,024; residual at 8x8: 512*128 + 128*128*9 + 128*512*9 = 802,816
#   + BNs 256+256+1024 -> 804,352; up to 16: 512*256*9 + 512 = 1,180,160; up to 32: 256*128*9 + 256 = 295,168;
#   up to 64: 128*3*9 = 3,456. Sum 14,264,192.
# Stage-I d_net: context fc 1024*128+128 = 131,200; convs 4x4: 3*64*16 = 3,072, 64*128*16 + 256 = 131,328,
#   128*256*16 + 512 = 524,800, 256*512*16 + 1024 = 2,098,176; residual 804,352 (as in G's 8x8 one with df);
#   head: 1x1 640*512 + 1,024 = 328,704, 4x4 512*1*16 = 8,192. Sum 4,029,824.
# Stage-II hr_g_net (the trained part; the stage-I g_net is restored, not trained): CA 262,400; encoder
#   3*128*9 = 3,456, 128*256*16 + 512 = 524,800, 256*512*16 + 1024 = 2,098,176; joint 640*512*9 + 1024 =
#   2,950,144; 4 residual blocks 4 * (2 * 512*512*9 + 2 * 1024) = 18,882,560; up 512*256*9+512 = 1,180,160,
#   256*128*9+256 = 295,168, 128*64*9+128 = 73,856, 64*32*9+64 = 18,496; out 32*3*9 = 864. Sum 26,290,080.
# Stage-II hr_d_net: context 131,200; convs 4x4 3,072 + 131,328 + 524,800 + 2,098,176 + (512*1024*16 + 2048 =
#   8,390,656) + (1024*2048*16 + 4096 = 33,558,528); 1x1 2048*1024 + 2048 = 2,099,200; 1x1 1024*512 + 1024 =
#   525,312; residual 804,352; head 328,704 + 8,192. Sum 48,603,520.
TF = {"G1": 14_264_192, "D1": 4_029_824, "G2": 26_290_080, "D2": 48_603_520}


def _nets(config: str, stage1: torch.nn.Module | None = None):
    cfg = load_config(ROOT / "configs" / config)
    torch.manual_seed(0)
    return cfg, build_generator(cfg.model, TEXT_DIM, stage1=stage1), build_discriminator(cfg.model, TEXT_DIM)


def test_pytorch_preset_counts():
    _, g1, _ = _nets("cub_pytorch_stage1.yaml")
    assert count_parameters(g1) == PYTORCH["G1"]
    _, g2, d2 = _nets("cub_pytorch_stage2.yaml", stage1=g1)
    assert count_parameters(d2) == PYTORCH["D2"] and d2.get_uncond_logits is not None
    assert count_parameters(g2, trainable_only=True) == TF["G2"]  # the two codes' stage-II Gs are the same size


def test_tf_preset_counts():
    cfg, g1, d1 = _nets("cub_tf_stage1.yaml")
    assert isinstance(g1, TFStage1G) and cfg.data.emb_k == 4 and cfg.loss.wrong == "class"
    assert count_parameters(g1) == TF["G1"] and count_parameters(d1) == TF["D1"]
    _, g2, d2 = _nets("cub_tf_stage2.yaml", stage1=g1)
    assert count_parameters(g2, trainable_only=True) == TF["G2"] and count_parameters(d2) == TF["D2"]


def test_old_names_are_the_pytorch_presets():
    for stage in (1, 2):
        assert load_config(ROOT / f"configs/cub_stage{stage}.yaml") == \
            load_config(ROOT / f"configs/cub_pytorch_stage{stage}.yaml")


def test_tf_stage1_generator_trains():
    """Forward/backward through the full-size TF stage-I G and D as the preset builds them: 64-px
    images in [-1, 1], every parameter gets a gradient, the KL term uses log-sigma (std = exp(s))."""
    cfg, g, d = _nets("cub_tf_stage1.yaml")
    emb, z = torch.randn(4, TEXT_DIM), torch.randn(4, cfg.model.z_dim)
    img, mu, logvar = g(emb, z)
    assert img.shape == (4, 3, 64, 64) and img.abs().max() <= 1
    assert (logvar < 0).any()  # leaky CA: log-variance can go below 0 (the PyTorch ReLU CA cannot)
    real = d(torch.rand(4, 3, 64, 64) * 2 - 1, emb, emb.roll(1, 0))
    fake = d(img, emb)
    assert real.uncond is None and fake.cond.shape == (4,)
    (g_loss(fake) + d_loss(real, d(img.detach(), emb))[0]).backward()
    for net in (g, d):
        silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not silent, silent


def test_tf_stage2_has_no_uncond_head(tmp_path):
    """Stage II of the TF family: D without an unconditional head, the loss without its terms, and
    a stage I loaded from a TF export (small widths; the preset's own sizes are counted above)."""
    small = ["model.gf_dim=16", "model.df_dim=8", "model.z_dim=8", "model.cond_dim=8", "model.r_num=1"]
    c1 = load_config(ROOT / "configs/cub_tf_stage1.yaml", small)
    torch.manual_seed(0)
    g1 = build_generator(c1.model, TEXT_DIM)
    g1.eval()
    path = save_export(tmp_path / "g1.pt", g1, c1.model, text_encoder="x", text_dim=TEXT_DIM, step=0, config={})
    loaded, _ = load_generator(path)
    emb, z = torch.randn(3, TEXT_DIM), torch.randn(3, 8)
    torch.manual_seed(1)
    a = g1(emb, z)[0]
    torch.manual_seed(1)
    assert torch.equal(a, loaded(emb, z)[0]) and isinstance(loaded, TFStage1G)

    c2 = load_config(ROOT / "configs/cub_tf_stage2.yaml", small)
    g2, d2 = build_generator(c2.model, TEXT_DIM, stage1=loaded), build_discriminator(c2.model, TEXT_DIM)
    assert isinstance(d2, Stage2D) and d2.get_uncond_logits is None
    assert not any("uncond" in n for n, _ in d2.named_parameters())
    img = g2(emb, z)[0]
    real, fake = d2(torch.rand(3, 3, 256, 256) * 2 - 1, emb, emb.roll(1, 0)), d2(img, emb)
    assert real.uncond is None and fake.uncond is None
    loss, stats = d_loss(real, fake)
    assert "loss_uncond_real" not in stats
    torch.testing.assert_close(loss, stats["loss_real"] + (stats["loss_wrong"] + stats["loss_fake"]) / 2)
    g_loss(d2(img, emb)).backward()
    assert all(p.grad is not None for n, p in g2.named_parameters() if p.requires_grad)


def test_tf_family_needs_its_parts():
    for bad in ("model.d_cond=mu", "model.ca_act=relu", "model.g_film=true"):
        with pytest.raises(ConfigError, match="model.family=tf"):
            load_config(ROOT / "configs/cub_tf_stage1.yaml", [bad])
