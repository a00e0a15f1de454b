"""StackGAN losses: matching-aware D loss, G loss, CA-Net KL, and wrong-pair selection.

Everything works on logits (``binary_cross_entropy_with_logits``), in float32 whatever
the autocast dtype of the logits, so the losses are safe under bf16/fp16 autocast.

Official weights (StackGAN-Pytorch ``compute_discriminator_loss``)::

    stage I  (no uncond head):  errD = real + (wrong + fake) / 2
    stage II (uncond head):     errD = (real + u_real) / 2 + (fake + wrong + u_fake) / 3

G (official ``compute_generator_loss``): ``bce(fake, 1) + bce(u_fake, 1)``; the step adds
``kl_coef * kl_loss(mu, logvar)`` and the recipe's terms (contrastive, species, recon).

Hinge option: the same structure with ``relu(1 - x)`` for real terms and ``relu(1 + x)``
for wrong/fake terms; G minimises ``-mean(fake) - u * mean(u_fake)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from stackgan.diversity import diversity_score  # noqa: F401  (re-exported for the trainer)
from stackgan.models import DOut

__all__ = ["CaptionBank", "WrongPairs", "attribute_loss", "class_loss", "contrastive_loss", "d_loss",
           "diversity_score", "g_loss", "kl_loss", "recon_loss", "wrong_indices", "LOSS_KINDS", "WRONG_MODES",
           "TEMPERATURE", "word_region_loss"]

LOSS_KINDS = ("bce", "hinge")
WRONG_MODES = ("class", "shift", "perm")
TEMPERATURE = 0.1  # of the contrastive loss's similarities (XMC-GAN's value)


def contrastive_loss(out: DOut, labels: Tensor | None = None,
                     bank: Tensor | None = None, bank_labels: Tensor | None = None,
                     fake_codes: Tensor | None = None, temperature: float = TEMPERATURE) -> Tensor:
    """Symmetric InfoNCE between D's image and text codes of a batch: each image must pick
    its own caption among the batch's captions, and each caption its own image. It rewards
    what the matching-aware loss only samples once per image (one wrong caption), so on fakes
    it gives G a per-caption signal; XMC-GAN (Zhang et al. 2021) uses it the same way.

    ``labels`` (B,): another caption of the image's own class describes the same bird, so such
    pairs are not counted as negatives. ``bank`` (K, dim) unit text codes with ``bank_labels``:
    extra negative captions for the image->caption side (see :class:`CaptionBank`), so an
    image must tell its caption from K + B instead of B: with 150 species a batch of 32 rarely
    holds two birds that differ in one small part only. ``fake_codes`` (B', dim): image codes
    of generated images, extra negatives for the caption->image side, so D's code prefers a
    real image to G's image of the same caption (the matching-aware idea in code space)."""
    if out.img_code is None or out.txt_code is None:
        raise ValueError("contrastive_loss: D has no code heads (set loss.contrastive_coef > 0)")
    img = out.img_code.float()
    logits = img @ out.txt_code.float().t() / temperature
    target = torch.arange(len(logits), device=logits.device)
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    to_text = logits
    if bank is not None and len(bank):
        extra = img @ bank.float().t() / temperature
        if labels is not None and bank_labels is not None:
            extra = extra.masked_fill(labels[:, None] == bank_labels[None, :], float("-inf"))
        to_text = torch.cat([logits, extra], 1)
    to_image = logits.t()
    if fake_codes is not None:
        to_image = torch.cat([to_image, out.txt_code.float() @ fake_codes.float().t() / temperature], 1)
    return (F.cross_entropy(to_text, target) + F.cross_entropy(to_image, target)) / 2


WORD_GAMMAS = (5.0, 5.0, 10.0)  # AttnGAN's birds values of DAMSM's gamma1 (region attention), gamma2, gamma3


def word_region_loss(out: DOut, mask: Tensor, labels: Tensor | None = None,
                     gammas: tuple[float, float, float] = WORD_GAMMAS) -> Tensor:
    """AttnGAN's word-region matching (DAMSM; Xu et al. 2018) in D's region and word codes
    (``loss.word_coef``): each word of caption k attends over the 16 places of image i, and
    the pair's score pools how well each word finds itself there,
    ``log(sum_j exp(g2 cos(e_j, c_ij))) / g2``; a symmetric cross-entropy over the batch's pairs
    (scaled by g3) asks each image to pick its caption and each caption its image. Unlike the
    sentence-level contrastive loss, a caption scores by its words one by one, so "red crown"
    must be found in some place of the image. ``mask`` (B, T): real word pieces; ``labels``:
    other captions of an image's own class are not counted as negatives."""
    if out.regions is None or out.word_codes is None:
        raise ValueError("word_region_loss: D has no region and word codes (set loss.word_coef > 0)")
    g1, g2, g3 = gammas
    r, w = out.regions.float(), out.word_codes.float()  # (B, N, E) images, (B, T, E) captions
    sim = torch.einsum("kte,ine->kitn", w, r)  # caption k, image i, word t, place n
    read = torch.einsum("kitn,ine->kite", (g1 * sim).softmax(-1), r)
    rel = F.cosine_similarity(read, w[:, None], dim=-1)  # (B, B, T)
    rel = rel.masked_fill(~mask[:, None, :], float("-inf"))
    score = torch.logsumexp(g2 * rel, -1) / g2  # (captions, images)
    logits = g3 * score
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def class_loss(out: DOut, targets: Tensor) -> Tensor:
    """Cross-entropy of D's species head (``loss.class_coef``).

    On real images it trains D to name the species; on G's fakes it asks G to draw the species
    its caption belongs to. A caption states two to four parts; the species fixes the others,
    and real images of a species show all of them, so only this signal tells G what the
    unstated parts look like (AC-GAN, Odena et al. 2017). D's head is trained on real images
    only: trained on fakes too, it rewards G for easy-to-classify images rather than for the
    species' real look. Its price is variety (docs/quality.md)."""
    if out.cls_logits is None:
        raise ValueError("class_loss: D has no species head (set loss.class_coef > 0)")
    if targets.dim() != 1 or len(targets) != len(out.cls_logits):
        raise ValueError(f"class_loss: targets must be ({len(out.cls_logits)},) class indices, "
                         f"got {tuple(targets.shape)}")
    return F.cross_entropy(out.cls_logits.float(), targets)


def attribute_loss(logits: Tensor, labels: Tensor, groups: list[list[int]],
                   stated: Tensor | None = None) -> Tensor:
    """Per attribute group, the cross-entropy of its logits against the image's labels: soft
    cross-entropy within a multi-value group (the positives share the target) and BCE for a
    one-attribute group; the mean over the groups that count.

    A group counts for a row when the row has a label in it and, with ``stated`` (B, A) bool,
    when the row's caption states it. D's attribute head (``loss.attr_coef``) learns from real
    images on every labelled group; G is asked only for what its caption says, as judge
    consistency scores it (:mod:`stackgan.data.captions`): a caption that names no crown
    colour gives no crown loss. The attribute judges train with the same loss (no ``stated``)."""
    if logits.shape != labels.shape:
        raise ValueError(f"attribute_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "differ")
    logits, labels = logits.float(), labels.float()
    per_group, present = [], []
    for idx in groups:  # masked sums, not boolean indexing: no host sync on a GPU
        t = labels[:, idx]
        if len(idx) == 1:
            ce = F.binary_cross_entropy_with_logits(logits[:, idx], t, reduction="none")[:, 0]
            ok = torch.ones_like(ce)
        else:
            n = t.sum(1, keepdim=True)
            ce = -((t / n.clamp(min=1)) * torch.log_softmax(logits[:, idx], 1)).sum(1)
            ok = (n[:, 0] > 0).float()
        if stated is not None:
            ok = ok * stated[:, idx].any(1).float()
        count = ok.sum()
        per_group.append((ce * ok).sum() / count.clamp(min=1))
        present.append((count > 0).float())
    if not per_group:
        return logits.sum() * 0.0
    return torch.stack(per_group).sum() / torch.stack(present).sum().clamp(min=1)


def recon_loss(refined: Tensor, real: Tensor) -> Tensor:
    """Stage II (``loss.recon_coef``): mean L1 between G's refinement of the real 64-px crops
    and the real 256-px crops they were downsampled from. Real images give stage II paired
    examples of what a 64-px bird looks like at 256 px, a signal its adversarial loss alone
    finds slowly (super-resolution GANs pair the two the same way)."""
    if refined.shape != real.shape:
        raise ValueError(f"recon_loss: shapes differ: {tuple(refined.shape)} vs {tuple(real.shape)}")
    return (refined.float() - real.float()).abs().mean()


class CaptionBank:
    """First-in-first-out store of the last ``size`` captions' text embeddings and classes,
    the extra negatives of :func:`contrastive_loss`. Only the raw embeddings are kept: D
    re-encodes them every step, so the negatives never go stale (unlike a queue of codes)."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu"):
        if size <= 0 or dim <= 0:
            raise ValueError(f"CaptionBank: size and dim must be > 0, got {size}, {dim}")
        self.emb = torch.zeros(size, dim, device=device)
        self.cls = torch.full((size,), -1, dtype=torch.long, device=device)
        self.n = 0    # filled entries
        self.ptr = 0  # next slot to overwrite

    def push(self, emb: Tensor, cls: Tensor) -> None:
        size = len(self.emb)
        emb, cls = emb.detach()[-size:], cls.detach()[-size:]
        idx = (self.ptr + torch.arange(len(emb), device=self.emb.device)) % size
        self.emb[idx] = emb.to(self.emb)
        self.cls[idx] = cls.to(self.cls)
        self.ptr = int((self.ptr + len(emb)) % size)
        self.n = min(size, self.n + len(emb))

    def get(self) -> tuple[Tensor, Tensor]:
        return self.emb[:self.n], self.cls[:self.n]

    def state_dict(self) -> dict:
        return {"emb": self.emb.cpu(), "cls": self.cls.cpu(), "n": self.n, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if state["emb"].shape != self.emb.shape:
            raise ValueError(f"CaptionBank: checkpoint bank {tuple(state['emb'].shape)} != {tuple(self.emb.shape)}")
        self.emb.copy_(state["emb"])
        self.cls.copy_(state["cls"])
        self.n, self.ptr = int(state["n"]), int(state["ptr"])


def kl_loss(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), averaged over all elements (official)."""
    if mu.shape != logvar.shape:
        raise ValueError(f"kl_loss: mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} differ in shape")
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean()


# --------------------------------------------------------------------------------------
# Wrong (mismatched) pairs
# --------------------------------------------------------------------------------------
class WrongPairs(NamedTuple):
    """``index[i]``: whose condition is paired with real image i as a mismatched pair.

    ``same_class``: how many of those pairs share the image's class (for ``class`` mode
    these are the shift fallbacks of a batch where some class fills the batch; for
    ``shift``/``perm`` it is a diagnostic). Unpack as ``idx, n_same = wrong_indices(...)``.
    """

    index: Tensor
    same_class: int


def wrong_indices(cls: Tensor, mode: str, generator: torch.Generator | None = None) -> WrongPairs:
    """Pick the wrong condition for every real image of a batch.

    * ``shift``: j = (i + 1) % B (the official PyTorch code pairs image i with text i+1);
    * ``perm``: a uniformly random permutation (the seed; may pair i with itself);
    * ``class``: a uniformly random j with ``cls[j] != cls[i]`` (official TensorFlow draws
      wrong images of another class); where no such j exists, falls back to shift.

    Random draws come from ``generator`` (else the global RNG of ``cls``'s device); the
    number of draws does not depend on the labels, so the RNG stream stays reproducible.
    """
    if mode not in WRONG_MODES:
        raise ValueError(f"wrong_indices: mode must be one of {WRONG_MODES}, got {mode!r}")
    if cls.dim() != 1 or cls.numel() == 0 or cls.dtype.is_floating_point:
        raise ValueError(f"wrong_indices: cls must be a non-empty 1-D integer tensor, got {cls.dtype} {tuple(cls.shape)}")
    dev = generator.device if generator is not None else cls.device
    c = cls.to(dev)
    b = c.numel()
    shift = (torch.arange(b, device=dev) + 1) % b
    if mode == "shift":
        idx = shift
    elif mode == "perm":
        idx = torch.randperm(b, generator=generator, device=dev)
    else:
        other = c[:, None] != c[None, :]
        scores = torch.rand(b, b, generator=generator, device=dev).masked_fill(~other, -1.0)
        idx = torch.where(other.any(1), scores.argmax(1), shift)
    same = int((c[idx] == c).sum())
    return WrongPairs(idx.to(cls.device), same)


# --------------------------------------------------------------------------------------
# Adversarial losses
# --------------------------------------------------------------------------------------
def _check_kind(kind: str) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")


def _pos(x: Tensor, kind: str) -> Tensor:
    """Loss pushing logits x towards 'real / matching'."""
    x = x.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(x, torch.ones_like(x))
    return F.relu(1.0 - x).mean()


def _neg(x: Tensor, kind: str) -> Tensor:
    """Loss pushing logits x towards 'fake / mismatched'."""
    x = x.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(x, torch.zeros_like(x))
    return F.relu(1.0 + x).mean()


def _score(x: Tensor, kind: str) -> Tensor:
    """Detached mean D output for logging: probability for bce, raw logit for hinge."""
    x = x.detach().float()
    return (torch.sigmoid(x) if kind == "bce" else x).mean()


def d_loss(real: DOut, fake: DOut, kind: str = "bce") -> tuple[Tensor, dict[str, Tensor]]:
    """Matching-aware discriminator loss over real / wrong / fake pairs.

    ``real`` = D(real images, their condition, wrong_cond=...) so ``real.wrong`` holds the
    mismatched-pair logits; ``fake`` = D(generated images, their condition). Returns the
    loss and a dict of detached stats: ``d_real``, ``d_wrong``, ``d_fake`` (+ ``d_uncond_real``,
    ``d_uncond_fake``) and the component losses ``loss_real``, ``loss_wrong``, ``loss_fake``
    (+ ``loss_uncond_real``, ``loss_uncond_fake``).
    """
    _check_kind(kind)
    if real.wrong is None:
        raise ValueError("d_loss: real.wrong is None; run D(real_img, cond, wrong_cond=cond[idx]) for the real batch")
    if (real.uncond is None) != (fake.uncond is None):
        raise ValueError("d_loss: real and fake outputs must both have, or both lack, unconditional logits")
    parts = {
        "loss_real": _pos(real.cond, kind),
        "loss_wrong": _neg(real.wrong, kind),
        "loss_fake": _neg(fake.cond, kind),
    }
    stats = {"d_real": _score(real.cond, kind), "d_wrong": _score(real.wrong, kind), "d_fake": _score(fake.cond, kind)}
    if real.uncond is None:
        loss = parts["loss_real"] + (parts["loss_wrong"] + parts["loss_fake"]) / 2
    else:
        parts["loss_uncond_real"] = _pos(real.uncond, kind)
        parts["loss_uncond_fake"] = _neg(fake.uncond, kind)
        stats["d_uncond_real"] = _score(real.uncond, kind)
        stats["d_uncond_fake"] = _score(fake.uncond, kind)
        loss = (parts["loss_real"] + parts["loss_uncond_real"]) / 2 + (
            parts["loss_fake"] + parts["loss_wrong"] + parts["loss_uncond_fake"]
        ) / 3
    stats.update({k: v.detach() for k, v in parts.items()})
    return loss, stats


def g_loss(fake: DOut, kind: str = "bce") -> Tensor:
    """Adversarial generator loss (without the KL term, which the step adds)."""
    _check_kind(kind)

    def term(x: Tensor) -> Tensor:
        return _pos(x, kind) if kind == "bce" else -x.float().mean()

    loss = term(fake.cond)
    if fake.uncond is not None:
        loss = loss + term(fake.uncond)
    return loss
