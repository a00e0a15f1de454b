"""The baseline: StackGAN-Pytorch's training iteration (``trainer.py``), op for op.

Plain NCHW eager fp32; G forward once; D features computed once for the real and once for
the fake batch; conditional logits through ``sigmoid`` + ``nn.BCELoss`` for real / wrong (the
in-batch shift: features[:-1] with cond[1:]) / fake; ``errD = real + (wrong + fake) / 2``
(stage II: ``(real + u_real) / 2 + (fake + wrong + u_fake) / 3``); the three D terms read as
Python floats every iteration; then G's loss recomputes ``D(fake)`` through the updated D
with D's parameters still requiring grad (D's weight gradients are computed and thrown
away), plus 2 x KL; default ``torch.optim.Adam``. It uses the same network modules as ours,
with the up-blocks turned back into upsample + conv (:func:`use_plain_upsample`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..models import UpsampleConv3x3


class OriginalStep:
    """StackGAN-Pytorch's training iteration, called like our step.

    ``widx=None`` pairs real features[:-1] with cond[1:] as the official code; passing the
    same ``widx`` as our step pairs them the same way (used to check equal losses).
    """

    def __init__(self, G: nn.Module, D: nn.Module, lr_g: float = 2e-4, lr_d: float = 2e-4,
                 betas: tuple[float, float] = (0.5, 0.999), kl_coef: float = 2.0):
        self.G, self.D, self.kl_coef = G, D, kl_coef
        use_plain_upsample(G)  # the original upsamples, then convolves
        self.opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(D.parameters(), lr=lr_d, betas=betas)
        self.criterion = nn.BCELoss()
        self.G.train()
        self.D.train()

    def _cond_prob(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.D.get_cond_logits(h, c))  # official D_GET_LOGITS ends in nn.Sigmoid

    def d_loss(self, real: torch.Tensor, fake: torch.Tensor, mu: torch.Tensor, widx: torch.Tensor | None):
        """``compute_discriminator_loss``: returns errD and the three terms as Python floats."""
        D, crit = self.D, self.criterion
        b = real.shape[0]
        ones, zeros = torch.ones(b, device=real.device), torch.zeros(b, device=real.device)
        cond, fake = mu.detach(), fake.detach()
        real_features = D.encode_img(real)
        fake_features = D.encode_img(fake)
        err_real = crit(self._cond_prob(real_features, cond), ones)
        if widx is None:
            err_wrong = crit(self._cond_prob(real_features[: b - 1], cond[1:]), zeros[1:])
        else:
            err_wrong = crit(self._cond_prob(real_features, cond[widx]), zeros)
        err_fake = crit(self._cond_prob(fake_features, cond), zeros)
        if D.get_uncond_logits is not None:
            u_real = crit(torch.sigmoid(D.get_uncond_logits(real_features)), ones)
            u_fake = crit(torch.sigmoid(D.get_uncond_logits(fake_features)), zeros)
            err_d = (err_real + u_real) / 2.0 + (err_fake + err_wrong + u_fake) / 3.0
        else:
            err_d = err_real + (err_fake + err_wrong) * 0.5
        return err_d, err_real.item(), err_wrong.item(), err_fake.item()  # .data[0] in the original

    def g_loss(self, fake: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """``compute_generator_loss``: D(fake) again, through the updated D, D params live."""
        D, crit = self.D, self.criterion
        ones = torch.ones(fake.shape[0], device=fake.device)
        fake_features = D.encode_img(fake)
        err = crit(self._cond_prob(fake_features, mu.detach()), ones)
        if D.get_uncond_logits is not None:
            err = err + crit(torch.sigmoid(D.get_uncond_logits(fake_features)), ones)
        return err

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """``KL_loss`` of the original."""
        return torch.mean(mu.pow(2).add(logvar.exp()).mul(-1).add(1).add(logvar)).mul(-0.5)

    def __call__(self, real, emb, z, widx=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fake, mu, logvar = self.G(emb, z)
        self.D.zero_grad()
        err_d, *_ = self.d_loss(real, fake, mu, widx)
        err_d.backward()
        self.opt_d.step()
        self.G.zero_grad()
        kl = self.kl(mu, logvar)
        err_g = self.g_loss(fake, mu) + kl * self.kl_coef
        err_g.backward()
        self.opt_g.step()
        return err_d.detach(), err_g.detach(), kl.detach()


def use_plain_upsample(module: nn.Module) -> int:
    """The official up-block for the original step: every ``UpsampleConv3x3`` (models.py)
    becomes ``nn.Upsample`` + a plain ``nn.Conv2d`` again, sharing the weight. Returns the count."""
    n = 0
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential) or len(seq) < 2:
            continue
        conv = seq[1]
        if isinstance(conv, UpsampleConv3x3) and isinstance(seq[0], nn.Identity):
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False,
                              device=conv.weight.device, dtype=conv.weight.dtype)
            plain.weight = conv.weight
            seq[0], seq[1] = nn.Upsample(scale_factor=2, mode="nearest"), plain
            n += 1
    return n
