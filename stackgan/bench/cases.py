"""What is measured: network sizes at a batch size, their networks and a fixed synthetic batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import Config, ModelConfig, load_config
from ..models import build_discriminator, build_generator
from ..text import SENTENCE_ENCODER, get_encoder


@dataclass(frozen=True)
class Case:
    """One network size at one batch. ``s1_gf``: width of stage II's frozen stage-I G."""

    size: str  # official | embedded | tiny
    stage: int
    batch: int
    gf: int
    df: int
    z: int
    cond: int
    text: int
    r_num: int
    s1_gf: int

    @property
    def name(self) -> str:
        return f"{self.size}-s{self.stage}-b{self.batch}"

    @property
    def image(self) -> int:
        return 64 if self.stage == 1 else 256


def official_case(stage: int, batch: int) -> Case:
    """Official StackGAN birds sizes (char-CNN-RNN text, 1024-d)."""
    return Case("official", stage, batch, gf=128, df=64, z=100, cond=128, text=1024, r_num=4, s1_gf=128)


def embedded_case(stage: int, batch: int) -> Case:
    """The embedded-set sizes, read from configs/birds_stage{1,2}.yaml (MiniLM text, 384-d)."""
    text = get_encoder(SENTENCE_ENCODER).dim
    s1 = load_config("configs/birds_stage1.yaml").model
    m = s1 if stage == 1 else load_config("configs/birds_stage2.yaml").model
    return Case("embedded", stage, batch, gf=m.gf_dim, df=m.df_dim, z=m.z_dim, cond=m.cond_dim, text=text,
                r_num=m.r_num, s1_gf=s1.gf_dim)


def tiny_case(stage: int, batch: int = 4) -> Case:
    """Test-sized networks (seconds on a CPU)."""
    return Case("tiny", stage, batch, gf=16, df=8, z=16, cond=16, text=32, r_num=1, s1_gf=16)


def case_config(case: Case) -> Config:
    """The Config that gan_step reads (official losses: bce, KL 2, no clipping)."""
    return load_config(None, [
        f"model.stage={case.stage}", f"model.z_dim={case.z}", f"model.cond_dim={case.cond}",
        f"model.gf_dim={case.gf}", f"model.df_dim={case.df}", f"model.r_num={case.r_num}",
        f"data.batch_size={case.batch}", "loss.kind=bce", "loss.kl_coef=2.0",
        "optim.grad_clip=0",
    ])


def build_models(case: Case, device: torch.device | str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """G and D of ``case`` with the official init; the same seed gives the same weights."""
    torch.manual_seed(seed)
    mcfg = ModelConfig(stage=case.stage, z_dim=case.z, cond_dim=case.cond, gf_dim=case.gf, df_dim=case.df,
                       r_num=case.r_num)
    stage1 = None
    if case.stage == 2:
        stage1 = build_generator(ModelConfig(stage=1, z_dim=case.z, cond_dim=case.cond, gf_dim=case.s1_gf),
                                 case.text)
    G = build_generator(mcfg, case.text, stage1=stage1)
    D = build_discriminator(mcfg)
    return G.to(device), D.to(device)


@dataclass
class Batch:
    real: torch.Tensor
    emb: torch.Tensor
    z: torch.Tensor
    widx: torch.Tensor


def make_batch(case: Case, device: torch.device | str, seed: int = 0) -> Batch:
    """A fixed synthetic batch (the data stream is measured on its own)."""
    g = torch.Generator().manual_seed(seed)
    b, s = case.batch, case.image
    real = torch.rand(b, 3, s, s, generator=g) * 2 - 1
    emb = torch.randn(b, case.text, generator=g)
    z = torch.randn(b, case.z, generator=g)
    widx = (torch.arange(b) + 1) % b  # the official in-batch shift
    return Batch(real.to(device), emb.to(device), z.to(device), widx.to(device))
