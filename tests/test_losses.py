"""Losses against hand-computed references, wrong-pair selection, the diversity score."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stackgan.config import ModelConfig
from stackgan.diversity import UNIFORM_L1, diversity_score, pairwise_l1
from stackgan.losses import d_loss, g_loss, kl_loss, recon_loss, wrong_indices
from stackgan.models import DOut, build_generator

REAL = [2.0, -0.5, 0.3]
WRONG = [0.7, -1.2, 0.1]
FAKE = [-1.5, 0.4, 1.1]
U_REAL = [1.0, 0.2, -0.3]
U_FAKE = [-0.8, 0.9, 0.0]


def t(xs):
    return torch.tensor(xs, dtype=torch.float32)


def mean(xs):
    return sum(xs) / len(xs)


def bce_pos(xs):  # -log sigmoid(x), plain math
    return mean([-math.log(1 / (1 + math.exp(-x))) for x in xs])


def bce_neg(xs):  # -log(1 - sigmoid(x))
    return mean([-math.log(1 - 1 / (1 + math.exp(-x))) for x in xs])


def sig_mean(xs):
    return mean([1 / (1 + math.exp(-x)) for x in xs])


def test_kl_matches_closed_form():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(kl_loss(mu, logvar), torch.distributions.kl_divergence(q, p).mean())
    assert kl_loss(torch.zeros(3, 2), torch.zeros(3, 2)).item() == 0
    with pytest.raises(ValueError, match="shape"):
        kl_loss(torch.zeros(3, 2), torch.zeros(3, 3))


def test_d_loss_stage1_bce_reference():
    loss, st = d_loss(DOut(t(REAL), None, t(WRONG)), DOut(t(FAKE)), "bce")
    ref = bce_pos(REAL) + (bce_neg(WRONG) + bce_neg(FAKE)) / 2
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert st["d_real"].item() == pytest.approx(sig_mean(REAL), rel=1e-5)
    assert st["d_wrong"].item() == pytest.approx(sig_mean(WRONG), rel=1e-5)
    assert st["d_fake"].item() == pytest.approx(sig_mean(FAKE), rel=1e-5)
    assert st["loss_wrong"].item() == pytest.approx(bce_neg(WRONG), rel=1e-5)
    assert "loss_uncond_real" not in st and not any(v.requires_grad for v in st.values())


def test_d_loss_stage2_bce_reference():
    real = DOut(t(REAL), t(U_REAL), t(WRONG))
    fake = DOut(t(FAKE), t(U_FAKE))
    loss, st = d_loss(real, fake, "bce")
    # the official compute_discriminator_loss, written out
    official = (bce_pos(REAL) + bce_pos(U_REAL)) / 2 + (bce_neg(FAKE) + bce_neg(WRONG) + bce_neg(U_FAKE)) / 3
    assert loss.item() == pytest.approx(official, rel=1e-5)
    assert st["d_uncond_fake"].item() == pytest.approx(sig_mean(U_FAKE), rel=1e-5)


def test_hinge_reference():
    relu = lambda x: max(0.0, x)  # noqa: E731
    real, fake = DOut(t(REAL), t(U_REAL), t(WRONG)), DOut(t(FAKE), t(U_FAKE))
    loss, st = d_loss(real, fake, "hinge")
    r = mean([relu(1 - x) for x in REAL])
    ur = mean([relu(1 - x) for x in U_REAL])
    w = mean([relu(1 + x) for x in WRONG])
    f = mean([relu(1 + x) for x in FAKE])
    uf = mean([relu(1 + x) for x in U_FAKE])
    assert loss.item() == pytest.approx((r + ur) / 2 + (f + w + uf) / 3, rel=1e-5)
    assert st["d_real"].item() == pytest.approx(mean(REAL), rel=1e-5)  # raw logits for hinge
    loss1, _ = d_loss(DOut(t(REAL), None, t(WRONG)), DOut(t(FAKE)), "hinge")
    assert loss1.item() == pytest.approx(r + (w + f) / 2, rel=1e-5)
    assert g_loss(fake, "hinge").item() == pytest.approx(-mean(FAKE) - mean(U_FAKE), rel=1e-5)


def test_g_loss_bce_reference():
    assert g_loss(DOut(t(FAKE)), "bce").item() == pytest.approx(bce_pos(FAKE), rel=1e-5)
    got = g_loss(DOut(t(FAKE), t(U_FAKE)), "bce").item()
    assert got == pytest.approx(bce_pos(FAKE) + bce_pos(U_FAKE), rel=1e-5)


def test_losses_are_float32_and_differentiable_from_bf16_logits():
    x = t(FAKE).bfloat16().requires_grad_()
    loss = g_loss(DOut(x))
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    extreme = DOut(t([80.0, -80.0]), None, t([80.0, -80.0]))
    assert torch.isfinite(d_loss(extreme, DOut(t([80.0, -80.0])))[0])  # no log(0)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="wrong"):
        d_loss(DOut(t(REAL)), DOut(t(FAKE)))
    with pytest.raises(ValueError, match="kind"):
        g_loss(DOut(t(FAKE)), "wgan")
    with pytest.raises(ValueError, match="unconditional"):
        d_loss(DOut(t(REAL), t(U_REAL), t(WRONG)), DOut(t(FAKE)))


# ---- wrong pairs ----------------------------------------------------------------------
def test_wrong_indices_shift_and_perm():
    cls = torch.tensor([3, 3, 5, 7])
    idx, same = wrong_indices(cls, "shift")
    assert idx.tolist() == [1, 2, 3, 0] and same == 1
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx, same = wrong_indices(cls, "perm", g)
        assert sorted(idx.tolist()) == [0, 1, 2, 3]
        assert same == int((cls[idx] == cls).sum())
    a = wrong_indices(cls, "perm", torch.Generator().manual_seed(1)).index
    b = wrong_indices(cls, "perm", torch.Generator().manual_seed(1)).index
    assert torch.equal(a, b)


def test_wrong_indices_class_never_pairs_same_class_when_avoidable():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        cls = torch.randint(0, 4, (16,), generator=g)
        idx, same = wrong_indices(cls, "class", g)
        avoidable = torch.tensor([(cls != c).any() for c in cls])
        assert not (cls[idx] == cls)[avoidable].any()
        assert same == int((~avoidable).sum())
    cls = torch.tensor([1, 1, 1, 2, 2])  # image 0 must draw uniformly from {3, 4}
    counts = torch.zeros(5)
    for _ in range(400):
        counts[wrong_indices(cls, "class", g).index[0]] += 1
    assert counts[3] + counts[4] == 400 and 140 < counts[3] < 260


def test_wrong_indices_class_falls_back_to_shift_for_one_species():
    idx, same = wrong_indices(torch.tensor([4, 4, 4]), "class", torch.Generator().manual_seed(0))
    assert idx.tolist() == [1, 2, 0] and same == 3
    idx, same = wrong_indices(torch.tensor([4, 4, 4, 9]), "class", torch.Generator().manual_seed(0))
    assert idx[:3].tolist() == [3, 3, 3] and idx[3].item() in (0, 1, 2) and same == 0


def test_wrong_indices_bad_input():
    with pytest.raises(ValueError, match="mode"):
        wrong_indices(torch.tensor([1, 2]), "random")
    with pytest.raises(ValueError, match="integer"):
        wrong_indices(torch.tensor([1.0, 2.0]), "shift")


# ---- diversity ------------------------------------------------------------------------
def test_pairwise_l1_normalisation():
    x = torch.rand(1, 1, 3, 32, 32).expand(4, 3, 3, 32, 32)
    assert pairwise_l1(x).abs().max().item() == 0  # identical samples -> 0
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(8, 4, 3, 32, 32, generator=g) * 2 - 1
    assert (pairwise_l1(noise).mean() / UNIFORM_L1).item() == pytest.approx(1.0, abs=0.02)
    a, b = torch.rand(2, 5, generator=g).unbind(0)
    assert pairwise_l1(torch.stack([a, b])[None]).item() == pytest.approx((a - b).abs().mean().item(), rel=1e-5)


def test_diversity_score_on_a_generator():
    torch.manual_seed(0)
    G = build_generator(ModelConfig(stage=1, z_dim=6, cond_dim=5, gf_dim=8), 7)
    G.train()
    emb = torch.randn(3, 7)
    bn_before = {k: v.clone() for k, v in G.state_dict().items()}
    rng = torch.get_rng_state()
    s1 = diversity_score(G, emb, 4, torch.Generator().manual_seed(1))
    s2 = diversity_score(G, emb, 4, torch.Generator().manual_seed(1))
    assert s1 == s2 and 0 < s1 < 2
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG stream is untouched
    assert G.training and all(torch.equal(v, G.state_dict()[k]) for k, v in bn_before.items())
    with torch.no_grad():  # a collapsed G: output independent of noise and condition
        G.fc[0].weight.zero_()
    assert diversity_score(G, emb, 4, torch.Generator().manual_seed(1)) == 0
    with pytest.raises(ValueError, match="z_per_caption"):
        diversity_score(G, emb, 1, torch.Generator())


def test_contrastive_loss_rewards_own_caption():
    from stackgan.losses import contrastive_loss

    torch.manual_seed(0)
    codes = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    matched = contrastive_loss(DOut(t([0.0] * 6), img_code=codes, txt_code=codes))
    swapped = contrastive_loss(DOut(t([0.0] * 6), img_code=codes, txt_code=codes.roll(1, 0)))
    assert matched.item() < 0.5 * math.log(6) < math.log(6) < swapped.item()
    # chance: all codes equal -> every caption equally likely
    same = torch.nn.functional.normalize(torch.ones(6, 16), dim=1)
    chance = contrastive_loss(DOut(t([0.0] * 6), img_code=same, txt_code=same))
    assert chance.item() == pytest.approx(math.log(6), rel=1e-5)
    with pytest.raises(ValueError, match="contrastive_coef"):
        contrastive_loss(DOut(t([0.0] * 6)))


def test_class_loss_rewards_the_right_species():
    from stackgan.losses import class_loss

    logits = torch.eye(4) * 8  # image i reads as species i
    target = torch.arange(4)
    right = class_loss(DOut(t([0.0] * 4), cls_logits=logits), target)
    wrong = class_loss(DOut(t([0.0] * 4), cls_logits=logits), target.roll(1))
    assert right < 0.01 and wrong > 7
    with pytest.raises(ValueError, match="species head"):
        class_loss(DOut(t([0.0] * 4)), target)
    with pytest.raises(ValueError, match="class indices"):
        class_loss(DOut(t([0.0] * 4), cls_logits=logits), target[:3])


def test_contrastive_bank_adds_negatives_and_skips_same_class():
    """At chance (all codes equal) an image picks its caption among B + K captions: the bank
    raises the image->caption term from log B to log(B + K); bank captions and batch captions
    of the image's own class are not negatives."""
    from stackgan.losses import contrastive_loss

    same = torch.nn.functional.normalize(torch.ones(4, 8), dim=1)
    out = DOut(t([0.0] * 4), img_code=same, txt_code=same)
    bank = same[:1].expand(12, 8)
    labels = torch.tensor([0, 1, 2, 3])
    base = contrastive_loss(out)
    with_bank = contrastive_loss(out, labels, bank, torch.full((12,), 9))
    assert base.item() == pytest.approx(math.log(4), rel=1e-5)
    assert with_bank.item() == pytest.approx((math.log(16) + math.log(4)) / 2, rel=1e-5)
    # every bank caption shares image 0's class: image 0 sees 4 candidates, the others 16
    masked = contrastive_loss(out, labels, bank, torch.zeros(12, dtype=torch.long))
    assert masked.item() == pytest.approx((math.log(4) + 3 * math.log(16)) / 8 + math.log(4) / 2, rel=1e-5)
    # fakes as negatives for the caption->image side: log B -> log 2B there
    with_fakes = contrastive_loss(out, fake_codes=same)
    assert with_fakes.item() == pytest.approx((math.log(4) + math.log(8)) / 2, rel=1e-5)
    # two images of one class: neither counts the other's caption as a negative
    pair = contrastive_loss(out, torch.tensor([0, 0, 1, 2]))
    assert pair.item() == pytest.approx((2 * math.log(3) + 2 * math.log(4)) / 4, rel=1e-5)


def test_caption_bank_is_a_fifo_and_round_trips():
    from stackgan.losses import CaptionBank

    bank = CaptionBank(5, 2)
    assert len(bank.get()[0]) == 0
    bank.push(torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2]))
    bank.push(torch.arange(6.0, 12.0).view(3, 2), torch.tensor([3, 4, 5]))
    emb, cls = bank.get()
    assert len(emb) == 5 and sorted(cls.tolist()) == [1, 2, 3, 4, 5]  # the oldest (class 0) went first
    assert torch.equal(emb[cls == 5], torch.tensor([[10.0, 11.0]]))
    copy = CaptionBank(5, 2)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.get()[0], emb) and (copy.n, copy.ptr) == (bank.n, bank.ptr)
    with pytest.raises(ValueError, match="bank"):
        CaptionBank(4, 2).load_state_dict(bank.state_dict())


def test_recon_loss_is_the_mean_absolute_difference():
    real = torch.rand(2, 3, 8, 8) * 2 - 1
    assert recon_loss(real, real).item() == 0
    assert recon_loss(real + 0.25, real).item() == pytest.approx(0.25, rel=1e-5)
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(real, 2), scale_factor=2)
    assert recon_loss(blurred, real) > 0
    with pytest.raises(ValueError, match="shapes"):
        recon_loss(real[:, :, :4], real)


def _reference_attribute_loss(logits, labels, groups, stated=None):
    """Row by row: the mean over groups of the mean CE of the rows that count in each group."""
    per_group = []
    for idx in groups:
        rows = []
        for b in range(len(logits)):
            t = labels[b, idx].float()
            if (len(idx) > 1 and t.sum() == 0) or (stated is not None and not stated[b, idx].any()):
                continue
            if len(idx) == 1:
                rows.append(torch.nn.functional.binary_cross_entropy_with_logits(logits[b, idx], t))
            else:
                rows.append(-(t / t.sum() * torch.log_softmax(logits[b, idx], 0)).sum())
        if rows:
            per_group.append(torch.stack(rows).mean())
    return torch.stack(per_group).mean()


def test_attribute_loss_counts_only_the_groups_a_caption_states():
    """G is asked only for what its caption says: a caption that states no crown colour gives no
    crown loss (and no gradient there); D's real-image loss (no ``stated``) counts every
    labelled group, skipping rows with no label in a group."""
    from stackgan.data.captions import caption_groups, stated_mask
    from stackgan.losses import attribute_loss

    names = ["has_crown_color::red", "has_crown_color::blue", "has_crown_color::yellow",
             "has_wing_color::red", "has_wing_color::blue", "has_size::small"]
    groups = [[0, 1, 2], [3, 4], [5]]
    labels = torch.tensor([[1, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 1]])
    captions = ["this bird has blue wings", "a bird with a blue crown", "a bird"]
    stated = torch.from_numpy(np.stack([stated_mask(c, caption_groups(names), len(names)) for c in captions]))
    assert stated.tolist()[0] == [False, False, False, True, True, False]  # the wings only
    torch.manual_seed(0)
    logits = torch.randn(3, 6, requires_grad=True)
    loss = attribute_loss(logits, labels, groups, stated=stated)
    loss.backward()
    g = logits.grad
    assert g[0, [0, 1, 2, 5]].abs().sum() == 0 and g[0, [3, 4]].abs().sum() > 0  # no crown loss for row 0
    assert g[1, [3, 4, 5]].abs().sum() == 0 and g[1, [0, 1, 2]].abs().sum() > 0
    assert g[2].abs().sum() == 0  # states nothing
    assert torch.allclose(loss, _reference_attribute_loss(logits, labels, groups, stated))
    assert attribute_loss(logits, labels, groups, stated=torch.zeros_like(stated)) == 0

    everything = attribute_loss(logits, labels, groups)  # row 2 has no crown label: skipped there only
    assert torch.allclose(everything, _reference_attribute_loss(logits, labels, groups))
    assert not torch.allclose(everything, loss)
    bf16 = attribute_loss(logits.detach().bfloat16(), labels, groups)
    assert bf16.dtype == torch.float32
    with pytest.raises(ValueError, match="differ"):
        attribute_loss(logits, labels[:, :5], groups)
