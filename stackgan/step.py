"""One StackGAN iteration: the D update on real / wrong / fake pairs, then the G update.

As in the official StackGAN, G makes a batch of fakes from (text, z) once; D is updated on
real pairs, wrong pairs (real images with another species' caption) and the detached fakes;
G is then updated through the new D, plus ``kl_coef`` x the conditioning-augmentation KL.
The recipe's terms beyond StackGAN (each a named function in :mod:`stackgan.losses`, each off
at 0) are added to those two losses: the image-caption contrastive loss, the species head, the
attribute head, and stage II's reconstruction of real crops.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config
from .data.stream import to_device, to_unit_range
from .losses import (CaptionBank, attribute_loss, class_loss, contrastive_loss, d_loss, g_loss, kl_loss,
                     recon_loss, word_region_loss, wrong_indices)
from .words import Words, reads_words, word_vectors


@dataclass
class Batch:
    """What one step consumes, on the training device."""

    real: Tensor  # (B, 3, S, S) real crops in [-1, 1]
    emb: Tensor  # (B, text_dim) caption embeddings
    z: Tensor  # (B, z_dim) noise
    wrong: Tensor  # (B,) whose caption each real image is mismatched with
    cls: Tensor  # (B,) class ids (the caption bank's same-species mask)
    species: Tensor | None = None  # (B,) species indices of D's species head (loss.class_coef)
    real_low: Tensor | None = None  # (B, 3, 64, 64) the real crops at 64 px (stage II, loss.recon_coef)
    attr: Tensor | None = None  # (B, A) the real images' attribute labels (loss.attr_coef)
    stated: Tensor | None = None  # (B, A) bool: the attributes of the groups each caption states
    attr_groups: list[list[int]] | None = None  # the attribute head's groups (attribute indices)
    words: Words | None = None  # the captions' word vectors (model.word_attn, loss.word_coef)


@dataclass
class StepOut:
    loss_d: Tensor
    loss_g: Tensor
    stats: dict  # detached scalars: D's outputs, every loss term (kl included)
    grad_norm_d: Tensor | None = None  # when asked for (diagnostics)
    grad_norm_g: Tensor | None = None


def make_batch(raw: dict, cfg: Config, device: torch.device, z_gen: torch.Generator, pair_gen: torch.Generator,
               species: Tensor | None, attr_groups: list[list[int]] | None = None, words: bool = False) -> Batch:
    """A stream batch on the device, with its noise and wrong pairs drawn from the run's own
    generators (on the CPU, so a resumed run draws the same numbers on any device). Host
    tensors cross pinned and non-blocking, so the host never waits for the GPU here;
    ``species`` (class id -> species index) lives on the device; ``attr_groups``: the attribute
    head's groups, when the stream carries ``attr`` and ``stated``; ``words``: the captions'
    word vectors are needed (:func:`needs_words`)."""
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    real = to_unit_range(to_device(raw["img"], device), memory_format=layout)
    z = torch.randn(len(raw["cls"]), cfg.model.z_dim, generator=z_gen)
    wrong = wrong_indices(raw["cls"], cfg.loss.wrong, generator=pair_gen).index
    cls = to_device(raw["cls"], device)
    low = F.interpolate(real, size=(64, 64), mode="area") if cfg.loss.recon_coef > 0 else None
    attr = stated = None
    if attr_groups is not None:
        attr, stated = to_device(raw["attr"], device), to_device(raw["stated"], device)
    return Batch(real=real, emb=to_device(raw["emb"], device), z=to_device(z, device), wrong=to_device(wrong, device),
                 cls=cls, species=None if species is None else species[cls], real_low=low,
                 attr=attr, stated=stated, attr_groups=attr_groups,
                 words=word_vectors(raw["caption"], device) if words else None)


def needs_words(cfg: Config, G_inner: torch.nn.Module) -> bool:
    """Whether a step needs the captions' word vectors: G attends over them (its own
    ``model.word_attn``, or a stage-I export's that stage II refines) or D matches them."""
    return reads_words(G_inner) or cfg.loss.word_coef > 0


def gan_step(acc, G, D, opt_g, opt_d, batch: Batch, cfg: Config, bank: CaptionBank | None = None,
             diag: bool = False) -> StepOut:
    """D update, then G update through the updated D. Losses stay on the device (no host
    sync here); ``diag`` also returns both grad norms. ``acc`` is the run's backend
    (:class:`stackgan.backends.GANBackend`).

    G runs once: its fakes are detached for D and reused for G's loss. During G's update D is
    frozen and called without its DDP wrapper, so no gradient is computed or all-reduced for D.
    ``bank``: extra negative captions for the contrastive loss; the batch is pushed into it
    after the step.
    """
    lc = cfg.loss
    D_inner = acc.unwrap_model(D)
    with acc.autocast():
        fake, mu, logvar, refined = _generate(G, acc.unwrap_model(G), batch)
    cond = batch.emb if cfg.model.d_cond == "text" else mu.detach()  # what D is conditioned on
    same_species = batch.cls if bank is not None else None  # a batch of 32 rarely holds two; the bank does

    words = batch.words if lc.word_coef > 0 else None  # what D's word codes read
    with acc.autocast():
        out_real = D(batch.real, cond, cond[batch.wrong], words=words)
        out_fake = D(fake.detach(), cond, words=words)
        loss_d, stats = d_loss(out_real, out_fake, kind=lc.kind)
        if lc.contrastive_coef > 0:
            fakes = out_fake.img_code if bank is not None else None
            stats["loss_contrastive_real"] = contrastive_loss(out_real, same_species, *_negatives(D_inner, bank), fakes)
            loss_d = loss_d + lc.contrastive_coef * stats["loss_contrastive_real"]
        if lc.class_coef > 0:
            stats["loss_class_real"] = class_loss(out_real, batch.species)
            loss_d = loss_d + lc.class_coef * stats["loss_class_real"]
        if lc.attr_coef > 0:  # every labelled group: a real image shows all its parts
            stats["loss_attr_real"] = attribute_loss(out_real.attr_logits, batch.attr, batch.attr_groups)
            loss_d = loss_d + lc.attr_coef * stats["loss_attr_real"]
        if lc.word_coef > 0:
            stats["loss_word_real"] = word_region_loss(out_real, batch.words.mask, batch.cls)
            loss_d = loss_d + lc.word_coef * stats["loss_word_real"]
    gnorm_d = update(acc, D, opt_d, loss_d, diag, stats, "d")

    with frozen(D_inner):
        with acc.autocast():
            out_g = D_inner(fake, cond, words=words)
            stats["kl"] = kl_loss(mu, logvar)
            loss_g = g_loss(out_g, kind=lc.kind) + lc.kl_coef * stats["kl"]
            if lc.contrastive_coef > 0:  # D moved: its codes of the stored captions too (constants for G)
                stats["loss_contrastive_fake"] = contrastive_loss(out_g, same_species, *_negatives(D_inner, bank))
                loss_g = loss_g + lc.contrastive_coef * stats["loss_contrastive_fake"]
            if lc.class_coef > 0:
                stats["loss_class_fake"] = class_loss(out_g, batch.species)
                loss_g = loss_g + lc.class_coef * stats["loss_class_fake"]
            if lc.attr_coef > 0:  # only what the caption says
                stats["loss_attr_fake"] = attribute_loss(out_g.attr_logits, batch.attr, batch.attr_groups,
                                                         stated=batch.stated)
                loss_g = loss_g + lc.attr_coef * stats["loss_attr_fake"]
            if lc.word_coef > 0:  # G's fakes must show their captions' words, place by place
                stats["loss_word_fake"] = word_region_loss(out_g, batch.words.mask, batch.cls)
                loss_g = loss_g + lc.word_coef * stats["loss_word_fake"]
            if refined is not None:
                stats["loss_recon"] = recon_loss(refined, batch.real)
                loss_g = loss_g + lc.recon_coef * stats["loss_recon"]
        gnorm_g = update(acc, G, opt_g, loss_g, diag, stats, "g")
    if bank is not None:
        bank.push(batch.emb, batch.cls)
    return StepOut(loss_d.detach(), loss_g.detach(), {k: v.detach() for k, v in stats.items()}, gnorm_d, gnorm_g)


def _generate(G, G_inner, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """G's fakes, CA mean and log-variance, and (stage II with ``real_low``) its refinement of
    the real 64-px crops, all from one G call: one forward per backward, as DDP expects."""
    if batch.real_low is None:
        fake, mu, logvar = G(batch.emb, batch.z, words=batch.words)
        return fake, mu, logvar, None
    n = len(batch.z)
    low = torch.cat([G_inner.low_res(batch.emb, batch.z, words=batch.words), batch.real_low.to(batch.emb.dtype)])
    img, mu, logvar = G(torch.cat([batch.emb, batch.emb]), None, low=low)
    return img[:n], mu[:n], logvar[:n], img[n:]


def _negatives(D_inner, bank: CaptionBank | None) -> tuple[Tensor | None, Tensor | None]:
    """D's text codes of the bank's captions and their classes (None, None without a bank)."""
    if bank is None or bank.n == 0:
        return None, None
    emb, cls = bank.get()
    return D_inner.text_codes(emb), cls


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """``module`` does not require grad inside (DeepSpeed ZeRO-2 also needs this, or D's
    gradients would be reduced a second time during G's backward)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


def update(backend, model, opt, loss: Tensor, diag: bool, stats: dict, name: str) -> Tensor | None:
    """Backward, clipping, loss scaling and optimizer step of one network, as the backend does
    them (:meth:`stackgan.backends.GANBackend.update`); its grad norm (a device tensor) when
    ``diag``. Where the step itself can be skipped for an inf/NaN gradient (DDP under fp16's
    shared scaler), ``stats["skipped_<name>"]`` is 1 for a skipped step, so the log shows the
    share of skipped steps (DeepSpeed's engines count theirs: ``amp_state``)."""
    up = backend.update(model, opt, loss, want_norm=diag)
    if up.skipped is not None:
        stats[f"skipped_{name}"] = up.skipped
    return up.grad_norm
