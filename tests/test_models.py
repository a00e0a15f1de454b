"""StackGAN models and the EMA helper: shapes, parameter counts, init, heads, freezing."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stackgan.config import ModelConfig
from stackgan.ema import EMA
from stackgan.layout import apply_layout
from stackgan.losses import d_loss, g_loss, kl_loss
from stackgan.models import (
    DOut,
    UpsampleConv3x3,
    upsample_conv3x3,
    Stage1G,
    Stage2D,
    Stage2G,
    build_discriminator,
    build_generator,
    count_parameters,
)

TEXT = 1024  # char-CNN-RNN


# ---- parameter counts from the architecture, written out independently ---------------
def conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def params_stage1_g(t, z, c, gf):
    ngf = gf * 8
    n = t * 2 * c + 2 * c  # CA fc
    n += (z + c) * ngf * 16 + bn(ngf * 16)  # fc (no bias) + BN1d
    ch = ngf
    for _ in range(4):
        n += conv(ch, ch // 2, 3) + bn(ch // 2)
        ch //= 2
    return n + conv(ch, 3, 3)


def params_stage2_g_own(t, c, gf, r):
    n = t * 2 * c + 2 * c
    n += conv(3, gf, 3) + conv(gf, 2 * gf, 4) + bn(2 * gf) + conv(2 * gf, 4 * gf, 4) + bn(4 * gf)
    n += conv(c + 4 * gf, 4 * gf, 3) + bn(4 * gf)
    n += r * 2 * (conv(4 * gf, 4 * gf, 3) + bn(4 * gf))
    for cin, cout in [(4 * gf, 2 * gf), (2 * gf, gf), (gf, gf // 2), (gf // 2, gf // 4)]:
        n += conv(cin, cout, 3) + bn(cout)
    return n + conv(gf // 4, 3, 3)


def params_cond_head(df, c):
    return conv(8 * df + c, 8 * df, 3) + bn(8 * df) + conv(8 * df, 1, 4, bias=True)


def params_stage1_d(df, c):
    n = conv(3, df, 4) + sum(conv(a, 2 * a, 4) + bn(2 * a) for a in (df, 2 * df, 4 * df))
    return n + params_cond_head(df, c)


def params_stage2_d(df, c):
    n = conv(3, df, 4)
    for a in (df, 2 * df, 4 * df, 8 * df, 16 * df):
        n += conv(a, 2 * a, 4) + bn(2 * a)
    n += conv(32 * df, 16 * df, 3) + bn(16 * df) + conv(16 * df, 8 * df, 3) + bn(8 * df)
    return n + params_cond_head(df, c) + conv(8 * df, 1, 4, bias=True)


def tiny_cfg(stage, **kw):
    base = dict(stage=stage, z_dim=6, cond_dim=5, gf_dim=8, df_dim=4, r_num=1)
    base.update(kw)
    return ModelConfig(**base)


def tiny_pair(stage, text=7, **kw):
    torch.manual_seed(0)
    g1 = build_generator(tiny_cfg(1, **kw), text)
    if stage == 1:
        return g1, build_discriminator(tiny_cfg(1, **kw))
    return build_generator(tiny_cfg(2, **kw), text, g1), build_discriminator(tiny_cfg(2, **kw))


# ---- official sizes -------------------------------------------------------------------
@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    g1 = build_generator(ModelConfig(stage=1), TEXT)
    g2 = build_generator(ModelConfig(stage=2, r_num=2), TEXT, g1)
    return g1, g2


def test_stage1_official_shapes_and_params(official):
    g1, _ = official
    d1 = build_discriminator(ModelConfig(stage=1))
    assert count_parameters(g1) == params_stage1_g(TEXT, 100, 128, 128)
    assert 9.5e6 < count_parameters(g1) < 11e6  # the "about 10M"
    assert count_parameters(d1) == params_stage1_d(64, 128)
    g1.train()
    img, mu, logvar = g1(torch.randn(3, TEXT), torch.randn(3, 100))
    assert img.shape == (3, 3, 64, 64) and mu.shape == logvar.shape == (3, 128)
    assert img.abs().max() <= 1
    out = d1(img, mu.detach(), mu.detach().roll(1, 0))
    assert isinstance(out, DOut) and out.cond.shape == out.wrong.shape == (3,) and out.uncond is None


def test_stage2_official_shapes_and_params(official):
    g1, g2 = official
    own = count_parameters(g2) - count_parameters(g1)
    assert own == params_stage2_g_own(TEXT, 128, 128, 2)
    assert 16e6 < own < 18e6  # the "about 17M beyond stage I"
    assert count_parameters(g2, trainable_only=True) == own  # stage I is frozen
    g4 = Stage2G(Stage1G(TEXT, gf_dim=8), TEXT, 128, 128, r_num=4)
    assert count_parameters(g4, trainable_only=True) == params_stage2_g_own(TEXT, 128, 128, 4)
    d2 = build_discriminator(ModelConfig(stage=2))
    assert count_parameters(d2) == params_stage2_d(64, 128)
    g2.train()
    with torch.no_grad():
        img, mu, _ = g2(torch.randn(2, TEXT), torch.randn(2, 100))
        assert img.shape == (2, 3, 256, 256) and mu.shape == (2, 128)
        assert g2.low_res(torch.randn(2, TEXT), torch.randn(2, 100)).shape == (2, 3, 64, 64)
        out = d2(img, mu, mu.roll(1, 0))
    assert out.cond.shape == out.uncond.shape == out.wrong.shape == (2,)


def test_init_statistics(official):
    g1, _ = official
    w = g1.upsample[0][1].weight  # 4.7M conv weights
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 5e-4
    lin = g1.ca_net.fc
    assert abs(lin.weight.std().item() - 0.02) < 5e-4 and torch.all(lin.bias == 0)
    bn1 = g1.fc[1]  # BatchNorm1d over 16384 features
    assert abs(bn1.weight.mean().item() - 1) < 1e-3 and abs(bn1.weight.std().item() - 0.02) < 1e-3
    assert torch.all(bn1.bias == 0)
    d = Stage2D(64, 128)
    for m in d.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            assert torch.all(m.bias == 0)
    big = d.encode_img[-3].weight  # conv3x3 1024 -> 512
    assert abs(big.std().item() - 0.02) < 5e-4


def test_generator_input_order_is_noise_then_condition():
    g, _ = tiny_pair(1)
    g.eval()
    with torch.no_grad():
        g.fc[0].weight[:, g.z_dim:] = 0  # cut the condition's columns: emb must not matter
        z = torch.randn(2, g.z_dim)
        a = g(torch.randn(2, 7), z)[0]
        b = g(torch.randn(2, 7), z)[0]
    assert torch.equal(a, b)


def test_ca_net_reparametrisation():
    g, _ = tiny_pair(1)
    emb = torch.randn(4, 7)
    torch.manual_seed(5)
    c, mu, logvar = g.ca_net(emb)
    torch.manual_seed(5)
    eps = torch.randn(4, g.cond_dim)
    torch.testing.assert_close(c, mu + eps * torch.exp(0.5 * logvar))
    x = torch.relu(g.ca_net.fc(emb))
    assert torch.equal(mu, x[:, :5]) and torch.equal(logvar, x[:, 5:])


@pytest.mark.parametrize("stage", [1, 2])
def test_wrong_logits_equal_a_separate_call(stage):
    _, d = tiny_pair(stage)
    d.eval()
    s = d.image_size
    img, c, w = torch.randn(3, 3, s, s), torch.randn(3, 5), torch.randn(3, 5)
    with torch.no_grad():
        both = d(img, c, wrong_cond=w)
        alone = d(img, w)
        plain = d(img, c)
    torch.testing.assert_close(both.wrong, alone.cond)
    torch.testing.assert_close(both.cond, plain.cond)
    assert plain.wrong is None
    assert (both.uncond is None) == (stage == 1)
    assert not torch.allclose(both.cond, both.wrong)  # the condition does reach the logit


def test_bad_inputs_are_refused_early():
    g, d = tiny_pair(1)
    with pytest.raises(ValueError, match="Stage1D img"):
        d(torch.randn(2, 3, 128, 128), torch.randn(2, 5))
    with pytest.raises(ValueError, match="Stage1D cond"):
        d(torch.randn(2, 3, 64, 64), torch.randn(2, 6))
    with pytest.raises(ValueError, match="Stage1G emb"):
        g(torch.randn(2, 8), torch.randn(2, 6))
    with pytest.raises(ValueError, match="needs the stage-I generator"):
        build_generator(tiny_cfg(2), 7)
    with pytest.raises(ValueError, match="z_dim"):
        build_generator(tiny_cfg(2, z_dim=9), 7, g)
    with pytest.raises(ValueError, match="text_dim"):
        build_generator(tiny_cfg(2), 8, g)


@pytest.mark.parametrize("stage", [1, 2])
def test_channels_last_matches_contiguous(stage):
    g, d = tiny_pair(stage)
    g.eval(), d.eval()
    emb, z = torch.randn(2, 7), torch.randn(2, 6)
    torch.manual_seed(1)
    ref_img = g(emb, z)[0]
    ref = d(ref_img.detach(), torch.ones(2, 5), torch.zeros(2, 5))
    g_cl = copy.deepcopy(g).to(memory_format=torch.channels_last)
    d_cl = copy.deepcopy(d).to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    img = g_cl(emb, z)[0]
    out = d_cl(img.contiguous(memory_format=torch.channels_last), torch.ones(2, 5), torch.zeros(2, 5))
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-4)
    for a, b in zip(out, ref):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    (sum(o.sum() for o in out if o is not None) + img.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d_cl.parameters())


@pytest.mark.parametrize("hw", [(6, 7), (8, 8)])
def test_up_conv_is_the_official_up_block(hw):
    """Nearest x2 upsample + 3x3 conv == the 4x4 stride-2 transposed form: values and both
    gradients, as a function and as the module the up-blocks use (also its small-map path)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, padding=1)
    m = UpsampleConv3x3(5, 4, kernel_size=3, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(w)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x, w), g, retain_graph=True)
    for new, wt in ((upsample_conv3x3(x, w), w), (m(x), m.weight),
                    (m(x.contiguous(memory_format=torch.channels_last)), m.weight)):
        assert new.shape == ref.shape
        torch.testing.assert_close(new, ref, atol=1e-10, rtol=0)
        for a, b in zip(want, torch.autograd.grad(new, (x, wt), g)):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # a wrong tap order would not pass: the flipped kernel gives another function
    assert not torch.allclose(upsample_conv3x3(x, w.flip(-1)), ref)


@pytest.mark.parametrize("stage", [1, 2])
def test_layout_keeps_the_networks(stage):
    """channels-last only on large maps: small-map layers go NCHW, outputs stay the same."""
    g, d = tiny_pair(stage)
    g2, d2 = copy.deepcopy(g), copy.deepcopy(d)
    emb, z = torch.randn(2, 7), torch.randn(2, 6)
    n_g, n_d = apply_layout(g2, d2, (emb, z), "mu", min_hw=32)
    assert n_g > 0 and n_d > 0
    convs = [m for m in g2.modules() if isinstance(m, nn.Conv2d)]
    assert any(m.weight.is_contiguous() for m in convs)  # small maps: NCHW
    assert any(not m.weight.is_contiguous() for m in convs)  # large maps: channels-last
    g.eval(), g2.eval(), d.eval(), d2.eval()
    torch.manual_seed(1)
    a, mu = g(emb, z)[:2]
    torch.manual_seed(1)
    b = g2(emb, z)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    c = torch.rand(2, 5)
    torch.testing.assert_close(d(a.detach(), c).cond, d2(b.detach().contiguous(memory_format=torch.channels_last), c).cond,
                               atol=1e-5, rtol=1e-4)
    g3, d3 = copy.deepcopy(g), copy.deepcopy(d)
    assert apply_layout(g3, d3, (emb, z), "mu", min_hw=0) == (0, 0)
    assert all(not m.weight.is_contiguous() for m in g3.modules() if isinstance(m, nn.Conv2d)
               and m.kernel_size != (1, 1))


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("sn", [False, True])
def test_bf16_autocast_forward_backward(stage, sn):
    g, d = tiny_pair(stage, spectral_norm=sn)
    g.train(), d.train()
    s = d.image_size
    emb, z = torch.randn(2, 7), torch.randn(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake, mu, logvar = g(emb, z)
        real = d(torch.rand(2, 3, s, s) * 2 - 1, mu.detach(), mu.detach().flip(0))
        fk = d(fake.detach(), mu.detach())
        ld, _ = d_loss(real, fk)
    ld.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lg = g_loss(d(fake, mu.detach())) + 2 * kl_loss(mu, logvar)
    lg.backward()
    assert ld.dtype == lg.dtype == torch.float32
    assert torch.isfinite(ld) and torch.isfinite(lg)
    for net in (g, d):
        for name, p in net.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_spectral_norm_drops_batchnorm_and_bounds_sigma():
    d = build_discriminator(tiny_cfg(1, spectral_norm=True, df_dim=8))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(hasattr(m, "parametrizations") for m in convs)
    d.train()
    with torch.no_grad():
        for _ in range(10):  # power iterations run in train-mode forwards
            d(torch.randn(2, 3, 64, 64), torch.randn(2, 5))
    d.eval()
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.reshape(m.weight.shape[0], -1), ord=2)
        assert abs(sigma.item() - 1) < 0.02


def test_stage2_uses_stage1_on_same_inputs_and_never_changes_it():
    g2, d2 = tiny_pair(2)
    g1 = g2.stage1
    before = {k: v.clone() for k, v in g1.state_dict().items()}
    own_before = {k: v.clone() for k, v in g2.named_parameters() if not k.startswith("stage1.")}
    g2.train()
    assert g2.training and not g1.training  # BN of stage I keeps its running statistics
    assert not any(p.requires_grad for p in g1.parameters())
    emb, z = torch.randn(2, 7), torch.randn(2, 6)
    torch.manual_seed(3)
    low = g2.low_res(emb, z)
    torch.manual_seed(3)
    ref = g1(emb, z)[0]
    assert torch.equal(low, ref) and not low.requires_grad
    opt = torch.optim.AdamW(g2.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        fake, mu, logvar = g2(emb, z)
        loss = g_loss(d2(fake, mu.detach())) + 2 * kl_loss(mu, logvar)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in g1.parameters())
    after = g1.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "stage-I weights or BN stats moved"
    moved = [k for k, v in g2.named_parameters() if not k.startswith("stage1.") and not torch.equal(v, own_before[k])]
    assert len(moved) == len(own_before)


# ---- EMA ----------------------------------------------------------------------------
def _perturb(model, scale=0.1):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(1.0)


def test_ema_copies_before_start_then_averages():
    g, _ = tiny_pair(1)
    ema = EMA(nn.DataParallel(g), decay=0.9, start=2, warmup=False)  # wrappers are peeled off
    assert isinstance(ema.model, Stage1G) and ema.model is not g and ema.module is ema.model
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    _perturb(g)
    ema.update(g, step=1)  # before start: a copy
    for (n, a), b in zip(ema.model.state_dict().items(), g.state_dict().values()):
        assert torch.equal(a, b), n
    old = {k: v.clone() for k, v in ema.model.named_parameters()}
    _perturb(g)
    ema.update(g, step=2)
    for k, p in g.named_parameters():
        torch.testing.assert_close(ema.model.get_parameter(k), 0.9 * old[k] + 0.1 * p.detach())
    for a, b in zip(ema.model.buffers(), g.buffers()):
        assert torch.equal(a, b)  # BN statistics are copied, not averaged


def test_ema_warmup_ramps_the_decay():
    g, _ = tiny_pair(1)
    ema = EMA(g, decay=0.995, start=5)
    assert [round(ema.decay_at(s), 4) for s in (5, 6, 105)] == [0.1, round(2 / 11, 4), round(101 / 110, 4)]
    assert ema.decay_at(10_000) == 0.995
    old = {k: v.clone() for k, v in ema.model.named_parameters()}
    _perturb(g)
    ema.update(g, step=6)  # 2/11 of the old average, 9/11 of the new weights
    for k, p in g.named_parameters():
        torch.testing.assert_close(ema.model.get_parameter(k), 2 / 11 * old[k] + 9 / 11 * p.detach())
    assert EMA(g, decay=0.995, warmup=False).decay_at(0) == 0.995


def test_ema_state_dict_roundtrip_and_stage2():
    g2, _ = tiny_pair(2)
    ema = EMA(g2, decay=0.5, start=0)
    _perturb(g2)
    ema.update(g2, step=10)
    for k, p in g2.stage1.state_dict().items():
        assert torch.equal(ema.model.stage1.state_dict()[k], p)  # frozen part: copied exactly
    other = EMA(g2, decay=0.1, start=7, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert (other.decay, other.start, other.warmup) == (0.5, 0, True)
    for k, v in ema.model.state_dict().items():
        assert torch.equal(other.model.state_dict()[k], v)
    with pytest.raises(ValueError, match="decay"):
        EMA(g2, decay=1.0)


@pytest.mark.parametrize("stage", [1, 2])
def test_contrastive_code_heads(stage):
    """Off by default (the official parameter count and keys); on, the code heads give
    unit-norm codes and get gradients from the contrastive loss."""
    from stackgan.losses import contrastive_loss

    g, d_plain = tiny_pair(stage)
    torch.manual_seed(0)
    d = build_discriminator(tiny_cfg(stage), code_dim=6)
    extra = {k for k in d.state_dict()} - {k for k in d_plain.state_dict()}
    assert extra == {"img_code.weight", "img_code.bias", "txt_code.weight", "txt_code.bias"}
    s = d.image_size
    img, cond = torch.randn(4, 3, s, s), torch.randn(4, 5)
    d.train()
    out = d(img, cond, cond.roll(1, 0))
    assert out.img_code.shape == out.txt_code.shape == (4, 6)
    torch.testing.assert_close(out.img_code.norm(dim=1), torch.ones(4))
    d.eval()
    torch.testing.assert_close(d(img, cond, cond.roll(1, 0)).wrong, d(img, cond.roll(1, 0)).cond)  # same head
    d.zero_grad()
    contrastive_loss(out).backward()
    for name in ("img_code.weight", "txt_code.weight"):
        assert d.get_parameter(name).grad.abs().sum() > 0, name
    assert d_plain(img, cond).img_code is None


@pytest.mark.parametrize("stage", [1, 2])
def test_species_head_reads_the_image_only(stage):
    """num_classes adds one linear head on the pooled code (and nothing else): its logits
    depend on the image, not on the caption, and the species loss reaches D's encoder."""
    from stackgan.losses import class_loss

    plain = build_discriminator(tiny_cfg(stage))
    d = build_discriminator(tiny_cfg(stage), num_classes=4)
    assert {k for k in d.state_dict()} - {k for k in plain.state_dict()} == {"classify.weight", "classify.bias"}
    s = d.image_size
    img = torch.randn(3, 3, s, s)
    d.eval()
    a, b = d(img, torch.randn(3, 5)), d(img, torch.randn(3, 5))
    assert a.cls_logits.shape == (3, 4) and plain(img, torch.randn(3, 5)).cls_logits is None
    torch.testing.assert_close(a.cls_logits, b.cls_logits)
    assert not torch.allclose(a.cls_logits, d(img.flip(1), torch.randn(3, 5)).cls_logits)
    d.train()
    class_loss(d(img, torch.randn(3, 5)), torch.tensor([0, 3, 1])).backward()
    assert d.encode_img[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_classes"):
        build_discriminator(tiny_cfg(stage), num_classes=-1)


def test_text_codes_match_forward():
    """The bank's captions are encoded exactly as the batch's own (D embeds raw text)."""
    torch.manual_seed(0)
    d = build_discriminator(tiny_cfg(1, d_cond="text"), text_dim=7, code_dim=6)
    d.eval()
    text = torch.randn(3, 7)
    out = d(torch.randn(3, 3, 64, 64), text)
    torch.testing.assert_close(d.text_codes(text), out.txt_code)
    with pytest.raises(ValueError, match="d_cond=text"):
        build_discriminator(tiny_cfg(1), code_dim=6).text_codes(torch.randn(3, 5))


def test_film_generator_starts_as_plain_and_conditions_every_block():
    torch.manual_seed(0)
    plain = build_generator(tiny_cfg(1), 7)
    film = build_generator(tiny_cfg(1, g_film=True), 7)
    missing = film.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("film.") for k in missing)
    emb, z = torch.randn(4, 7), torch.randn(4, 6)
    plain.eval(), film.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        a = plain(emb, z)[0]
        torch.manual_seed(1)
        b = film(emb, z)[0]
        torch.testing.assert_close(a, b)  # zero-initialised modulation = the official generator
        film.film[3].weight.normal_(0, 0.5)  # only the last (64x64) block modulated
        torch.manual_seed(1)
        c = film(emb, z)[0]
    assert not torch.allclose(a, c)
    img, _, _ = film(emb, z)
    img.mean().backward()
    assert all(m.weight.grad is not None for m in film.film)


def test_stage2_upsample_skip_starts_at_the_bicubic_baseline():
    """model.upsample_skip: before training, stage II's output is its stage-I image upsampled
    bicubically (the baseline); a real 64-px input replaces stage I's; the correction trains."""
    torch.manual_seed(0)
    g1 = build_generator(tiny_cfg(1), 7)
    g2 = build_generator(tiny_cfg(2, upsample_skip=True, g_film=True), 7, g1)
    emb, z = torch.randn(3, 7), torch.randn(3, 6)
    g2.eval()
    with torch.no_grad():
        out = g2(emb, z)[0]
        base = F.interpolate(g2.low_res(emb, z), scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, base.clamp(-0.99, 0.99), atol=1e-4, rtol=0)
    real_low = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        from_real = g2(emb, None, low=real_low)[0]
    torch.testing.assert_close(from_real, F.interpolate(real_low, scale_factor=4, mode="bicubic",
                                                        align_corners=False).clamp(-0.99, 0.99), atol=1e-4, rtol=0)
    g2.train()
    (g2(emb, z)[0] - 1).abs().mean().backward()
    assert g2.img[-1].weight.grad.abs().sum() > 0 and all(m.weight.grad is not None for m in g2.film)
    with pytest.raises(ValueError, match="low"):
        g2(emb, None, low=torch.zeros(3, 3, 32, 32))
    plain = build_generator(tiny_cfg(2), 7, g1)  # the official stage II: a new image from its 16x16 code
    assert isinstance(plain.img[1], torch.nn.Tanh) and not plain.upsample_skip


def test_ca_net_log_sigma_is_the_tf_form():
    """The TF CA-Net (family tf): the second half of the leaky FC output is log(sigma), so
    logvar = 2 s, and eps is a normal truncated at 2 (std 0.8796), as tf.truncated_normal."""
    from stackgan.models import CANet

    torch.manual_seed(0)
    ca = CANet(16, 4, act="leaky", log_sigma=True)
    emb = torch.randn(20000, 16)
    c, mu, logvar = ca(emb)
    s = F.leaky_relu(ca.fc(emb), 0.2)[:, 4:]
    torch.testing.assert_close(logvar, 2 * s)
    eps = (c - mu) / s.exp()
    assert eps.abs().max() <= 2.0 + 1e-5
    assert abs(eps.std().item() - 0.8796) < 0.01
