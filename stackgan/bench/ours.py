"""Our step as the trainer runs it, the variants that take one speed-up away, and the check
that the original step computes the same losses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..backends import AccelerateGAN
from ..backends import make_accelerator as trainer_accelerator
from ..ema import EMA
from ..layout import apply_layout, layout_min_hw
from ..run import CPU_NCHW_BELOW, adam_options
from ..step import Batch, gan_step
from .cases import Case, build_models, case_config, make_batch
from .original import OriginalStep, use_plain_upsample

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # bench name -> Accelerate's


def make_accelerator(device: str, precision: str = "fp32") -> AccelerateGAN:
    """The trainer's DDP backend on ``device`` ("cpu" or "cuda"), its ``Accelerator`` built by
    the trainer's own factory (``stackgan.backends.make_accelerator``); no gradient clipping,
    as the benchmark's configs (``cases.case_config``)."""
    acc = trainer_accelerator(device == "cpu", PRECISIONS[precision])
    return AccelerateGAN(acc, precision=PRECISIONS[precision])


@dataclass(frozen=True)
class Variant:
    """One change to the trainer's step (``ours``), to measure that change alone."""
    upconv: bool = True  # the up-block as one transposed conv (models.UpsampleConv3x3)
    channels_last: bool = True
    min_hw: int | None = None  # channels-last only on maps >= this wide; None = the trainer's choice
    adam: str = "trainer"  # trainer: fused; foreach; plain: for-loop
    compile: bool = False
    inference_mode: bool = False
    ema: bool = True  # the trainer's EMA of G after every step (default config: on)


VARIANTS = {
    "ours": Variant(),
    # the trainer's step before the speed-ups measured here (plain upsample + conv, channels-last
    # everywhere, foreach Adam): the "before" of a before/after in one run
    "ours-before": Variant(upconv=False, min_hw=0, adam="foreach"),
    "ours-no-upconv": Variant(upconv=False),
    "ours-cl-everywhere": Variant(min_hw=0),
    "ours-foreach-adam": Variant(adam="foreach"),
    "ours-nchw": Variant(channels_last=False),
    "ours-plain-adam": Variant(adam="plain"),
    "ours-compile": Variant(compile=True),
    "ours-infer": Variant(inference_mode=True),
}


def low_res_inference_mode(self, emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Stage2G.low_res under inference_mode (the clone makes it usable by autograd)."""
    with torch.inference_mode():
        low = self.stage1(emb, z)[0]
    return low.clone()


class OursStep:
    """``stackgan.step.gan_step`` + the EMA update, set up as the trainer does, plus a variant."""

    def __init__(self, acc, case: Case, variant: Variant = Variant(), seed: int = 0):
        self.acc, self.case, self.variant = acc, case, variant
        self.cfg = case_config(case)
        G, D = build_models(case, acc.device, seed)
        if not variant.upconv:
            use_plain_upsample(G)
        if variant.inference_mode and case.stage == 2:
            G.low_res = low_res_inference_mode.__get__(G)
        if variant.channels_last:
            self._apply_layout(G, D)
        kw = self._adam_options()
        opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=2e-4, **kw)
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, **kw)
        if variant.compile:
            G, D = torch.compile(G), torch.compile(D)
        self.G, self.D, self.opt_g, self.opt_d = acc.prepare(G, D, opt_g, opt_d)
        self.G.train()
        self.D.train()
        self.G_inner = acc.unwrap_model(self.G)
        self.ema = EMA(self.G_inner, decay=0.999) if variant.ema else None
        self.step = 0

    def _apply_layout(self, G: nn.Module, D: nn.Module) -> None:
        """Channels-last on large maps, as stackgan.run does it (``min_hw`` 0: everywhere)."""
        min_hw = self.variant.min_hw
        if min_hw is None:
            min_hw = layout_min_hw(CPU_NCHW_BELOW, self.acc.device)
        ex = make_batch(dataclasses.replace(self.case, batch=2), self.acc.device)
        apply_layout(G, D, (ex.emb, ex.z), self.cfg.model.d_cond, min_hw)

    def _adam_options(self) -> dict:
        kw = adam_options(self.cfg)
        if self.variant.adam != "trainer":
            kw.pop("fused", None)
            kw["foreach"] = self.variant.adam == "foreach"
        return kw

    def __call__(self, real, emb, z, widx):
        if self.variant.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)  # as the trainer, every step
        batch = Batch(real=real, emb=emb, z=z, wrong=widx, cls=widx)  # cls: only the caption bank reads it
        out = gan_step(self.acc, self.G, self.D, self.opt_g, self.opt_d, batch, self.cfg)
        if self.ema is not None:
            self.ema.update(self.G_inner, self.step)
        self.step += 1
        return out.loss_d, out.loss_g, out.stats["kl"]


def check_original_matches(case: Case, acc=None, steps: int = 2, seed: int = 0) -> dict:
    """Run the original step and ours from the same weights on the same inputs and RNG.

    Returns the largest absolute differences of the losses (every step) and of all G and D
    parameters after ``steps`` updates. Our step must pair wrong conditions like the
    original here, so both get the same ``widx`` (the shift).
    """
    acc = acc or make_accelerator("cpu")
    # the up-conv rewrite is checked on its own (tests/test_models.py): through BatchNorm its
    # float rounding flips the sign of near-zero gradients, which Adam turns into lr-sized moves
    ours = OursStep(acc, case, Variant(channels_last=False, upconv=False), seed=seed)
    G, D = build_models(case, acc.device, seed)
    orig = OriginalStep(G, D)
    diffs, losses = [], []
    for i in range(steps):
        b = make_batch(case, acc.device, seed=seed + 100 + i)
        torch.manual_seed(seed + 1000 + i)  # CA-Net noise
        lo = orig(b.real, b.emb, b.z, b.widx)
        torch.manual_seed(seed + 1000 + i)
        lu = ours(b.real, b.emb, b.z, b.widx)
        losses.append({"original": [float(v) for v in lo], "ours": [float(v) for v in lu]})
        diffs.append(max(abs(float(a) - float(c)) for a, c in zip(lo, lu)))
    pdiff, frac_off = _param_diffs([(acc.unwrap_model(ours.G), G), (acc.unwrap_model(ours.D), D)])
    return {"case": case.name, "steps": steps, "max_loss_diff": max(diffs), "max_param_diff": pdiff,
            "frac_params_off": frac_off, "losses": losses}


def _param_diffs(pairs: list[tuple[nn.Module, nn.Module]]) -> tuple[float, float]:
    """The largest difference of the float state of module pairs, and the fraction off by > 1e-5.

    Adam moves every weight by ~lr whatever the size of its gradient, so a gradient that is
    ~0 and differs by rounding can move one weight by up to 2 lr: the fraction counts them.
    """
    pdiff, n_off, n_all = 0.0, 0, 0
    for mine, theirs in pairs:
        for (_, a), (_, c) in zip(sorted(mine.state_dict().items()), sorted(theirs.state_dict().items())):
            if a.dtype.is_floating_point:
                d = (a.float() - c.float()).abs()
                pdiff = max(pdiff, float(d.max()))
                n_off += int((d > 1e-5).sum())
                n_all += d.numel()
    return pdiff, n_off / max(1, n_all)
