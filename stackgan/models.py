"""StackGAN generators and discriminators, a faithful port of the official architecture.

Layer for layer this is the official StackGAN-Pytorch network (CA-Net, Stage-I G/D,
Stage-II G/D), with three changes that the distributed mixed-precision trainer needs and one for speed:

* discriminators end in **logits** (no ``Sigmoid``): the losses use
  ``binary_cross_entropy_with_logits``, which autocast accepts;
* a discriminator runs **every head inside ``forward``** and returns a :class:`DOut`:
  ``D(img, cond, wrong_cond=None)`` encodes the images once, then gives the conditional
  logits, the unconditional logits (stage II) and, when ``wrong_cond`` is given, the
  logits of the same images paired with the wrong conditions. DDP only synchronises what
  runs in ``forward``, so no head may be called from outside.
* Stage II **freezes its Stage-I generator itself** (``requires_grad`` off, kept in eval
  mode even when the stage-II model is put in train mode, run under ``no_grad``), so
  neither its weights nor its BatchNorm statistics can move.
* the official ``upBlock`` (nearest x2 upsample, then a 3x3 conv) is **computed as one
  4x4 stride-2 transposed conv** with the same weights (:class:`UpsampleConv3x3`): the
  same function, 16 instead of 36 multiply-adds per input pixel.

State-dict keys are not the official ones everywhere: the official generators hold their
up-blocks as ``upsample1..4`` (here one ``upsample`` Sequential, ``upsample.0..3``) and stage II
its stage-I generator as ``STAGE1_G`` (here ``stage1``); with the default options every other key,
the discriminators' included, is the same. ``python -m stackgan.convert --from-official`` maps them.

``model.family=tf`` builds the TensorFlow birds networks of the paper instead (hanzhanggit/StackGAN):
:class:`TFStage1G` (bottleneck residual blocks at 4x4 and 8x8), discriminators whose encoders end
in a bottleneck residual block and whose logit head joins code and text with a 1x1 conv, D's own
text embedding, the log-sigma CA-Net, and no unconditional head in stage II's D. Stage II's
generator is the same network in both codes. Parameter counts of both families are checked
against the official codes in ``tests/test_presets.py``.

Conventions kept from the official code: the generator input is ``cat(noise, c_code)``;
CA-Net applies a ReLU to the whole ``fc`` output, so ``mu >= 0`` and ``logvar >= 0``
(std >= 1) -- a quirk of the original kept for fidelity; the discriminator is conditioned
on the (detached) CA mean ``mu`` of the generator, shape ``(B, cond_dim)``.

Initialisation (official ``weights_init``): conv and linear weights N(0, 0.02), BatchNorm
weight N(1, 0.02), biases 0 (the official code leaves the only conv bias -- the 4x4 logit
conv -- at PyTorch's default; here it is 0).

Spectral norm (``ModelConfig.spectral_norm``): every conv of D is wrapped with
``torch.nn.utils.parametrizations.spectral_norm`` and D's BatchNorm layers are
**removed** (as in SN-GAN: BN's data-dependent rescaling undoes the Lipschitz bound, and a
D without BN has no batch statistics to keep in sync across D's several forward passes
per step). Convs that lose their BN get a bias in its place.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.parametrizations import spectral_norm as _sn

from stackgan.config import ModelConfig, image_size
from stackgan.words import WORD_DIM, Words

__all__ = [
    "CANet",
    "CODE_DIM",
    "DOut",
    "UpsampleConv3x3",
    "WordAttention",
    "Stage1D",
    "Stage1G",
    "Stage2D",
    "Stage2G",
    "TFStage1G",
    "FAMILIES",
    "build_discriminator",
    "build_generator",
    "count_parameters",
    "init_weights",
    "upsample_conv3x3",
]


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------
def conv3x3(cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=bias)


# Nearest x2 upsampling followed by a 3x3 conv is exactly one 4x4 stride-2 transposed conv:
# per output phase the upsampled 3-tap kernel touches 2 input rows, and the taps landing on
# the same row add up. Per axis K = (w2, w1+w2, w0+w1, w0); 16 instead of 36 multiply-adds
# per input pixel and no 4x larger intermediate map.
_UPMIX = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def upsample_conv3x3(x: Tensor, weight: Tensor, mix: Tensor | None = None) -> Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)``, computed
    as one transposed conv (same result up to float rounding). ``mix``: :data:`_UPMIX` already
    on the weight's device (a module passes its buffer: no host copy per forward on a GPU)."""
    a = (_UPMIX if mix is None else mix).to(device=weight.device, dtype=weight.dtype)
    k = torch.matmul(torch.matmul(a, weight), a.t()).transpose(0, 1)  # (cin, cout, 4, 4)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    k = k.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    return F.conv_transpose2d(x, k, stride=2, padding=1)


class UpsampleConv3x3(nn.Conv2d):
    """A bias-free 3x3 conv of the x2 nearest-upsampled input (see :func:`upsample_conv3x3`).

    Parameters and state-dict keys are those of the plain ``nn.Conv2d`` it replaces, so
    checkpoints of either form load into the other (the mixing constant is a non-persistent
    buffer: it moves with the module, and stays out of the state dict). Maps smaller than
    ``min_size`` take the plain path (on 4x4 inputs the rewrite gains nothing).
    """

    min_size = 8

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("upmix", _UPMIX.clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < self.min_size:
            return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), self.weight, padding=1)
        return upsample_conv3x3(x, self.weight, self.upmix)


def up_block(cin: int, cout: int) -> nn.Sequential:
    """x2 nearest upsample + conv3x3, BN, ReLU (the official ``upBlock``; index 0 is kept as an
    ``Identity`` where the official ``Upsample`` sits, so the indices inside a block are the
    official ones; the blocks themselves are named differently, see the module docstring)."""
    return nn.Sequential(
        nn.Identity(),
        UpsampleConv3x3(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus identity, then ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.block(x) + x)


def film_layers(cond_dim: int, upsample: nn.Sequential) -> nn.ModuleList:
    """``model.g_film`` (not in StackGAN, which feeds the condition only into G's first layer):
    one linear map per up-block giving a scale and shift of its normalised map,
    ``h * (1 + g(c)) + b(c)`` (feature-wise modulation, as conditional BN / DF-GAN), so every
    scale sees the text."""
    return nn.ModuleList(nn.Linear(cond_dim, 2 * block[1].out_channels) for block in upsample)


def zero_film(film: nn.ModuleList | None) -> None:
    """Start the modulation at zero: the generator begins as the plain one (after init_weights)."""
    for m in film or ():
        nn.init.zeros_(m.weight)


def up_with_film(upsample: nn.Sequential, film: nn.ModuleList | None, h: Tensor, c: Tensor,
                 skips: dict[int, Tensor] | None = None) -> Tensor:
    """Run the up-blocks, each modulated by the condition ``c`` when ``film`` is given;
    ``skips[i]`` is concatenated to block i's input (stage II's U-Net skips)."""
    if film is None and not skips:
        return upsample(h)
    for i, (_, conv, bn, relu) in enumerate(upsample):
        if skips and i in skips:
            h = torch.cat((h, skips[i].to(h.dtype)), 1)
        h = bn(conv(h))
        if film is not None:
            scale, shift = film[i](c).to(h.dtype)[:, :, None, None].chunk(2, 1)
            h = h * (1 + scale) + shift
        h = relu(h)
    return h


class WordAttention(nn.Module):
    """``model.word_attn`` (AttnGAN's attention; not in StackGAN): every pixel of G's map reads
    its caption's words, ``softmax_j(h_i . e_j / sqrt(C))`` over the real word pieces of the
    words projected into the map's channels, and adds what it read through a 1x1 conv that
    starts at zero, so G starts as the one without words. The sentence embedding carries
    "which colours"; the words give each place of the image a chance to pick its own."""

    def __init__(self, channels: int, word_dim: int = WORD_DIM):
        super().__init__()
        self.proj = nn.Linear(word_dim, channels, bias=False)  # AttnGAN's 1x1 conv on the word features
        self.out = nn.Conv2d(channels, channels, 1)

    def weights(self, h: Tensor, words: Words) -> tuple[Tensor, Tensor]:
        """(attention (B, H*W, T), projected words (B, T, C)); padding places get weight 0."""
        e = self.proj(words.vectors.to(h.dtype))
        q = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        logits = (q @ e.transpose(1, 2)).float() / h.shape[1] ** 0.5
        logits = logits.masked_fill(~words.mask[:, None, :], float("-inf"))
        return logits.softmax(-1), e

    def forward(self, h: Tensor, words: Words) -> Tensor:
        att, e = self.weights(h, words)
        read = (att.to(e.dtype) @ e).transpose(1, 2).reshape(h.shape)
        return h + self.out(read)


def init_weights(module: nn.Module) -> None:
    """The official StackGAN initialisation, applied to every layer under ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters; ``trainable_only`` skips frozen ones."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _check_input(name: str, t: Tensor, shape: tuple[int | None, ...]) -> None:
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "(" + ", ".join("B" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


# --------------------------------------------------------------------------------------
# Conditioning augmentation
# --------------------------------------------------------------------------------------
class CANet(nn.Module):
    """Text embedding -> (c, mu, logvar) with c = mu + eps * exp(logvar / 2).

    ``eps`` comes from ``torch.randn_like`` (the global RNG of the tensor's device), so a
    caller that seeds that RNG controls it.

    ``log_sigma`` (the TensorFlow birds network): the second half of ``fc`` is log(sigma), not
    log(variance), and eps is a normal truncated at 2 (``tf.truncated_normal``). ``logvar`` is
    still what is returned (2 log sigma), so the KL term is the TF code's mean over elements.
    """

    def __init__(self, text_dim: int, cond_dim: int, emb_scale: float = 1.0, act: str = "relu",
                 log_sigma: bool = False):
        super().__init__()
        self.text_dim, self.cond_dim, self.emb_scale = text_dim, cond_dim, float(emb_scale)
        self.log_sigma = log_sigma
        self.fc = nn.Linear(text_dim, cond_dim * 2, bias=True)
        # "relu": official PyTorch (mu, logvar >= 0; the KL term can drive every unit to 0 and
        # cut the text off); "leaky": official TensorFlow StackGAN (leaky ReLU, slope 0.2)
        if act not in ("relu", "leaky"):
            raise ValueError(f"CANet: act must be 'relu' or 'leaky', got {act!r}")
        self.relu = nn.ReLU() if act == "relu" else nn.LeakyReLU(0.2)

    def forward(self, emb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # emb_scale: unit-norm sentence embeddings (384-d MiniLM) would leave fc's N(0, 0.02)
        # outputs ~0.02, so mu ~ 0 and D cannot tell right from wrong text; sqrt(dim) gives
        # unit variance per coordinate (see ModelConfig.emb_scale)
        x = self.relu(self.fc(emb * self.emb_scale if self.emb_scale != 1.0 else emb))
        mu, logvar = x[:, : self.cond_dim], x[:, self.cond_dim :]
        if self.log_sigma:
            logvar = 2 * logvar
            std = torch.exp(0.5 * logvar)
            eps = nn.init.trunc_normal_(torch.empty_like(std), 0.0, 1.0, -2.0, 2.0)
            return mu + eps * std, mu, logvar
        std = torch.exp(0.5 * logvar)
        return mu + torch.randn_like(std) * std, mu, logvar


# --------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------
class Stage1G(nn.Module):
    """(emb, z) -> 64x64 image; FC to 4x4x(8 gf), four upsampling blocks, tanh."""

    image_size = 64

    def __init__(self, text_dim: int, z_dim: int = 100, cond_dim: int = 128, gf_dim: int = 128,
                 emb_scale: float = 1.0, ca_act: str = "relu", film: bool = False, word_attn: bool = False):
        super().__init__()
        if gf_dim < 2 or gf_dim % 2:
            raise ValueError(f"Stage1G: gf_dim must be an even number >= 2, got {gf_dim}")
        for k, v in {"text_dim": text_dim, "z_dim": z_dim, "cond_dim": cond_dim}.items():
            if v <= 0:
                raise ValueError(f"Stage1G: {k} must be > 0, got {v}")
        self.text_dim, self.z_dim, self.cond_dim, self.gf_dim = text_dim, z_dim, cond_dim, gf_dim
        ngf = self.ngf = gf_dim * 8
        self.ca_net = CANet(text_dim, cond_dim, emb_scale, ca_act)
        self.fc = nn.Sequential(
            nn.Linear(z_dim + cond_dim, ngf * 4 * 4, bias=False),
            nn.BatchNorm1d(ngf * 4 * 4),
            nn.ReLU(inplace=True),
        )
        self.upsample = nn.Sequential(
            up_block(ngf, ngf // 2),  # 8x8
            up_block(ngf // 2, ngf // 4),  # 16x16
            up_block(ngf // 4, ngf // 8),  # 32x32
            up_block(ngf // 8, ngf // 16),  # 64x64
        )
        self.img = nn.Sequential(conv3x3(ngf // 16, 3), nn.Tanh())
        self.film = film_layers(cond_dim, self.upsample) if film else None
        self.word_attn = word_attn  # the 32- and 64-px maps attend over the caption's words
        self.attend = nn.ModuleList([WordAttention(ngf // 8), WordAttention(ngf // 16)]) if word_attn else None
        init_weights(self)
        zero_film(self.film)
        for a in self.attend or ():
            nn.init.zeros_(a.out.weight)

    def forward(self, emb: Tensor, z: Tensor, words: Words | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``words`` (:func:`stackgan.words.word_vectors` of the captions): needed with
        ``model.word_attn``, ignored without."""
        _check_input("Stage1G emb", emb, (None, self.text_dim))
        _check_input("Stage1G z", z, (emb.shape[0], self.z_dim))
        c, mu, logvar = self.ca_net(emb)
        h = self.fc(torch.cat((z, c), 1)).view(-1, self.ngf, 4, 4)  # official order: (noise, c_code)
        if self.attend is None:
            return self.img(up_with_film(self.upsample, self.film, h, c)), mu, logvar
        if words is None:
            raise ValueError("Stage1G: this generator attends over its captions' words (model.word_attn): "
                             "pass words=stackgan.words.word_vectors(captions)")
        _check_input("Stage1G words", words.vectors, (emb.shape[0], None, WORD_DIM))
        film = self.film
        h = up_with_film(self.upsample[:2], film and film[:2], h, c)  # 16 px
        for i, attend in zip((2, 3), self.attend):  # 32 and 64 px: up, then read the words
            h = attend(up_with_film(self.upsample[i:i + 1], film and film[i:i + 1], h, c), words)
        return self.img(h), mu, logvar


class Bottleneck(nn.Module):
    """The TensorFlow birds code's residual block: 1x1 conv to ``mid`` channels, two 3x3 convs
    back to ``channels`` (each with BN, activations between), added to the input, then the
    activation (ReLU in G, LeakyReLU 0.2 in D). Without BN (spectral norm) the convs get biases."""

    def __init__(self, channels: int, mid: int, act: nn.Module, bn: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
        self.block = nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=not bn), norm(mid), act,
            conv3x3(mid, mid, bias=not bn), norm(mid), act,
            conv3x3(mid, channels, bias=not bn), norm(channels),
        )
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.block(x) + x)


class TFStage1G(Stage1G):
    """The stage-I generator of the TensorFlow birds code (``model.family=tf``):
    FC (with bias) + BN to 4x4x(8 gf) without a ReLU, a bottleneck residual block at 4x4,
    an up-block without ReLU to 8x8 (4 gf), a bottleneck residual block at 8x8, up-blocks to 16
    (2 gf) and 32 (gf), and one upsampling 3x3 conv to the 64-px RGB image. Its input is
    ``cat(c_code, noise)`` (the TF order) and its CA-Net has the TF leaky log-sigma form."""

    def __init__(self, text_dim: int, z_dim: int = 100, cond_dim: int = 128, gf_dim: int = 128,
                 emb_scale: float = 1.0):
        nn.Module.__init__(self)
        if gf_dim < 1:
            raise ValueError(f"TFStage1G: gf_dim must be >= 1, got {gf_dim}")
        for k, v in {"text_dim": text_dim, "z_dim": z_dim, "cond_dim": cond_dim}.items():
            if v <= 0:
                raise ValueError(f"TFStage1G: {k} must be > 0, got {v}")
        self.text_dim, self.z_dim, self.cond_dim, self.gf_dim = text_dim, z_dim, cond_dim, gf_dim
        ngf = self.ngf = gf_dim * 8
        self.ca_net = CANet(text_dim, cond_dim, emb_scale, "leaky", log_sigma=True)
        self.fc = nn.Sequential(nn.Linear(cond_dim + z_dim, ngf * 4 * 4), nn.BatchNorm1d(ngf * 4 * 4))
        self.res4 = Bottleneck(ngf, gf_dim * 2, nn.ReLU(inplace=True))
        up8 = up_block(ngf, gf_dim * 4)
        up8[3] = nn.Identity()  # node2_0 has no ReLU before its residual sum
        self.upsample = nn.Sequential(
            up8,  # 8x8
            Bottleneck(gf_dim * 4, gf_dim, nn.ReLU(inplace=True)),
            up_block(gf_dim * 4, gf_dim * 2),  # 16x16
            up_block(gf_dim * 2, gf_dim),  # 32x32
        )
        self.img = nn.Sequential(UpsampleConv3x3(gf_dim, 3, kernel_size=3, padding=1, bias=False), nn.Tanh())
        self.film, self.word_attn, self.attend = None, False, None
        init_weights(self)

    def forward(self, emb: Tensor, z: Tensor, words: Words | None = None) -> tuple[Tensor, Tensor, Tensor]:
        _check_input("Stage1G emb", emb, (None, self.text_dim))
        _check_input("Stage1G z", z, (emb.shape[0], self.z_dim))
        c, mu, logvar = self.ca_net(emb)
        h = self.fc(torch.cat((c, z), 1)).view(-1, self.ngf, 4, 4)  # TF order: (c_code, noise)
        return self.img(self.upsample(self.res4(h))), mu, logvar


class Stage2G(nn.Module):
    """(emb, z) -> 256x256 image, refining a frozen Stage-I image of the same (emb, z).

    The Stage-I generator is frozen here: its parameters stop requiring grad, it stays in
    eval mode whatever ``train()`` is called with, and it runs under ``no_grad``.

    ``upsample_skip`` (``model.upsample_skip``, not in StackGAN): stage II refines rather than
    redraws. The output is the stage-I image upsampled bicubically plus a correction,
    ``tanh(atanh(up) + r)``, whose last convolution starts at zero, so stage II starts exactly
    at the baseline it has to beat; the correction's head sees that upsampled image next to
    G's features, and the decoder gets the encoder's 64- and 32-px maps (U-Net skips), so
    edges can be placed where the 64-px image has them. The official G draws a new image from
    its 16x16 code, which must first relearn the whole bird (docs/quality.md, "Stage II").
    ``film`` (``model.g_film``): the condition modulates every up-block, as in stage I.
    """

    image_size = 256

    def __init__(self, stage1: Stage1G, text_dim: int, cond_dim: int = 128, gf_dim: int = 128,
                 r_num: int = 4, emb_scale: float = 1.0, ca_act: str = "relu", film: bool = False,
                 upsample_skip: bool = False, ca_log_sigma: bool = False):
        super().__init__()
        if not isinstance(stage1, Stage1G):
            raise TypeError(f"Stage2G: stage1 must be a Stage1G, got {type(stage1).__name__}")
        if stage1.text_dim != text_dim:
            raise ValueError(
                f"Stage2G: text_dim {text_dim} differs from the stage-I generator's {stage1.text_dim}"
            )
        if gf_dim < 4 or gf_dim % 4:
            raise ValueError(f"Stage2G: gf_dim must be a multiple of 4, got {gf_dim}")
        if cond_dim <= 0 or r_num < 0:
            raise ValueError(f"Stage2G: need cond_dim > 0 and r_num >= 0, got {cond_dim}, {r_num}")
        self.text_dim, self.z_dim, self.cond_dim = text_dim, stage1.z_dim, cond_dim
        self.gf_dim, self.r_num, self.upsample_skip = gf_dim, r_num, upsample_skip
        ngf = gf_dim
        self.ca_net = CANet(text_dim, cond_dim, emb_scale, ca_act, log_sigma=ca_log_sigma)
        self.encoder = nn.Sequential(
            conv3x3(3, ngf),
            nn.ReLU(inplace=True),
            nn.Conv2d(ngf, ngf * 2, 4, 2, 1, bias=False),  # 32x32
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(ngf * 2, ngf * 4, 4, 2, 1, bias=False),  # 16x16
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(inplace=True),
        )
        self.hr_joint = nn.Sequential(
            conv3x3(cond_dim + ngf * 4, ngf * 4),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(inplace=True),
        )
        self.residual = nn.Sequential(*[ResBlock(ngf * 4) for _ in range(r_num)])
        extra = (ngf * 2, ngf) if upsample_skip else (0, 0)  # the encoder's 32- and 64-px maps
        self.upsample = nn.Sequential(
            up_block(ngf * 4, ngf * 2),  # 32
            up_block(ngf * 2 + extra[0], ngf),  # 64
            up_block(ngf + extra[1], ngf // 2),  # 128
            up_block(ngf // 2, ngf // 4),  # 256
        )
        self.film = film_layers(cond_dim, self.upsample) if film else None
        if upsample_skip:  # the correction, from G's features and the upsampled stage-I image
            self.img = nn.Sequential(conv3x3(ngf // 4 + 3, ngf // 4), nn.ReLU(inplace=True), conv3x3(ngf // 4, 3))
        else:
            self.img = nn.Sequential(conv3x3(ngf // 4, 3), nn.Tanh())
        init_weights(self)  # before attaching stage1, so its loaded weights are untouched
        zero_film(self.film)
        if upsample_skip:
            nn.init.zeros_(self.img[-1].weight)
        stage1.requires_grad_(False)
        stage1.eval()
        self.stage1 = stage1

    def train(self, mode: bool = True) -> "Stage2G":
        super().train(mode)
        self.stage1.eval()
        return self

    @property
    def word_attn(self) -> bool:
        """Its stage-I generator attends over the captions' words (then ``words`` is needed)."""
        return getattr(self.stage1, "word_attn", False)

    @torch.no_grad()
    def low_res(self, emb: Tensor, z: Tensor, words: Words | None = None) -> Tensor:
        """The frozen Stage-I image (B, 3, 64, 64) for (emb, z), without autograd history."""
        return self.stage1(emb, z, words)[0].detach()

    def forward(self, emb: Tensor, z: Tensor | None, words: Words | None = None,
                low: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """256-px images for (emb, z); ``low`` (B, 3, 64, 64) replaces the stage-I images (the
        real 64-px crops of ``loss.recon_coef``), and ``z`` is then not needed. ``words``: for
        a stage-I generator with ``model.word_attn``."""
        if low is None:
            low = self.low_res(emb, z, words)  # checks emb and z
        else:
            _check_input("Stage2G emb", emb, (None, self.text_dim))
            _check_input("Stage2G low", low, (emb.shape[0], 3, 64, 64))
        c, mu, logvar = self.ca_net(emb)
        e64 = self.encoder[:2](low)
        e32 = self.encoder[2:5](e64)
        h = self.encoder[5:](e32)
        cmap = c.view(-1, self.cond_dim, 1, 1).expand(-1, -1, h.shape[2], h.shape[3])
        h = self.residual(self.hr_joint(torch.cat((h, cmap.to(h.dtype)), 1)))
        if not self.upsample_skip:
            return self.img(up_with_film(self.upsample, self.film, h, c)), mu, logvar
        h = up_with_film(self.upsample, self.film, h, c, skips={1: e32, 2: e64})
        base = F.interpolate(low.float(), scale_factor=4, mode="bicubic", align_corners=False).clamp(-0.99, 0.99)
        r = self.img(torch.cat((h, base.to(h.dtype)), 1)).float()
        return torch.tanh(torch.atanh(base) + r), mu, logvar


# --------------------------------------------------------------------------------------
# Discriminators
# --------------------------------------------------------------------------------------
FAMILIES = ("pytorch", "tf")  # model.family: the official PyTorch (COCO) or TensorFlow (birds) networks
CODE_DIM = 128  # size of D's image and text codes for the contrastive loss (loss.contrastive_coef)
WORD_CODE_DIM = 64  # size of D's region and word codes for the word-region loss (loss.word_coef)


class DOut(NamedTuple):
    """Discriminator logits, each (B,): conditional, unconditional (stage II), wrong pairs;
    with the code heads (``code_dim``) also the unit-norm image and text codes, each (B,
    code_dim), for :func:`stackgan.losses.contrastive_loss`; with a species head
    (``num_classes``) its logits, (B, num_classes), for ``class_loss``; with an attribute head
    (``num_attributes``) its logits, (B, num_attributes), for ``attribute_loss``; with word codes
    (``word_codes``, when ``words`` are given to D) region and word codes for ``word_region_loss``."""

    cond: Tensor
    uncond: Tensor | None = None
    wrong: Tensor | None = None
    img_code: Tensor | None = None
    txt_code: Tensor | None = None
    cls_logits: Tensor | None = None
    attr_logits: Tensor | None = None
    regions: Tensor | None = None  # (B, 16, WORD_CODE_DIM) unit codes of the 4x4 map's places (loss.word_coef)
    word_codes: Tensor | None = None  # (B, T, WORD_CODE_DIM) unit codes of the caption's words


def _down(cin: int, cout: int, bn: bool, k: int = 4, s: int = 2, p: int = 1) -> list[nn.Module]:
    """conv (+BN) + LeakyReLU(0.2); without BN (spectral norm) the conv gets a bias."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, p, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


class DLogits(nn.Module):
    """The official ``D_GET_LOGITS``: 4x4 image code (+ tiled condition) -> one logit. The
    TensorFlow code joins code and condition with a 1x1 conv (``k=1``) and its 4x4 logit conv
    has no bias (``bias=False``)."""

    def __init__(self, ndf: int, nef: int, bcondition: bool, sn: bool = False, k: int = 3, bias: bool = True):
        super().__init__()
        self.nef, self.bcondition = nef, bcondition
        if bcondition:
            self.outlogits = nn.Sequential(
                *_down(ndf * 8 + nef, ndf * 8, bn=not sn, k=k, s=1, p=k // 2),
                nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4, bias=bias),
            )
        else:
            self.outlogits = nn.Sequential(nn.Conv2d(ndf * 8, 1, kernel_size=4, stride=4, bias=bias))

    def forward(self, h: Tensor, c: Tensor | None = None) -> Tensor:
        if self.bcondition:
            c = c.to(h.dtype).view(-1, self.nef, 1, 1).expand(-1, -1, h.shape[2], h.shape[3])
            h = torch.cat((h, c), 1)
        return self.outlogits(h).flatten()


class _Discriminator(nn.Module):
    """The official heads on a stage's image encoder, plus optional heads on its 4x4 code (all
    off by default): image/text codes whose batch similarities train both nets to tell which
    caption an image belongs to (``code_dim``; XMC-GAN style), a species classifier
    (``num_classes``; AC-GAN), and an attribute head (``num_attributes``): a linear read of the
    whole 4x4 code, not its mean, so a part's place (crown on top, tail at the back) can count;
    region and word codes (``word_codes``): each of the 16 places of the 4x4 code and each word
    of the caption in one space, for AttnGAN's word-region matching (``loss.word_coef``)."""

    image_size: int
    uncond: bool  # stage II's unconditional (realism only) head (the PyTorch code's; the TF code has none)

    def __init__(self, df_dim: int = 64, cond_dim: int = 128, spectral_norm: bool = False, text_dim: int = 0,
                 emb_scale: float = 1.0, code_dim: int = 0, num_classes: int = 0, family: str = "pytorch",
                 num_attributes: int = 0, word_codes: bool = False):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"{type(self).__name__}: family must be one of {FAMILIES}, got {family!r}")
        if family == "tf" and text_dim <= 0:
            raise ValueError(f"{type(self).__name__}: the TF family's D embeds the text itself (needs text_dim)")
        self.family = family
        self.uncond = self.uncond and family == "pytorch"
        tf = family == "tf"
        if df_dim <= 0 or cond_dim <= 0:
            raise ValueError(f"{type(self).__name__}: df_dim and cond_dim must be > 0, got {df_dim}, {cond_dim}")
        if code_dim < 0 or num_classes < 0 or num_attributes < 0:
            raise ValueError(f"{type(self).__name__}: code_dim, num_classes and num_attributes must be >= 0")
        self.df_dim, self.cond_dim, self.spectral_norm = df_dim, cond_dim, spectral_norm
        # text_dim > 0: D embeds the raw text itself (official TensorFlow StackGAN) instead of
        # taking G's CA mean mu (official PyTorch), which the KL term keeps pulling towards 0
        self.emb_scale = float(emb_scale)
        self.text_proj = (nn.Sequential(nn.Linear(text_dim, cond_dim), nn.LeakyReLU(0.2, inplace=True))
                          if text_dim > 0 else None)
        self.in_dim = text_dim if text_dim > 0 else cond_dim
        encoder = self._tf_encoder if tf else self._encoder
        self.encode_img = nn.Sequential(*encoder(df_dim, not spectral_norm, spectral_norm))
        self.get_cond_logits = DLogits(df_dim, cond_dim, bcondition=True, sn=spectral_norm, k=1 if tf else 3,
                                       bias=not tf)
        self.get_uncond_logits = DLogits(df_dim, cond_dim, bcondition=False) if self.uncond else None
        self.img_code = nn.Linear(df_dim * 8, code_dim) if code_dim > 0 else None
        self.txt_code = nn.Linear(cond_dim, code_dim) if code_dim > 0 else None
        self.classify = nn.Linear(df_dim * 8, num_classes) if num_classes > 0 else None
        self.attributes = nn.Linear(df_dim * 8 * 16, num_attributes) if num_attributes > 0 else None
        self.region_code = nn.Conv2d(df_dim * 8, WORD_CODE_DIM, 1) if word_codes else None
        self.word_code = nn.Linear(WORD_DIM, WORD_CODE_DIM) if word_codes else None
        init_weights(self)
        if spectral_norm:  # after init, so the N(0, 0.02) draw is the un-normalised weight
            for m in list(self.modules()):
                if isinstance(m, nn.Conv2d):
                    _sn(m)

    def _encoder(self, ndf: int, bn: bool, sn: bool) -> list[nn.Module]:
        raise NotImplementedError

    def _tf_encoder(self, ndf: int, bn: bool, sn: bool) -> list[nn.Module]:
        raise NotImplementedError

    def forward(self, img: Tensor, cond: Tensor, wrong_cond: Tensor | None = None,
                words: Words | None = None) -> DOut:
        """``words``: the captions' word vectors, for the region and word codes (``word_codes``)."""
        s = self.image_size
        _check_input(f"{type(self).__name__} img", img, (None, 3, s, s))
        _check_input(f"{type(self).__name__} cond", cond, (img.shape[0], self.in_dim))
        if wrong_cond is not None:
            _check_input(f"{type(self).__name__} wrong_cond", wrong_cond, (img.shape[0], self.in_dim))
        if self.text_proj is not None:
            cond = self.text_proj(cond * self.emb_scale)
            wrong_cond = None if wrong_cond is None else self.text_proj(wrong_cond * self.emb_scale)
        h = self.encode_img(img)
        cond_logits = self.get_cond_logits(h, cond)
        wrong = None if wrong_cond is None else self.get_cond_logits(h, wrong_cond)
        uncond = None if self.get_uncond_logits is None else self.get_uncond_logits(h)
        img_code = txt_code = cls_logits = attr_logits = None
        if self.attributes is not None:
            attr_logits = self.attributes(h.float().flatten(1))
        if self.img_code is not None or self.classify is not None:
            pooled = h.float().mean((2, 3))
            if self.img_code is not None:
                img_code = F.normalize(self.img_code(pooled), dim=1)
                txt_code = F.normalize(self.txt_code(cond.float()), dim=1)
            if self.classify is not None:
                cls_logits = self.classify(pooled)
        regions = word_codes = None
        if self.region_code is not None:
            if words is None:
                raise ValueError(f"{type(self).__name__}: D has word codes (loss.word_coef > 0): pass words")
            regions = F.normalize(self.region_code(h).float().flatten(2).transpose(1, 2), dim=-1)
            word_codes = F.normalize(self.word_code(words.vectors.float()), dim=-1)
        return DOut(cond_logits, uncond, wrong, img_code, txt_code, cls_logits, attr_logits, regions, word_codes)

    def text_codes(self, text: Tensor) -> Tensor:
        """Unit text codes of raw text embeddings (N, text_dim), as ``forward`` makes them:
        the contrastive loss's extra negative captions (``loss.contrastive_bank``)."""
        if self.txt_code is None or self.text_proj is None:
            raise ValueError(f"{type(self).__name__}.text_codes needs loss.contrastive_coef > 0 and model.d_cond=text")
        _check_input(f"{type(self).__name__}.text_codes text", text, (None, self.in_dim))
        return F.normalize(self.txt_code(self.text_proj(text * self.emb_scale).float()), dim=1)


class Stage1D(_Discriminator):
    """64x64 image + condition -> conditional logits (the official stage-I D has no
    unconditional head)."""

    image_size = 64
    uncond = False

    def _encoder(self, ndf: int, bn: bool, sn: bool) -> list[nn.Module]:
        return [
            nn.Conv2d(3, ndf, 4, 2, 1, bias=sn),  # 32
            nn.LeakyReLU(0.2, inplace=True),
            *_down(ndf, ndf * 2, bn),  # 16
            *_down(ndf * 2, ndf * 4, bn),  # 8
            *_down(ndf * 4, ndf * 8, bn),  # 4
        ]

    def _tf_encoder(self, ndf: int, bn: bool, sn: bool) -> list[nn.Module]:
        # the TF code has no activation after the third conv, none after the fourth before the residual sum
        return [
            nn.Conv2d(3, ndf, 4, 2, 1, bias=sn),  # 32
            nn.LeakyReLU(0.2, inplace=True),
            *_down(ndf, ndf * 2, bn),  # 16
            *_down(ndf * 2, ndf * 4, bn)[:-1],  # 8
            *_down(ndf * 4, ndf * 8, bn)[:-1],  # 4
            Bottleneck(ndf * 8, ndf * 2, nn.LeakyReLU(0.2, inplace=True), bn),
        ]


class Stage2D(_Discriminator):
    """256x256 image + condition -> conditional and unconditional logits (the TF family: conditional
    only)."""

    image_size = 256
    uncond = True

    def _encoder(self, ndf: int, bn: bool, sn: bool) -> list[nn.Module]:
        return [
            nn.Conv2d(3, ndf, 4, 2, 1, bias=sn),  # 128
            nn.LeakyReLU(0.2, inplace=True),
            *_down(ndf, ndf * 2, bn),  # 64
            *_down(ndf * 2, ndf * 4, bn),  # 32
            *_down(ndf * 4, ndf * 8, bn),  # 16
            *_down(ndf * 8, ndf * 16, bn),  # 8
            *_down(ndf * 16, ndf * 32, bn),  # 4
            *_down(ndf * 32, ndf * 16, bn, k=3, s=1, p=1),
            *_down(ndf * 16, ndf * 8, bn, k=3, s=1, p=1),
        ]

    def _tf_encoder(self, ndf: int, bn: bool, sn: bool) -> list[nn.Module]:
        return [
            nn.Conv2d(3, ndf, 4, 2, 1, bias=sn),  # 128
            nn.LeakyReLU(0.2, inplace=True),
            *_down(ndf, ndf * 2, bn),  # 64
            *_down(ndf * 2, ndf * 4, bn),  # 32
            *_down(ndf * 4, ndf * 8, bn),  # 16
            *_down(ndf * 8, ndf * 16, bn),  # 8
            *_down(ndf * 16, ndf * 32, bn),  # 4
            *_down(ndf * 32, ndf * 16, bn, k=1, s=1, p=0),
            *_down(ndf * 16, ndf * 8, bn, k=1, s=1, p=0)[:-1],  # no activation before the residual sum
            Bottleneck(ndf * 8, ndf * 2, nn.LeakyReLU(0.2, inplace=True), bn),
        ]


# --------------------------------------------------------------------------------------
# Factories (what the trainer, sampling and exports use)
# --------------------------------------------------------------------------------------
def _family(mcfg: ModelConfig) -> str:
    if mcfg.family not in FAMILIES:
        raise ValueError(f"model.family must be one of {FAMILIES}, got {mcfg.family!r}")
    if mcfg.family == "tf" and (mcfg.d_cond != "text" or mcfg.ca_act != "leaky" or mcfg.g_film):
        raise ValueError("model.family=tf is the TF birds network: it needs model.d_cond=text, model.ca_act=leaky "
                         "and model.g_film=false")
    return mcfg.family


def _stage(mcfg: ModelConfig) -> int:
    if mcfg.stage not in (1, 2):
        raise ValueError(f"model.stage must be 1 or 2, got {mcfg.stage!r}")
    return mcfg.stage


def build_generator(mcfg: ModelConfig, text_dim: int, stage1: nn.Module | None = None) -> nn.Module:
    """Stage-I or Stage-II generator for ``mcfg.stage``; stage II needs the Stage-I G.

    For stage II, ``mcfg.z_dim`` must equal the Stage-I generator's (both run on the same
    noise); the Stage-I widths come from its own export and may differ from ``mcfg``.
    """
    stage = _stage(mcfg)
    if text_dim <= 0:
        raise ValueError(f"build_generator: text_dim must be > 0 (resolve it from the shards), got {text_dim}")
    tf = _family(mcfg) == "tf"
    if stage == 1:
        if stage1 is not None:
            raise ValueError("build_generator: stage1 is only used for model.stage=2")
        if tf:
            return TFStage1G(text_dim, mcfg.z_dim, mcfg.cond_dim, mcfg.gf_dim, mcfg.emb_scale)
        return Stage1G(text_dim, mcfg.z_dim, mcfg.cond_dim, mcfg.gf_dim, mcfg.emb_scale, mcfg.ca_act, mcfg.g_film,
                       mcfg.word_attn)
    if stage1 is None:
        raise ValueError("build_generator: model.stage=2 needs the stage-I generator (stage1=...)")
    if not isinstance(stage1, Stage1G):
        raise TypeError(f"build_generator: stage1 must be a Stage1G, got {type(stage1).__name__}")
    if stage1.z_dim != mcfg.z_dim:
        raise ValueError(f"model.z_dim={mcfg.z_dim} differs from the stage-I generator's z_dim {stage1.z_dim}")
    return Stage2G(stage1, text_dim, mcfg.cond_dim, mcfg.gf_dim, mcfg.r_num, emb_scale=mcfg.emb_scale,
                   ca_act=mcfg.ca_act, film=mcfg.g_film, upsample_skip=mcfg.upsample_skip, ca_log_sigma=tf)


def build_discriminator(mcfg: ModelConfig, text_dim: int = 0, code_dim: int = 0, num_classes: int = 0,
                        num_attributes: int = 0, word_codes: bool = False) -> nn.Module:
    """Stage-I or Stage-II discriminator. Its condition input is G's ``mu`` (cond_dim) when
    ``mcfg.d_cond == "mu"`` (official PyTorch), the raw text embedding (text_dim) when "text".
    ``code_dim`` > 0 adds the contrastive code heads (the trainer passes :data:`CODE_DIM` when
    ``loss.contrastive_coef`` > 0), ``num_classes`` > 0 the species head (``loss.class_coef``),
    ``num_attributes`` > 0 the attribute head (``loss.attr_coef``), ``word_codes`` the region and
    word codes (``loss.word_coef``)."""
    cls = Stage1D if _stage(mcfg) == 1 else Stage2D
    assert cls.image_size == image_size(mcfg.stage)
    if mcfg.d_cond == "text" and text_dim <= 0:
        raise ValueError("build_discriminator: model.d_cond=text needs the text dim")
    return cls(mcfg.df_dim, mcfg.cond_dim, mcfg.spectral_norm, text_dim=text_dim if mcfg.d_cond == "text" else 0,
               emb_scale=mcfg.emb_scale, code_dim=code_dim, num_classes=num_classes, family=_family(mcfg),
               num_attributes=num_attributes, word_codes=word_codes)
