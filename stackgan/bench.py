"""Training-throughput benchmark: our StackGAN step against the original's and the machine's peak.

    python -m stackgan.bench [--device cpu|cuda] [--quick] [--only PARTS] [--out FILE.json]

Everything is measured in one run, on the same machine, because absolute times move by 2x
or more with other load. Each part runs in a fresh worker process (so peak memory is per
part), and inside a worker the steps being compared run **interleaved**, one iteration of
each per round (the order rotates), so that load changes hit all of them alike; ratios are
medians of per-round ratios. The fraction of peak uses the matmul figure measured in the
same worker, just before its timed rounds.

Parts (``--only``, comma separated; default: all):

* ``check``    -- the original step and ours give the same losses on the same weights/inputs;
* ``peak``     -- the machine's own matmul (4096^2 on CPU, 8192^2 on CUDA) and conv fwd+bwd
                  throughput at StackGAN layer sizes: NCHW, channels-last, up-conv rewrite;
* ``stage1`` / ``stage2`` / ``embedded`` -- seconds per iteration, images/s, FLOPs per
                  iteration (``FlopCounterMode``), GFLOP/s and fraction of the matmul figure
                  for the original step, our step (``stackgan.train.gan_step`` + EMA, set up
                  as the trainer does: up-block as one transposed conv, fused Adam,
                  channels-last on large maps) and ``ours-before`` (the trainer's step before
                  those three speed-ups: the before/after in one run);
* ``variants`` -- each speed-up taken away alone, in one worker (stage I b16, stage II b4):
                  plain upsample + conv, channels-last everywhere, foreach Adam, NCHW,
                  for-loop Adam, and no_grad vs inference_mode for the frozen stage-I G;
* ``compile``  -- ``torch.compile`` of G and D (compile time reported), stage I only;
* ``bf16`` (CPU, once) / every precision (CUDA) -- autocast training vs the fp32 original;
* ``procs``    -- 1 process x 2 threads vs 2 DDP (gloo) processes x 1 thread, stage I (CPU);
* ``memory``   -- stage II at the official batch 64: peak RSS (GPU memory) of our step;
* ``data``     -- ``stackgan.bench_data`` (shard stream) next to the trainer's images/s.

The original step (:class:`OriginalStep`) is StackGAN-Pytorch's iteration, op for op: plain
NCHW eager fp32; G forward once; D features computed once for the real and once for the
fake batch; conditional logits through ``sigmoid`` + ``nn.BCELoss`` for real / wrong (the
in-batch shift: features[:-1] with cond[1:]) / fake; ``errD = real + (wrong + fake) / 2``
(stage II: ``(real + u_real) / 2 + (fake + wrong + u_fake) / 3``); the three D terms read as
Python floats every iteration; then G's loss recomputes ``D(fake)`` through the updated D
with D's parameters still requiring grad (D's weight gradients are computed and thrown
away), plus 2 x KL; default ``torch.optim.Adam``. It uses the same network modules as ours.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import apply_layout, layout_min_hw
from .models import UpsampleConv3x3, upsample_conv3x3
from .train import adam_options

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("check", "peak", "stage1", "stage2", "embedded", "variants", "compile", "bf16", "procs", "memory",
         "data")
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
TARGET_VS_ORIGINAL = 0.75  # our s/iter at most this fraction of the original's
TARGET_FRAC_PEAK = 0.75  # achieved GFLOP/s at least this fraction of the matmul figure


class BenchError(ValueError):
    """Bad command-line input for the benchmark (names the option)."""


# --------------------------------------------------------------------------------------
# What is measured: network sizes and batches
# --------------------------------------------------------------------------------------
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
    from .config import load_config
    from .text import SENTENCE_ENCODER, get_encoder

    text = get_encoder(SENTENCE_ENCODER).dim
    s1 = load_config(ROOT / "configs" / "birds_stage1.yaml").model
    m = s1 if stage == 1 else load_config(ROOT / "configs" / "birds_stage2.yaml").model
    return Case("embedded", stage, batch, gf=m.gf_dim, df=m.df_dim, z=m.z_dim, cond=m.cond_dim, text=text,
                r_num=m.r_num, s1_gf=s1.gf_dim)


def tiny_case(stage: int, batch: int = 4) -> Case:
    """Test-sized networks (seconds on a CPU)."""
    return Case("tiny", stage, batch, gf=16, df=8, z=16, cond=16, text=32, r_num=1, s1_gf=16)


def case_config(case: Case):
    """The Config that gan_step reads (official losses: bce, KL 2, uncond 1, no clipping)."""
    from .config import load_config

    return load_config(None, [
        f"model.stage={case.stage}", f"model.z_dim={case.z}", f"model.cond_dim={case.cond}",
        f"model.gf_dim={case.gf}", f"model.df_dim={case.df}", f"model.r_num={case.r_num}",
        f"data.batch_size={case.batch}", "loss.kind=bce", "loss.kl_coef=2.0", "loss.uncond_coef=1.0",
        "optim.grad_clip=0",
    ])


def build_models(case: Case, device: torch.device | str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """G and D of ``case`` with the official init; the same seed gives the same weights."""
    from .config import ModelConfig
    from .models import build_discriminator, build_generator

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


# --------------------------------------------------------------------------------------
# The original StackGAN step (the baseline)
# --------------------------------------------------------------------------------------
class OriginalStep:
    """StackGAN-Pytorch's training iteration (``trainer.py``), reproduced op for op.

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


def _low_res_inference_mode(self, emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Stage2G.low_res under inference_mode (the clone makes it usable by autograd)."""
    with torch.inference_mode():
        low = self.stage1(emb, z)[0]
    return low.clone()


# --------------------------------------------------------------------------------------
# Our step, as the trainer runs it, and its variants
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One change to the trainer's step (``ours``), to measure that change alone."""
    upconv: bool = True  # the up-block as one transposed conv (models.UpsampleConv3x3)
    channels_last: bool = True
    min_hw: int | None = None  # channels-last only on maps >= this wide; None = the trainer's choice
    adam: str = "trainer"  # trainer: fused (optim.fused); foreach; plain: for-loop
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


def make_accelerator(device: str, precision: str = "fp32"):
    """A single- or multi-process Accelerator configured like the trainer's."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [DistributedDataParallelKwargs(broadcast_buffers=True, find_unused_parameters=False)]
    if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(cpu=device == "cpu", mixed_precision=PRECISIONS[precision], kwargs_handlers=handlers)


class OursStep:
    """``stackgan.train.gan_step`` + the EMA update, set up as the trainer does, plus a variant."""

    def __init__(self, acc, case: Case, variant: Variant = Variant(), seed: int = 0):
        from .train import gan_step

        self._gan_step = gan_step
        self.acc, self.case, self.variant = acc, case, variant
        self.cfg = case_config(case)
        G, D = build_models(case, acc.device, seed)
        if not variant.upconv:
            use_plain_upsample(G)
        if variant.inference_mode and case.stage == 2:
            G.low_res = _low_res_inference_mode.__get__(G)
        if variant.channels_last:  # as train.py does it
            min_hw = variant.min_hw
            if min_hw is None:
                min_hw = layout_min_hw(self.cfg.train.channels_last_min_hw, acc.device)
            ex = make_batch(dataclasses.replace(case, batch=2), acc.device)
            apply_layout(G, D, (ex.emb, ex.z), self.cfg.model.d_cond, min_hw)
        kw = adam_options(self.cfg)
        if variant.adam != "trainer":
            kw.pop("fused", None)
            kw["foreach"] = variant.adam == "foreach"
        opt_g = torch.optim.Adam([p for p in G.parameters() if p.requires_grad], lr=2e-4, **kw)
        opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, **kw)
        if variant.compile:
            G, D = torch.compile(G), torch.compile(D)
        self.G, self.D, self.opt_g, self.opt_d = acc.prepare(G, D, opt_g, opt_d)
        self.G.train()
        self.D.train()
        self.G_inner = acc.unwrap_model(self.G)
        self.ema = None
        if variant.ema:
            from .ema import EMA

            self.ema = EMA(self.G_inner, decay=0.999)
        self.step = 0

    def __call__(self, real, emb, z, widx):
        if self.variant.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)  # as the trainer, every step
        out = self._gan_step(self.acc, self.G, self.D, self.opt_g, self.opt_d, real, emb, z, widx, self.cfg)
        if self.ema is not None:
            self.ema.update(self.G_inner, self.step)
        self.step += 1
        return out.loss_d, out.loss_g, out.kl


# --------------------------------------------------------------------------------------
# The correctness check of the baseline
# --------------------------------------------------------------------------------------
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
    g_in, d_in = acc.unwrap_model(ours.G), acc.unwrap_model(ours.D)
    pdiff, n_off, n_all = 0.0, 0, 0
    for mine, theirs in ((g_in, G), (d_in, D)):
        for (k, a), (_, c) in zip(sorted(mine.state_dict().items()), sorted(theirs.state_dict().items())):
            if a.dtype.is_floating_point:
                d = (a.float() - c.float()).abs()
                pdiff = max(pdiff, float(d.max()))
                n_off += int((d > 1e-5).sum())
                n_all += d.numel()
    # Adam moves every weight by ~lr whatever the size of its gradient, so a gradient that
    # is ~0 and differs by rounding can move one weight by up to 2 lr: count such weights.
    return {"case": case.name, "steps": steps, "max_loss_diff": max(diffs), "max_param_diff": pdiff,
            "frac_params_off": n_off / max(1, n_all), "losses": losses}


# --------------------------------------------------------------------------------------
# Measuring helpers (device-generic: the CUDA path differs only in sync and memory)
# --------------------------------------------------------------------------------------
def _sync_fn(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark: GPU allocator stats, or the process's VmHWM on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or peak resident set size of this process, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def count_flops(fn: Callable[[], object]) -> int:
    """Matmul/conv FLOPs of one call, counted by ``torch.utils.flop_counter`` (runs it once)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def matmul_gflops(device: torch.device, precision: str, n: int, reps: int) -> float:
    """Dense n x n matmul throughput (median of ``reps``) in the given precision."""
    dt = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}[precision]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dt, generator=g)
        b = torch.randn(n, n, device=device, dtype=dt, generator=g)
        sync = _sync_fn(device)
        a @ b
        sync()
        inner = 1 if device.type == "cpu" else 10
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(inner):
                a @ b
            sync()
            ts.append((time.perf_counter() - t) / inner)
        return 2 * n**3 / statistics.median(ts) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# StackGAN layers (fwd + bwd of input and weight): name, cin, cout, input hw, kernel, stride, pad, upsample
CONV_LAYERS = [
    ("s1 G up 1024->512 @8", 1024, 512, 4, 3, 1, 1, True),
    ("s1 G up 256->128 @32", 256, 128, 16, 3, 1, 1, True),
    ("s1 G up 128->64 @64", 128, 64, 32, 3, 1, 1, True),
    ("s2 G res 512->512 @16", 512, 512, 16, 3, 1, 1, False),
    ("s2 G up 64->32 @256", 64, 32, 128, 3, 1, 1, True),
    ("s2 D 64->128 4x4/2 @128", 64, 128, 128, 4, 2, 1, False),
    ("s2 D 512->1024 4x4/2 @16", 512, 1024, 16, 4, 2, 1, False),
]


def conv_gflops(device: torch.device, batch: int, reps: int, scale: int = 1) -> list[dict]:
    """Conv fwd+bwd throughput per StackGAN layer (upsample layers: plain and as upconv)."""
    sync = _sync_fn(device)
    out = []
    for name, cin, cout, hw, k, s, p, up in CONV_LAYERS:
        cin, cout, hw = max(1, cin // scale), max(1, cout // scale), max(4, hw // scale)
        g = torch.Generator(device=device).manual_seed(0)
        x0 = torch.randn(batch, cin, hw, hw, device=device, generator=g)
        w0 = torch.randn(cout, cin, k, k, device=device, generator=g) * 0.02
        hin = hw * 2 if up else hw
        hout = (hin + 2 * p - k) // s + 1
        flops = 3 * 2 * batch * cout * cin * k * k * hout * hout  # fwd + grad input + grad weight
        row = {"layer": name, "batch": batch, "flops": flops}
        forms = [("nchw", False, False), ("channels_last", True, False)]
        if up:
            forms += [("upconv_channels_last", True, True)]
        for label, cl, upc in forms:
            mf = torch.channels_last if cl else torch.contiguous_format
            x = x0.contiguous(memory_format=mf).requires_grad_()
            w = w0.contiguous(memory_format=mf).requires_grad_()

            def f():
                if upc:
                    y = upsample_conv3x3(x, w)
                else:
                    xi = F.interpolate(x, scale_factor=2, mode="nearest") if up else x
                    y = F.conv2d(xi, w, stride=s, padding=p)
                y.backward(torch.ones_like(y))

            f()
            sync()
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                f()
                sync()
                ts.append(time.perf_counter() - t)
            row[label + "_gflops"] = flops / statistics.median(ts) / 1e9
        out.append(row)
    return out


# --------------------------------------------------------------------------------------
# Workers (one process per part; results as JSON)
# --------------------------------------------------------------------------------------
def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def run_case(spec: dict) -> dict:
    """Original and our step(s) on one case, interleaved; FLOPs, memory, matmul figure."""
    device = torch.device(spec["device"])
    case = Case(**spec["case"])
    precision = spec["precision"]
    sync = _sync_fn(device)
    acc = make_accelerator(device.type, precision)
    batch = make_batch(case, device)
    inner = spec.get("inner", 1)  # iterations per timed sample (CUDA: several, one sync)
    res: dict = {"case": dataclasses.asdict(case), "name": case.name, "precision": precision, "runners": {},
                 "load_start": _load()}
    steps: dict[str, Callable[[], object]] = {}
    names = list(spec["runners"])
    for name in names:  # the first runner is built and warmed alone: its peak memory is clean
        t0 = time.perf_counter()
        if name == "original":
            G, D = build_models(case, device)
            orig = OriginalStep(G, D)
            fn = (lambda o=orig: o(batch.real, batch.emb, batch.z))
        else:
            ours = OursStep(acc, case, VARIANTS[name])
            fn = (lambda o=ours: o(batch.real, batch.emb, batch.z, batch.widx))
        r: dict = {"build_s": time.perf_counter() - t0}
        reset_peak_memory(device)
        sync()
        t0 = time.perf_counter()
        if spec.get("count_flops", True) and name != "ours-compile":  # the original is fp32 (no autocast)
            r["flops"] = count_flops(fn)
        else:
            fn()
        sync()
        r["first_s"] = time.perf_counter() - t0
        for _ in range(spec["warmup"] - 1):
            fn()
        sync()
        r["peak_mem_mb"] = peak_memory_mb(device)
        r["peak_mem_isolated"] = name == names[0]
        res["runners"][name] = r
        steps[name] = fn
        print(f"[bench]   {case.name} {precision} {name}: first iteration {r['first_s']:.2f}s",
              file=sys.stderr, flush=True)
    res["matmul_gflops"] = matmul_gflops(device, precision, spec["matmul_n"], 3)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(spec["rounds"]):
        order = names[rnd % len(names):] + names[: rnd % len(names)]  # rotate: no fixed position bias
        for name in order:
            sync()
            t = time.perf_counter()
            for _ in range(inner):
                steps[name]()
            sync()
            times[name].append((time.perf_counter() - t) / inner)
    res["matmul_gflops_end"] = matmul_gflops(device, precision, spec["matmul_n"], 2)
    for name in names:
        r = res["runners"][name]
        r["times"] = times[name]
        r["s_per_iter"] = statistics.median(times[name]) if times[name] else r["first_s"]
        r["img_per_s"] = case.batch / r["s_per_iter"]
    if "ours-compile" in res["runners"]:  # same arithmetic as ours
        rc = res["runners"]["ours-compile"]
        rc["flops"] = res["runners"].get("ours", {}).get("flops")
        rc["compile_s"] = max(0.0, rc["first_s"] - rc["s_per_iter"])
    if "original" in times and times["original"]:
        for name in names:
            if name != "original" and times[name]:
                ratios = [a / b for a, b in zip(times[name], times["original"])]
                res["runners"][name]["vs_original"] = statistics.median(ratios)
    if "infer" in spec.get("extras", ()) and case.stage == 2 and "ours" in names:
        res["inference_mode"] = _measure_inference_mode(acc, case, batch, device, spec["rounds"] + 1)
    res["process_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["load_end"] = _load()
    return res


def _measure_inference_mode(acc, case: Case, batch: Batch, device: torch.device, rounds: int) -> dict:
    """The frozen stage-I generator's forward: no_grad (current) vs inference_mode."""
    G, _ = build_models(case, device)
    G.train()
    sync = _sync_fn(device)
    fns = {"no_grad": lambda: G.low_res(batch.emb, batch.z),
           "inference_mode": lambda: _low_res_inference_mode(G, batch.emb, batch.z)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)
    out = {k + "_s": statistics.median(v) for k, v in times.items()}
    out["speedup"] = out["no_grad_s"] / out["inference_mode_s"]
    return out


def run_peak(spec: dict) -> dict:
    device = torch.device(spec["device"])
    res: dict = {"load_start": _load(), "matmul": {}}
    precs = ["fp32", "bf16"] if device.type == "cpu" else ["fp32", "tf32", "bf16", "fp16"]
    for p in precs:
        res["matmul"][p] = {"n": spec["matmul_n"], "gflops": matmul_gflops(device, p, spec["matmul_n"], 5)}
    res["conv"] = conv_gflops(device, spec["conv_batch"], spec["conv_reps"], spec.get("conv_scale", 1))
    res["load_end"] = _load()
    return res


def run_check(spec: dict) -> dict:
    acc = make_accelerator(spec["device"])
    return {"checks": [check_original_matches(tiny_case(s), acc) for s in (1, 2)]}


def run_procs(spec: dict) -> dict:
    """Our step under DDP (gloo on CPU) in each process started by torchrun, or alone."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    case = Case(**spec["case"])
    acc = make_accelerator(device.type)
    rank, world = acc.process_index, acc.num_processes
    ours = OursStep(acc, case)
    batch = make_batch(case, acc.device, seed=rank)
    for _ in range(spec["warmup"]):
        ours(batch.real, batch.emb, batch.z, batch.widx)
    acc.wait_for_everyone()
    t0 = time.perf_counter()
    for _ in range(spec["rounds"]):
        ours(batch.real, batch.emb, batch.z, batch.widx)
    acc.wait_for_everyone()
    el = time.perf_counter() - t0
    return {"processes": world, "threads_per_process": spec["threads"], "batch_per_process": case.batch,
            "global_batch": case.batch * world, "s_per_iter": el / spec["rounds"],
            "img_per_s": case.batch * world * spec["rounds"] / el, "rank": rank}


WORKERS = {"case": run_case, "peak": run_peak, "check": run_check, "procs": run_procs}


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads") and spec["kind"] != "procs":
        torch.set_num_threads(spec["threads"])
    res = WORKERS[spec["kind"]](spec)
    if spec["kind"] == "procs" and res.get("rank", 0) != 0:
        return 0
    _atomic_write(Path(spec["out"]), json.dumps(res))
    return 0


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------------------
# The plan and the orchestration
# --------------------------------------------------------------------------------------
@dataclass
class Job:
    part: str
    label: str
    spec: dict
    timeout: float
    nproc: int = 1  # > 1: started through torchrun


MAIN_RUNNERS = ["ours", "original", "ours-before"]  # in every case: the first runs alone first
VARIANT_RUNNERS = ["ours-no-upconv", "ours-cl-everywhere", "ours-foreach-adam", "ours-nchw", "ours-plain-adam"]


def plan(device: str, parts: set[str], quick: bool) -> list[Job]:
    """The worker jobs for the chosen parts (the order is the run order).

    CPU: stage I and II at the official sizes (variants at stage I b16 and stage II b4,
    where an iteration is cheap), the embedded sizes, fp32; bf16 once. CUDA: every
    precision, fewer cases in the half precisions, so that the whole run stays < 5 min.
    """
    cuda = device == "cuda"
    jobs: list[Job] = []
    base = {"device": device, "matmul_n": 512 if quick else (8192 if cuda else 4096),
            "threads": 1 if quick else None}  # quick: tiny ops, no OpenMP contention
    inner = 5 if cuda else 1  # iterations per timed sample

    def case_job(part, case, runners, precision="fp32", rounds=3, warmup=1, extras=(), timeout=1200):
        spec = {**base, "kind": "case", "case": dataclasses.asdict(case), "runners": list(runners),
                "precision": precision, "rounds": rounds, "warmup": warmup, "inner": inner,
                "extras": list(extras)}
        jobs.append(Job(part, f"{case.name} {precision}", spec, timeout))

    if "check" in parts:
        jobs.append(Job("check", "original == ours (tiny)", {**base, "kind": "check", "device": "cpu"}, 300))
    if "peak" in parts:
        spec = {**base, "kind": "peak", "conv_batch": 2 if quick else 16, "conv_reps": 2,
                "conv_scale": 8 if quick else 1}
        jobs.append(Job("peak", "matmul + conv", spec, 600))
    variants = VARIANT_RUNNERS if "variants" in parts else []
    if quick:
        s1, s2 = tiny_case(1, 4), tiny_case(2, 2)
        if parts & {"stage1", "variants"}:
            case_job("stage1", s1, MAIN_RUNNERS + variants, rounds=2)
        if parts & {"stage2", "variants"}:
            case_job("stage2", s2, MAIN_RUNNERS + variants, rounds=2, extras=["infer"] if variants else [])
        if "compile" in parts:
            case_job("compile", s1, ["ours", "ours-compile"], rounds=2, warmup=2, timeout=600)
        if "bf16" in parts:
            for p in (["bf16", "fp16"] if cuda else ["bf16"]):
                case_job("bf16", s1, MAIN_RUNNERS, p, rounds=1)
        mem_case, procs_case = tiny_case(2, 4), s1
    else:
        w = 2 if cuda else 1
        for p in (["fp32", "bf16", "fp16"] if cuda else ["fp32"]):
            half = p != "fp32"
            if "stage1" in parts:
                case_job("stage1", official_case(1, 64), MAIN_RUNNERS, p, rounds=10 if cuda else 3, warmup=w)
                if p != "fp16":
                    case_job("stage1", official_case(1, 16), MAIN_RUNNERS + ([] if half else variants), p,
                             rounds=10 if cuda else 4, warmup=w)
            if "stage2" in parts:
                case_job("stage2", official_case(2, 16), MAIN_RUNNERS, p, rounds=10 if cuda else 3, warmup=w)
            if "variants" in parts and not half:
                case_job("variants", official_case(2, 4), MAIN_RUNNERS + variants, p,
                         rounds=10 if cuda else 2, warmup=w, extras=["infer"])
            if "embedded" in parts and p != "fp16":
                for st, b in ((1, 64), (1, 16), (2, 16)) if not half else ((1, 64),):
                    case_job("embedded", embedded_case(st, b), MAIN_RUNNERS, p, rounds=10 if cuda else 4,
                             warmup=2)
        if "compile" in parts:  # stage I only: compiling stage II takes too long here
            case_job("compile", official_case(1, 16), ["ours", "ours-compile"], "bf16" if cuda else "fp32",
                     rounds=10 if cuda else 3, warmup=2, timeout=900)
        if "bf16" in parts and not cuda:  # once, stage I b16: is autocast worth it on this CPU?
            case_job("bf16", official_case(1, 16), MAIN_RUNNERS, "bf16", rounds=2)
        mem_case, procs_case = official_case(2, 64), official_case(1, 16)
    if "procs" in parts and not cuda:
        n = 1 if quick else 3
        two = {**base, "kind": "procs", "case": dataclasses.asdict(procs_case), "threads": 1, "rounds": n,
               "warmup": 1}
        one = {**two, "case": dataclasses.asdict(dataclasses.replace(procs_case, batch=procs_case.batch * 2)),
               "threads": 2}
        jobs.append(Job("procs", "1 process x 2 threads", one, 900))
        jobs.append(Job("procs", "2 processes x 1 thread (DDP, gloo)", two, 900, nproc=2))
    if "memory" in parts:
        spec = {**base, "kind": "case", "case": dataclasses.asdict(mem_case), "runners": ["ours"],
                "precision": "bf16" if cuda else "fp32", "rounds": 3 if cuda else 0, "warmup": 1,
                "inner": 1, "count_flops": False}
        jobs.append(Job("memory", f"{mem_case.name} peak memory", spec, 1200))
    return jobs


def run_job(job: Job, workdir: Path) -> dict:
    """Run one job in a fresh process; its JSON result, or the error it died of."""
    spec_path = workdir / f"{len(list(workdir.iterdir()))}-{job.part}.json"
    out = spec_path.with_suffix(".out.json")
    spec = {**job.spec, "out": str(out)}
    spec_path.write_text(json.dumps(spec))
    if job.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.nproc}",
               "-m", "stackgan.bench", "--worker", str(spec_path)]
    else:
        cmd = [sys.executable, "-m", "stackgan.bench", "--worker", str(spec_path)]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=job.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {job.timeout:.0f}s (skipped)", "wall_s": job.timeout}
    wall = time.perf_counter() - t0
    if p.stderr:
        for line in p.stderr.splitlines():
            if line.startswith("[bench]"):
                print(line, file=sys.stderr, flush=True)
    if p.returncode != 0 or not out.is_file():
        return {"error": f"worker exited with {p.returncode}: {p.stderr[-2000:]}", "wall_s": wall}
    res = json.loads(out.read_text())
    res["wall_s"] = wall
    return res


def run_data(args, trainer: list[dict]) -> dict:
    """The shard stream's samples/s (stackgan.bench_data) next to the trainer's images/s."""
    shards = Path(args.data_shards)
    if not (shards / "metadata.json").is_file():
        return {"skipped": f"no shards at {shards} (make them with shards/prepare.py, "
                           "or give --data-shards PATH)"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "data.json"
        cmd = [sys.executable, "-m", "stackgan.bench_data", "--shards", str(shards), "--out", str(out),
               "--workers", *[str(w) for w in args.data_workers], "--batches", "4" if args.quick else "16",
               "--batch-size", "16" if args.quick else "64"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if p.returncode != 0 or not out.is_file():
            return {"error": f"stackgan.bench_data exited with {p.returncode}: {p.stderr[-1500:]}"}
        data = json.loads(out.read_text())
    lines = []
    for r in data.get("results", []):
        if r.get("loader") != "stream":
            continue
        stage = 1 if r["size"] == 64 else 2
        need = [c["runners"]["ours"]["img_per_s"] for c in trainer
                if c.get("case", {}).get("stage") == stage and "ours" in c.get("runners", {})
                and c.get("precision") in ("fp32", "bf16")]
        fastest = max(need) if need else None
        lines.append({"size": r["size"], "workers": r["workers"], "stream_samples_per_s": r["samples_per_s"],
                      "trainer_img_per_s_max": fastest,
                      "stream_over_trainer": r["samples_per_s"] / fastest if fastest else None})
    return {"bench_data": data, "stream_vs_trainer": lines}


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if device == "cuda" and torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        info.update(gpu=prop.name, gpu_mem_gib=round(prop.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpu_capability=f"{prop.major}.{prop.minor}")
    return info


def matmul_peaks(report: dict) -> dict[str, float]:
    """The best matmul figure per precision over the whole run (peak part and every worker).

    On a shared machine a single matmul measurement can land in a busy moment; the machine's
    peak is what it reached at its best, so fractions of it are conservative.
    """
    best: dict[str, float] = {}
    for prec, v in report.get("peak", {}).get("matmul", {}).items():
        best[prec] = max(best.get(prec, 0.0), v["gflops"])
    for c in report["cases"]:
        for k in ("matmul_gflops", "matmul_gflops_end"):
            if c.get(k):
                best[c["precision"]] = max(best.get(c["precision"], 0.0), c[k])
    return best


def derive(report: dict) -> None:
    """GFLOP/s, fractions of the matmul peak and target checks, per runner (in place).

    ``frac_matmul``: of the run's best matmul figure in the step's precision;
    ``frac_matmul_local``: of the mean matmul figure of its own worker (start and end);
    ``frac_matmul_useful``: the original step's FLOPs per second of this step, of the peak.
    """
    peaks = report["matmul_peak_gflops"] = matmul_peaks(report)
    targets = []
    for c in report["cases"]:
        if "runners" not in c:
            continue
        orig = c["runners"].get("original", {})
        local = [c[k] for k in ("matmul_gflops", "matmul_gflops_end") if c.get(k)]
        for name, r in c["runners"].items():
            prec = "fp32" if name == "original" else c["precision"]
            mm = peaks.get(prec)
            fl = r.get("flops")
            if not (fl and r.get("s_per_iter")):
                continue
            r["gflops_per_s"] = fl / r["s_per_iter"] / 1e9
            if mm:
                r["frac_matmul"] = r["gflops_per_s"] / mm
            if local and prec == c["precision"]:
                r["frac_matmul_local"] = r["gflops_per_s"] / statistics.mean(local)
            if orig.get("flops"):  # the original algorithm's work per second of this step
                r["original_gflops_per_s"] = orig["flops"] / r["s_per_iter"] / 1e9
                if mm:
                    r["frac_matmul_useful"] = r["original_gflops_per_s"] / mm
        official = c["case"]["size"] == "official" and c["part"] in ("stage1", "stage2")
        if official and c["precision"] == "fp32" and orig:
            for name in ("ours", "ours-before"):
                r = c["runners"].get(name)
                if r and "vs_original" in r:
                    targets.append({"case": c["name"], "step": name, "vs_original": r["vs_original"],
                                    "ok_time": r["vs_original"] <= TARGET_VS_ORIGINAL,
                                    "frac_matmul": r.get("frac_matmul"),
                                    "frac_matmul_local": r.get("frac_matmul_local"),
                                    "frac_matmul_useful": r.get("frac_matmul_useful"),
                                    "ok_peak": (r.get("frac_matmul") or 0) >= TARGET_FRAC_PEAK})
    report["targets"] = targets


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_tables(report: dict) -> str:
    """Markdown tables (also readable in a terminal)."""
    out = []
    m = report["machine"]
    out.append(f"machine: {m.get('cpu_model', '?')}, {m['cpus']} CPUs, torch {m['torch']}"
               + (f", GPU {m['gpu']}" if "gpu" in m else "")
               + f"; load average start {report['load_start']} end {report.get('load_end')}")
    if report.get("matmul_peak_gflops"):
        out.append("matmul peak (best figure of the run, GFLOP/s): " + ", ".join(
            f"{k} {v:.0f}" for k, v in report["matmul_peak_gflops"].items()))
    pk = report.get("peak")
    if pk and "matmul" in pk:
        out.append("\n| matmul | n | GFLOP/s |\n|---|---|---|")
        for p, v in pk["matmul"].items():
            out.append(f"| {p} | {v['n']} | {v['gflops']:.1f} |")
        out.append("\n| conv fwd+bwd (GFLOP/s) | batch | NCHW | channels-last | upconv (channels-last) |\n"
                   "|---|---|---|---|---|")
        for r in pk["conv"]:
            out.append(f"| {r['layer']} | {r['batch']} | {r['nchw_gflops']:.1f} | "
                       f"{r['channels_last_gflops']:.1f} | "
                       f"{_f(r.get('upconv_channels_last_gflops'), '.1f')} |")
    if report["cases"]:
        out.append("\n| case | prec | step | s/iter | img/s | GFLOP/iter | GFLOP/s | of matmul peak | "
                   "x original | "
                   "peak mem MiB |\n|---|---|---|---|---|---|---|---|---|---|")
        for c in report["cases"]:
            if "runners" not in c:
                out.append(f"| {c['label']} | | {c.get('error', '')[:80]} | | | | | | | |")
                continue
            for name, r in c["runners"].items():
                prec = "fp32" if name == "original" else c["precision"]
                mem = _f(r.get("peak_mem_mb"), ".0f") + ("" if r.get("peak_mem_isolated") else "*")
                extra = f" (compile {r['compile_s']:.0f}s)" if "compile_s" in r else ""
                out.append(f"| {c['name']} | {prec} | {name}{extra} | {r['s_per_iter']:.3f} | "
                           f"{r['img_per_s']:.1f} | {_f(r.get('flops') and r['flops'] / 1e9, '.1f')} | "
                           f"{_f(r.get('gflops_per_s'), '.1f')} | "
                           f"{_f(r.get('frac_matmul') and 100 * r['frac_matmul'], '.0f')}% | "
                           f"{_f(r.get('vs_original'), '.2f')} | {mem} |")
        out.append("(peak memory: RSS of the worker process (CUDA: GPU memory) while that step ran first "
                   "and alone; * = later steps, with the earlier ones still resident)")
        for c in report["cases"]:
            if "inference_mode" in c:
                im = c["inference_mode"]
                out.append(f"\nfrozen stage-I G forward ({c['name']}): "
                           f"no_grad {im['no_grad_s'] * 1e3:.0f} ms, "
                           f"inference_mode {im['inference_mode_s'] * 1e3:.0f} ms ({im['speedup']:.2f}x)")
    if report.get("procs"):
        out.append("\n| processes x threads | global batch | s/iter | img/s |\n|---|---|---|---|")
        for r in report["procs"]:
            if "error" in r:
                out.append(f"| {r['label']} | error: {r['error'][:80]} | | |")
            else:
                out.append(f"| {r['processes']} x {r['threads_per_process']} | {r['global_batch']} | "
                           f"{r['s_per_iter']:.3f} | {r['img_per_s']:.1f} |")
    if report.get("targets"):
        out.append("\n| target (official fp32) | step | x original (<= 0.75) | of matmul peak (>= 75%) | "
                   "of its worker's matmul | original's FLOPs per second of this step, of peak |\n"
                   "|---|---|---|---|---|---|")
        for t in report["targets"]:
            ok_time = "ok" if t["ok_time"] else "MISSED"
            ok_peak = "ok" if t["ok_peak"] else "MISSED"
            out.append(f"| {t['case']} | {t['step']} | {t['vs_original']:.2f} {ok_time} | "
                       f"{_f(t['frac_matmul'] and 100 * t['frac_matmul'], '.0f')}% {ok_peak} | "
                       f"{_f(t.get('frac_matmul_local') and 100 * t['frac_matmul_local'], '.0f')}% | "
                       f"{_f(t.get('frac_matmul_useful') and 100 * t['frac_matmul_useful'], '.0f')}% |")
    d = report.get("data")
    if d and d.get("stream_vs_trainer"):
        out.append("\n| data stream | workers | samples/s | trainer img/s (fastest) | stream / trainer |\n"
                   "|---|---|---|---|---|")
        for r in d["stream_vs_trainer"]:
            out.append(f"| {r['size']}px | {r['workers']} | {r['stream_samples_per_s']:.1f} | "
                       f"{_f(r['trainer_img_per_s_max'], '.1f')} | {_f(r['stream_over_trainer'], '.1f')} |")
    elif d:
        out.append(f"\ndata stream: {d.get('skipped') or d.get('error')}")
    for c in report.get("checks", []):
        out.append(f"\ncheck {c['case']}: original vs ours over {c['steps']} steps: max loss diff "
                   f"{c['max_loss_diff']:.2e}, max parameter diff {c['max_param_diff']:.2e}, "
                   f"parameters off by > 1e-5: {_f(c.get('frac_params_off'), '.2e')}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def parse_parts(text: str | None) -> set[str]:
    if not text:
        return set(PARTS)
    parts = {p.strip() for p in text.split(",") if p.strip()}
    bad = sorted(parts - set(PARTS))
    if bad:
        raise BenchError(f"--only: unknown part(s) {', '.join(bad)} (known: {', '.join(PARTS)})")
    return parts


DATA_SHARDS = ("shards/birds-embedded", "shards/birds-cub-scale", "shards/cub")


def _default_shards() -> str:
    for d in DATA_SHARDS:
        if (ROOT / d / "metadata.json").is_file():
            return str(ROOT / d)
    return str(ROOT / DATA_SHARDS[0])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stackgan.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny networks, one or two iterations (smoke test)")
    p.add_argument("--only", help=f"comma-separated parts: {','.join(PARTS)}")
    p.add_argument("--out", help="JSON file (default runs/bench/bench-<device>-<time>.json)")
    p.add_argument("--data-shards", default=_default_shards(),
                   help="shards for the data-stream line (part 'data'; default: the first of "
                        f"{', '.join(DATA_SHARDS)} that exists)")
    p.add_argument("--data-workers", type=int, nargs="+", default=[0, 2],
                   help="loader workers for part 'data'")
    p.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.report:
        rep = json.loads(Path(args.report).read_text())
        derive(rep)
        print(format_tables(rep))
        return 0
    try:
        parts = parse_parts(args.only)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise BenchError("--device cuda: no CUDA device is visible here "
                             "(torch.cuda.is_available() is False)")
    except BenchError as e:
        print(f"stackgan.bench: error: {e}", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "runs" / "bench" / f"bench-{args.device}-{stamp}.json"
    cmdline = " ".join(argv if argv is not None else sys.argv[1:])
    report: dict = {"schema": 1, "command": f"python -m stackgan.bench {cmdline}".strip(),
                    "started": _dt.datetime.now().isoformat(timespec="seconds"), "device": args.device,
                    "quick": args.quick, "parts": sorted(parts), "machine": machine_info(args.device),
                    "load_start": _load(), "cases": [], "procs": [], "checks": [], "errors": []}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stackgan-bench-") as d:
        for job in plan(args.device, parts, args.quick):
            print(f"[bench] {job.part}: {job.label} (load {_load()})", file=sys.stderr, flush=True)
            res = run_job(job, Path(d))
            if "error" in res:
                report["errors"].append({"part": job.part, "label": job.label, "error": res["error"]})
                print(f"[bench]   FAILED: {res['error'][-500:]}", file=sys.stderr, flush=True)
            if job.part == "peak":
                report["peak"] = res
            elif job.part == "check":
                report["checks"] = res.get("checks", [])
            elif job.part == "procs":
                report["procs"].append({"label": job.label, **res})
            else:
                report["cases"].append({"part": job.part, "label": job.label, **res})
    if "data" in parts:
        print(f"[bench] data: stackgan.bench_data on {args.data_shards}", file=sys.stderr, flush=True)
        report["data"] = run_data(args, report["cases"])
    report["load_end"] = _load()
    report["wall_s"] = time.perf_counter() - t_all
    derive(report)
    text = format_tables(report)
    print(text)
    _atomic_write(out, json.dumps(report, indent=1))
    print(f"\nwrote {out} ({report['wall_s']:.0f}s)")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
