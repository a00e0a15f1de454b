"""Detail at 256 px: spectral sharpness, and the detail net whose features ``fd256`` uses.

Stage II exists to add what a 64-px image cannot hold, so its figures are read against
bicubic upsampling of its own stage-I input (:func:`upsample`), and against real 256-px
crops reduced to 64 px and upsampled the same way (the upsampling baseline's level).

**Sharpness** (:func:`hf_share`): the share of an image's spectral power (luminance,
Hann-windowed, mean removed) above the band a 64-px image can hold: spatial frequencies
beyond 32 cycles per image along either axis. Contrast-free, no training; read as a ratio
to real crops (1 = as much fine detail as real birds, > 1 = more: noise or artifacts).

**Detail net** (:class:`DetailNet`): the features of a network trained for content
(species) are nearly blind to sharpness: on the embedded set, real test crops were *closer*
to their own 64-px versions upsampled (FD 0.06 in the pooled features of such a net, 60
steps) than to real train crops (3.5), so upsampling would look like perfect realism. This net is trained
mainly to tell how much detail an image holds: a random 256 crop of a real train image is
shown as it is or reduced to s px (s in :data:`SCALES`, area) and brought back to 256 px
(bicubic or bilinear), and a head regresses its effective resolution t = log4(s / 64) in
[0, 1] (1 = real); a species head with a small weight keeps the birds' content in the
features. Features for the Frechet distance: the mean over positions of each of its five
blocks' maps (128x128 down to 8x8), ``23 * width`` values: the early maps carry texture,
the late ones the bird.

``python -m stackgan.metrics.detail train --shards DIR [--out PATH]`` trains and caches a
net (atomic write; ``detail256.pt`` in the shard folder by default, or in the cache folder
when that is read-only: :mod:`.netcache`) and prints its real reference
figures; ``show PATH`` prints a file's report. Metrics train it on first use.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stackgan.data.meta import ShardError, ShardMeta, load_metadata
from stackgan.errors import StackGANError
from stackgan.images import to_unit, upsample

from .core import EvalContext, MetricError, all_sum, rank_world, resize, resolve_device
from .evalset import CROP_OF, decode_image, iter_split, to_tensor
from .netcache import cache_path, load_net, make_once, save_net, shard_fingerprint
from .stats import GaussianSums, frechet_distance

FORMAT = "stackgan-detail256/1"
DEFAULT_FILE = "detail256.pt"  # in the shard folder, or the cache folder when that is read-only (netcache)
SIZE, STORED, LOW = 256, 304, 64  # net input, stored real image, the stage-I size
SCALES = (64, 96, 128, 176, 256)  # sizes a training crop is reduced to (256: shown as it is)
CUTOFF = LOW // 2  # cycles per image a 64-px image can hold (its Nyquist frequency)
SPECIES_COEF = 0.1  # weight of the species loss next to the detail loss
EPOCHS, MIN_STEPS, MAX_STEPS = 3.0, 60, 300  # default length: 3 passes, clipped to [60, 300] steps


class DetailNetError(StackGANError, RuntimeError):
    """A detail-net file that is missing, of another format, or made for other shards."""


# --------------------------------------------------------------------------------------
# Image operations
# --------------------------------------------------------------------------------------
def reduce_detail(images: torch.Tensor, low: int = LOW, mode: str = "bicubic") -> torch.Tensor:
    """What remains of 256-px images held at ``low`` px: area-downsampled, then upsampled back."""
    return upsample(resize(images, low), images.shape[-1], mode)


def _hann(n: int, device: torch.device) -> torch.Tensor:
    w = torch.hann_window(n, periodic=False, dtype=torch.float64, device=device)
    return w[:, None] * w[None, :]


def hf_share(images: torch.Tensor, cutoff: int = CUTOFF) -> torch.Tensor:
    """(B,) share of each image's spectral power above ``cutoff`` cycles per image (along
    either axis), of its luminance with the mean removed and a Hann window against the
    border's jump. Upsampled 64-px images score near 0, white noise about 1 - (2 cutoff / side)^2."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"hf_share: images must be (B, 3, S, S), got {tuple(images.shape)}")
    side = images.shape[-1]
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64, device=images.device)
    lum = torch.einsum("bchw,c->bhw", images.double(), weights)
    lum = (lum - lum.mean((1, 2), keepdim=True)) * _hann(side, images.device)
    power = torch.fft.fft2(lum).abs().square()
    freq = torch.fft.fftfreq(side, 1.0 / side, device=images.device).abs()  # cycles per image
    high = (freq[:, None] > cutoff) | (freq[None, :] > cutoff)
    total = power.sum((1, 2)) - power[:, 0, 0]
    return (power * high).sum((1, 2)) / total.clamp(min=1e-30)


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------
class DetailOut(NamedTuple):
    detail: torch.Tensor  # (B,) logit of the effective resolution t = log4(s / 64)
    species: torch.Tensor  # (B, classes) logits
    features: torch.Tensor  # (B, feature_dim) for the Frechet distance


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DetailNet(nn.Module):
    """256x256 image -> :class:`DetailOut`: five 3x3 stride-2 conv blocks (128 ... 8 px
    maps, widths w, 2w, 4w, 8w, 8w), two linear heads on the last map's mean."""

    def __init__(self, num_classes: int, width: int = 8):
        super().__init__()
        chans = (width, 2 * width, 4 * width, 8 * width, 8 * width)
        self.blocks = nn.ModuleList(_block(cin, cout) for cin, cout in zip((3,) + chans[:-1], chans))
        self.detail = nn.Linear(chans[-1], 1)
        self.species = nn.Linear(chans[-1], num_classes)
        self.width = width
        self.feature_dim = sum(chans)

    def forward(self, x: torch.Tensor) -> DetailOut:
        pooled = []
        for block in self.blocks:
            x = block(x)
            pooled.append(x.mean((2, 3)))
        return DetailOut(self.detail(pooled[-1])[:, 0], self.species(pooled[-1]), torch.cat(pooled, 1))


def resolution_target(sizes: torch.Tensor) -> torch.Tensor:
    """Effective resolution s (px) -> the detail head's target log4(s / 64) in [0, 1]."""
    return torch.log(sizes.double() / LOW).div(math.log(SIZE / LOW)).float()


def effective_resolution(detail_logits: torch.Tensor) -> torch.Tensor:
    """The detail head's reading in px: 64 * 4^sigmoid(logit), from 64 (no detail) to 256 (real)."""
    return LOW * (SIZE / LOW) ** torch.sigmoid(detail_logits.double())


@dataclass
class DetailReport:
    n_train: int
    classes: int
    steps: int
    batch_size: int
    epochs: float  # passes over the training images
    seconds: float  # wall time of training (reading the images included)
    cpu_seconds: float  # process CPU time of the same
    detail_error: float  # mean |predicted - true| effective-resolution target, last 10% of steps
    species_accuracy: float  # on the training batches of the last 10% of steps


class DetailFile:
    """A trained net with what it was trained on."""

    def __init__(self, net: DetailNet, classes: list[int], report: DetailReport | None = None,
                 trained_on: dict | None = None):
        self.net = net.eval()
        self.classes = classes
        self.report = report
        self.trained_on = trained_on or {}

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> DetailOut:
        """Images (B, 3, 256, 256) in [-1, 1] -> outputs on the net's device."""
        if images.shape[1:] != (3, SIZE, SIZE):
            raise ValueError(f"the detail net takes (B, 3, {SIZE}, {SIZE}) images, got {tuple(images.shape)}")
        self.net.eval()
        return self.net(images.to(self.device, torch.float32))

    def save(self, path: str | Path, meta: ShardMeta) -> Path:
        """Write the net to ``path`` atomically (:func:`stackgan.metrics.netcache.save_net`)."""
        return save_net(path, FORMAT, {
            "state_dict": self.net.state_dict(), "width": self.net.width, "classes": self.classes,
            "report": asdict(self.report) if self.report else None,
            "shards": {"root": str(meta.root), "fingerprint": shard_fingerprint(meta)},
        }, meta)


def load_detail_net(path: str | Path, meta: ShardMeta | None = None,
                    device: str | torch.device = "cpu") -> DetailFile:
    """Load a detail-net file (no code runs: weights_only); with ``meta``, refuse one trained
    on other shards."""
    path = Path(path)
    if not path.is_file():
        raise DetailNetError(f"detail net not found: {path} "
                             "(train one: python -m stackgan.metrics.detail train --shards DIR)")
    d = load_net(path, (FORMAT,), DetailNetError, "detail-net")
    if meta is not None and d["shards"]["fingerprint"] != shard_fingerprint(meta):
        raise DetailNetError(
            f"{path}: this detail net was trained on other shards ({d['shards']['root']}) than {meta.root}; "
            "its features would not fit these images. Delete the file to train one on these shards on "
            "first use, or point --detail-net at another path")
    net = DetailNet(len(d["classes"]), d["width"])
    net.load_state_dict(d["state_dict"])
    report = DetailReport(**d["report"]) if d.get("report") else None
    return DetailFile(net.to(device), list(d["classes"]), report, d["shards"])


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
class _JpegSet:
    """A split's stored 304-px JPEGs kept encoded (CUB-scale: 160 MB instead of 2.5 GB
    decoded), decoded per batch into random 256 crops with random flips."""

    def __init__(self, meta: ShardMeta, split: str):
        self.jpegs: list[bytes] = []
        cls = []
        for s in iter_split(meta, split, (meta.image_field(STORED), "cls")):
            self.jpegs.append(s[meta.image_field(STORED)])
            cls.append(int(s["cls"].decode().strip()))
        self.classes = sorted(set(cls))
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = torch.tensor([index[c] for c in cls])

    def __len__(self) -> int:
        return len(self.jpegs)

    def crops(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        imgs = np.stack([decode_image(self.jpegs[i], STORED) for i in idx.tolist()])
        corners = torch.randint(0, STORED - SIZE + 1, (len(idx), 2), generator=gen).tolist()
        x = torch.from_numpy(np.stack([im[y : y + SIZE, x0 : x0 + SIZE]
                                       for im, (y, x0) in zip(imgs, corners)]))
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x[flip] = x[flip].flip(2)
        return to_unit(x.permute(0, 3, 1, 2))


def degrade(images: torch.Tensor, sizes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image reduced to its ``sizes`` entry (area) and upsampled back, bicubic or
    bilinear at random per size; entries of 256 stay as they are."""
    out = images.clone()
    for s in sorted(set(sizes.tolist()) - {SIZE}):
        pick = sizes == s
        mode = ("bicubic", "bilinear")[int(torch.randint(2, (), generator=gen))]
        out[pick] = reduce_detail(images[pick], s, mode)
    return out


def default_steps(n_images: int, batch_size: int) -> int:
    return max(MIN_STEPS, min(MAX_STEPS, round(EPOCHS * n_images / batch_size)))


@torch.enable_grad()  # callers (metrics at snapshot time) may be inside no_grad
def _fit(net: DetailNet, data: _JpegSet, steps: int, batch_size: int, lr: float, gen: torch.Generator,
         device, log) -> tuple[float, float]:
    """AdamW + one-cycle LR on the detail + species loss; returns (detail error, species
    accuracy) over the last 10% of steps."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    scales = torch.tensor(SCALES)
    tail = max(1, steps // 10)
    err = acc = 0.0
    net.train()
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=gen)
        sizes = scales[torch.randint(len(SCALES), (batch_size,), generator=gen)]
        x = degrade(data.crops(idx, gen), sizes, gen).to(device)
        target, labels = resolution_target(sizes).to(device), data.labels[idx].to(device)
        out = net(x)
        loss = (F.binary_cross_entropy_with_logits(out.detail, target)
                + SPECIES_COEF * F.cross_entropy(out.species, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - tail:
            err += float((torch.sigmoid(out.detail.detach()) - target).abs().mean()) / tail
            acc += float((out.species.detach().argmax(1) == labels).float().mean()) / tail
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"detail net step {step + 1}/{steps}: loss {float(loss.detach()):.4f}")
    net.eval()
    return err, acc


def train_detail_net(shards: str | Path, *, steps: int = 0, batch_size: int = 32, width: int = 8,
                     lr: float = 2e-3, seed: int = 0, device: str | torch.device = "cpu",
                     log=print) -> DetailFile:
    """Train a detail net on the real 304-px train images of ``shards`` (module docstring).
    Length: ``steps`` updates, or when 0 :func:`default_steps` (3 passes, 60 to 300 steps)."""
    meta = load_metadata(shards)
    if STORED not in meta.image_sizes:
        raise DetailNetError(f"{shards}: the detail net trains on the {STORED}px images; the shards have "
                             f"{meta.image_sizes}")
    if steps < 0 or batch_size <= 0 or width <= 0 or lr <= 0:
        raise DetailNetError(f"steps must be >= 0 and batch_size, width, lr > 0 (got {steps}, {batch_size}, "
                             f"{width}, {lr})")
    t0, c0 = time.perf_counter(), time.process_time()
    data = _JpegSet(meta, "train")
    if len(data) < 2:
        raise DetailNetError(f"{shards}: too few training images for the detail net ({len(data)})")
    torch.manual_seed(seed)
    net = DetailNet(len(data.classes), width).to(device)
    steps = steps or default_steps(len(data), batch_size)
    err, acc = _fit(net, data, steps, batch_size, lr, torch.Generator().manual_seed(seed), device, log)
    report = DetailReport(
        n_train=len(data), classes=len(data.classes), steps=steps, batch_size=batch_size,
        epochs=round(steps * batch_size / len(data), 2), seconds=round(time.perf_counter() - t0, 1),
        cpu_seconds=round(time.process_time() - c0, 1), detail_error=round(err, 4),
        species_accuracy=round(acc, 4))
    return DetailFile(net, data.classes, report,
                      {"root": str(meta.root), "fingerprint": shard_fingerprint(meta)})


def detail_net_path(ctx: EvalContext) -> Path:
    """``ctx.detail_net``, else :data:`DEFAULT_FILE` in the shard folder or the cache folder."""
    return cache_path(ctx.meta, DEFAULT_FILE, ctx.detail_net, ctx.cache_dir)


def ensure_detail_net(ctx: EvalContext) -> DetailFile:
    """The context's detail net: loaded from :func:`detail_net_path`, or trained there first
    (rank 0 trains, the others wait)."""
    if "detail_net" in ctx.cache:
        return ctx.cache["detail_net"]
    path = detail_net_path(ctx)
    def make() -> None:
        ctx.log(f"no detail net at {path}: training one on {ctx.shards} (cached for later runs)")
        trained = train_detail_net(ctx.shards, device=ctx.device, log=lambda m: None)
        trained.save(path, ctx.meta)
        ctx.log(f"detail net: {format_report(trained.report)}")

    make_once(path, make)
    try:
        net = load_detail_net(path, ctx.meta, ctx.device)
    except DetailNetError as e:
        raise MetricError(str(e)) from e
    ctx.cache["detail_net"] = net
    return net


def format_report(r: DetailReport | None) -> str:
    if r is None:
        return "(no report)"
    return (f"{r.n_train} training images of {r.classes} species, {r.steps} steps of {r.batch_size} "
            f"({r.epochs:g} epochs), {r.seconds:.0f} s ({r.cpu_seconds:.0f} s CPU); last steps: effective-"
            f"resolution error {r.detail_error:.3f} (of 1 = 64 -> 256 px), species accuracy "
            f"{r.species_accuracy:.2f}")


# --------------------------------------------------------------------------------------
# Real reference figures (independent of any generator)
# --------------------------------------------------------------------------------------
def real_crops(meta: ShardMeta, split: str, batch_size: int, *, limit: int = 0) -> Iterator[torch.Tensor]:
    """This rank's share of a split's 256 centre crops in [-1, 1], in batches. ``limit`` > 0
    takes that many samples spread evenly over the split (shards are ordered by species)."""
    n = meta.splits[split].num_samples
    every = max(1, n // limit) if limit else 1
    take = min(limit, n) if limit else n
    rank, world = rank_world()
    batch: list[np.ndarray] = []
    for i, s in enumerate(iter_split(meta, split, (meta.image_field(STORED),))):
        k = i // every  # the k-th sample taken
        if k >= take:
            break
        if i % every == 0 and k % world == rank:
            batch.append(decode_image(s[meta.image_field(STORED)], STORED, CROP_OF[STORED]))
        if len(batch) == batch_size:
            yield to_tensor(np.stack(batch))
            batch = []
    if batch:
        yield to_tensor(np.stack(batch))


class ImageSums:
    """Per-source sums over batches of 256-px images: detail-net features and effective
    resolution (when a net is given) and high-frequency share; :meth:`reduce` adds ranks."""

    def __init__(self, net: DetailFile | None):
        self.net = net
        self.feats = GaussianSums(net.net.feature_dim) if net is not None else None
        self.sums = {k: torch.zeros((), dtype=torch.float64) for k in ("n", "hf", "resolution")}

    def add(self, images: torch.Tensor) -> None:
        self.sums["n"] += len(images)
        self.sums["hf"] += hf_share(images).sum().cpu()
        if self.net is not None:
            out = self.net(images)
            self.feats.add(out.features)
            self.sums["resolution"] += effective_resolution(out.detail).sum().cpu()

    def reduce(self) -> "ImageSums":
        """Totals over all ranks (a new object)."""
        out = copy.copy(self)
        out.sums = all_sum(self.sums)
        out.feats = self.feats.reduce() if self.feats is not None else None
        return out

    @property
    def n(self) -> int:
        return int(self.sums["n"])

    def mean(self, key: str) -> float:
        return float(self.sums[key] / self.sums["n"]) if self.n else float("nan")


def fd(a: ImageSums, b: ImageSums) -> float:
    """Frechet distance between two sources' detail-net features."""
    return frechet_distance(*a.feats.mean_cov(), *b.feats.mean_cov())


@dataclass
class RealReference:
    """Real crops: the test split as it is and reduced to 64 px and upsampled, and an
    evenly spread subset of the train split (the floor's other side)."""

    test: ImageSums
    test_upsampled: ImageSums
    train: ImageSums | None  # only with a net (it is only used for the floor)


def real_reference(meta: ShardMeta, net: DetailFile | None, batch_size: int,
                   train_samples: int) -> RealReference:
    """One pass over the real test crops (and, with a net, ``train_samples`` train crops)."""
    test, test_up = ImageSums(net), ImageSums(net)
    device = net.device if net is not None else torch.device("cpu")
    for x in real_crops(meta, "test", batch_size):
        x = x.to(device)
        test.add(x)
        test_up.add(reduce_detail(x))
    train = None
    if net is not None:
        train = ImageSums(net)
        for x in real_crops(meta, "train", batch_size, limit=train_samples):
            train.add(x.to(device))
        train = train.reduce()
    return RealReference(test.reduce(), test_up.reduce(), train)


def reference_figures(ref: RealReference) -> dict:
    """What real images score: the FD floor (test vs train crops), the upsampling level (test
    vs their own 64-px versions upsampled), sharpness and effective resolution."""
    out = {"hf_share_real": ref.test.mean("hf"),
           "sharpness_real_upsampled": ref.test_upsampled.mean("hf") / ref.test.mean("hf"),
           "n_test": ref.test.n}
    if ref.train is not None:
        out |= {"fd_floor": fd(ref.train, ref.test), "fd_real_upsampled": fd(ref.test_upsampled, ref.test),
                "resolution_real": ref.test.mean("resolution"),
                "resolution_real_upsampled": ref.test_upsampled.mean("resolution"), "n_train": ref.train.n}
    return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.metrics.detail",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a detail net on a shard set's real 304px images and cache it")
    t.add_argument("--shards", required=True, help="prepared shard folder with 304px images")
    t.add_argument("--out", default="",
                   help="detail-net file (default detail256.pt in the shard folder, or the cache folder when "
                        "that is read-only)")
    t.add_argument("--cache-dir", default="", help="the cache folder (default $XDG_CACHE_HOME/stackgan)")
    t.add_argument("--steps", type=int, default=0,
                   help=f"optimizer updates (default: {EPOCHS:g} passes, within [{MIN_STEPS}, {MAX_STEPS}])")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--width", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    t.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default; 1 is fastest on a busy small machine)")
    t.add_argument("--reference-samples", type=int, default=1000,
                   help="train crops for the FD floor (0: skip the real reference figures)")
    s = sub.add_parser("show", help="print a detail-net file's stored report")
    s.add_argument("path")
    args = p.parse_args(argv)
    try:
        if args.cmd == "show":
            f = load_detail_net(args.path)
            report = asdict(f.report) if f.report else None
            print(json.dumps({"report": report, "shards": f.trained_on}, indent=1))
            return 0
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        meta = load_metadata(args.shards)
        out = cache_path(meta, DEFAULT_FILE, args.out, args.cache_dir)
        try:
            device = resolve_device(args.device)
        except ValueError as e:  # an unknown device name, or CUDA asked for where there is none
            raise DetailNetError(str(e)) from e
        net = train_detail_net(args.shards, steps=args.steps, batch_size=args.batch_size, width=args.width,
                               lr=args.lr, seed=args.seed, device=device)
        net.save(out, meta)
        print(f"detail net written to {out}\n{format_report(net.report)}")
        if args.reference_samples > 0:
            t0 = time.perf_counter()
            figures = reference_figures(real_reference(meta, net, 64, args.reference_samples))
            print(f"real reference ({time.perf_counter() - t0:.0f} s): " + json.dumps(figures))
        return 0
    except (DetailNetError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
