"""The paper's Inception Score: StackGAN's CUB Inception-v3 (TensorFlow) in PyTorch.

Every published CUB IS (StackGAN 3.70, StackGAN++ 4.04, AttnGAN 4.36, ...) comes from
``StackGAN-inception-model``: Inception-v3 written with the *old* TF-slim library of
tensorflow/models' ``inception`` package (``from inception.slim import slim``; scopes
``conv0 ... conv4``, ``mixed_35x35x256a ... mixed_8x8x2048b``, ``logits/logits``; not the
later ``tf.contrib.slim`` names ``Conv2d_1a_3x3 ... Mixed_7c``), fine-tuned on CUB with
50 + 1 classes (logit 0 is an unused background class), checkpoint ``model.ckpt-5000``.
Its ``inception_score.py`` (the facts reproduced here):

* BatchNorm with ``beta`` only (no gamma), epsilon 0.001; convs without bias; ReLU;
  TF ``SAME``/``VALID`` padding; ``SAME`` average pools exclude the padding from the count;
* it restores the ExponentialMovingAverage (0.9999) shadow of every variable;
* images are resized to 299x299 with ``scipy.misc.imresize(..., 'bilinear')`` (PIL bilinear
  on uint8) and scaled ``x / 127.5 - 1``;
* ``softmax(logits[:, 1:])`` (background dropped), then over 10 contiguous splits
  ``exp(mean_x sum_y p log(p / mean_x p))``; mean and std over splits.

:func:`convert` reads such a checkpoint (``tensorflow-cpu``, the ``paper-is`` extra, is
needed for that step only) and writes a plain state_dict for :class:`TFInceptionV3`;
``inception_score_paper`` scores a generator with it. Command line::

    python -m stackgan.metrics.tf_inception convert --ckpt model.ckpt-5000 --out inception51.pt
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stackgan.errors import report

from .core import EvalContext, MetricError, full_precision, generate, register, requirement
from .netcache import read_state_dict
from .stats import ISSums

EPS = 0.001  # the official batch_norm_params epsilon
EMA = "/ExponentialMovingAverage"
NOTE = ("the paper's IS: StackGAN-inception-model (TF-slim Inception-v3 fine-tuned on CUB, converted), "
        "background logit dropped, PIL bilinear 299 px; see docs/evaluation.md for what differs")


class TFInceptionError(MetricError):
    """A TF checkpoint or converted file that does not fit the StackGAN Inception layout."""


# --------------------------------------------------------------------------------------
# TF padding, reproduced
# --------------------------------------------------------------------------------------
def same_pads(n: int, k: int, stride: int) -> tuple[int, int]:
    """TF's SAME padding of one axis (before, after): the extra pixel goes after (asymmetric)."""
    out = -(-n // stride)
    total = max((out - 1) * stride + k - n, 0)
    return total // 2, total - total // 2


def tf_pad(x: torch.Tensor, kh: int, kw: int, stride: int, padding: str, value: float = 0.0) -> torch.Tensor:
    """Pad NCHW ``x`` the way TF pads for a ``padding`` ('SAME'/'VALID') window op."""
    if padding == "VALID":
        return x
    if padding != "SAME":
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    t, b = same_pads(x.shape[2], kh, stride)
    left, r = same_pads(x.shape[3], kw, stride)
    return F.pad(x, (left, r, t, b), value=value) if t or b or left or r else x


def tf_max_pool(x: torch.Tensor, k: int, stride: int, padding: str) -> torch.Tensor:
    """tf.nn.max_pool: SAME pads with -inf, so padding never wins."""
    return F.max_pool2d(tf_pad(x, k, k, stride, padding, -math.inf), k, stride)


def tf_avg_pool(x: torch.Tensor, k: int, stride: int, padding: str) -> torch.Tensor:
    """tf.nn.avg_pool: a SAME window averages only its real pixels (padding not counted)."""
    if padding == "VALID":
        return F.avg_pool2d(x, k, stride)
    ones = torch.ones(1, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
    s = F.avg_pool2d(tf_pad(x, k, k, stride, padding), k, stride, divisor_override=1)
    n = F.avg_pool2d(tf_pad(ones, k, k, stride, padding), k, stride, divisor_override=1)
    return s / n


# --------------------------------------------------------------------------------------
# The layout: TF variable scopes, shapes and the order the graph uses them
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conv:
    """One slim conv2d + BatchNorm(beta only) + ReLU; ``scope`` is its TF variable scope."""

    scope: str
    cin: int
    cout: int
    kh: int
    kw: int
    stride: int = 1
    padding: str = "SAME"


def _branch(scope: str, cin: int, ops: list) -> tuple[list, int]:
    """Ops of one branch; unnamed slim convs are scoped Conv, Conv_1, ... in creation order.
    An op is (cout, (kh, kw), stride, padding), ('max'|'avg', k, stride, padding), or
    ('fork', [conv, conv]): two convs on the same input, concatenated."""
    out, c, n = [], cin, 0

    def conv(cout, k, stride=1, padding="SAME"):
        nonlocal n
        name = f"{scope}/Conv" + (f"_{n}" if n else "")
        n += 1
        return Conv(name, c, cout, k[0], k[1], stride, padding)

    for op in ops:
        if op[0] in ("max", "avg"):
            out.append(op)
        elif op[0] == "fork":
            pair = [conv(*o) for o in op[1]]
            out.append(("fork", pair))
            c = sum(p.cout for p in pair)
        else:
            out.append(conv(*op))
            c = op[0]
    return out, c


def layout() -> tuple[list, list]:
    """(stem, blocks): the official inception_model.py graph; a block is (scope, branches)."""
    stem = [Conv("conv0", 3, 32, 3, 3, 2, "VALID"), Conv("conv1", 32, 32, 3, 3, 1, "VALID"),
            Conv("conv2", 32, 64, 3, 3, 1, "SAME"), ("max", 3, 2, "VALID"),
            Conv("conv3", 64, 80, 1, 1, 1, "VALID"), Conv("conv4", 80, 192, 3, 3, 1, "VALID"),
            ("max", 3, 2, "VALID")]
    blocks, c = [], 192
    pool = [("avg", 3, 1, "SAME")]

    def block(name, spec):
        nonlocal c
        branches, total = [], 0
        for bname, ops in spec:
            ops_, cout = _branch(f"{name}/{bname}", c, ops)
            branches.append(ops_)
            total += cout  # a pool-only branch keeps its input's channels
        blocks.append((name, branches))
        c = total

    for name, pc in (("mixed_35x35x256a", 32), ("mixed_35x35x288a", 64), ("mixed_35x35x288b", 64)):
        block(name, [("branch1x1", [(64, (1, 1))]), ("branch5x5", [(48, (1, 1)), (64, (5, 5))]),
                     ("branch3x3dbl", [(64, (1, 1)), (96, (3, 3)), (96, (3, 3))]),
                     ("branch_pool", pool + [(pc, (1, 1))])])
    block("mixed_17x17x768a", [("branch3x3", [(384, (3, 3), 2, "VALID")]),
                               ("branch3x3dbl", [(64, (1, 1)), (96, (3, 3)), (96, (3, 3), 2, "VALID")]),
                               ("branch_pool", [("max", 3, 2, "VALID")])])
    for name, c7 in (("mixed_17x17x768b", 128), ("mixed_17x17x768c", 160), ("mixed_17x17x768d", 160),
                     ("mixed_17x17x768e", 192)):
        block(name, [("branch1x1", [(192, (1, 1))]),
                     ("branch7x7", [(c7, (1, 1)), (c7, (1, 7)), (192, (7, 1))]),
                     ("branch7x7dbl", [(c7, (1, 1)), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)),
                                       (192, (1, 7))]),
                     ("branch_pool", pool + [(192, (1, 1))])])
    block("mixed_17x17x1280a", [("branch3x3", [(192, (1, 1)), (320, (3, 3), 2, "VALID")]),
                                ("branch7x7x3", [(192, (1, 1)), (192, (1, 7)), (192, (7, 1)),
                                                 (192, (3, 3), 2, "VALID")]),
                                ("branch_pool", [("max", 3, 2, "VALID")])])
    for name in ("mixed_8x8x2048a", "mixed_8x8x2048b"):
        fork = ("fork", [(384, (1, 3)), (384, (3, 1))])
        block(name, [("branch1x1", [(320, (1, 1))]), ("branch3x3", [(384, (1, 1)), fork]),
                     ("branch3x3dbl", [(448, (1, 1)), (384, (3, 3)), fork]),
                     ("branch_pool", pool + [(192, (1, 1))])])
    assert c == 2048, c
    return stem, blocks


def convs() -> list[Conv]:
    """Every conv of the layout, in graph order."""
    stem, blocks = layout()
    out = [op for op in stem if isinstance(op, Conv)]
    for _, branches in blocks:
        for ops in branches:
            for op in ops:
                if isinstance(op, Conv):
                    out.append(op)
                elif op[0] == "fork":
                    out.extend(op[1])
    return out


def tf_shapes(num_classes: int = 51) -> dict[str, tuple[int, ...]]:
    """TF variable name -> shape (HWIO kernels, [2048, classes] FC) of every variable the logits use."""
    shapes: dict[str, tuple[int, ...]] = {}
    for c in convs():
        shapes[f"{c.scope}/weights"] = (c.kh, c.kw, c.cin, c.cout)
        for v in ("beta", "moving_mean", "moving_variance"):
            shapes[f"{c.scope}/BatchNorm/{v}"] = (c.cout,)
    shapes["logits/logits/weights"] = (2048, num_classes)
    shapes["logits/logits/biases"] = (num_classes,)
    return shapes


def _key(scope: str) -> str:
    return scope.replace("/", "__")


# --------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """slim conv2d(batch_norm_params): conv (no bias), x * rsqrt(var + eps) + (beta - mean * rsqrt), ReLU."""

    def __init__(self, c: Conv):
        super().__init__()
        self.spec = c
        self.weight = nn.Parameter(torch.zeros(c.cout, c.cin, c.kh, c.kw))
        self.beta = nn.Parameter(torch.zeros(c.cout))
        self.register_buffer("moving_mean", torch.zeros(c.cout))
        self.register_buffer("moving_variance", torch.ones(c.cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.spec
        x = F.conv2d(tf_pad(x, c.kh, c.kw, c.stride, c.padding), self.weight, stride=c.stride)
        inv = torch.rsqrt(self.moving_variance + EPS)
        return F.relu(x * inv[:, None, None] + (self.beta - self.moving_mean * inv)[:, None, None])


class TFInceptionV3(nn.Module):
    """StackGAN's TF-slim Inception-v3 (eval mode): NCHW 299x299 in [-1, 1] -> logits (B, classes)."""

    def __init__(self, num_classes: int = 51):
        super().__init__()
        self.stem, self.blocks = layout()
        self.convs = nn.ModuleDict({_key(c.scope): ConvBN(c) for c in convs()})
        self.logits = nn.Linear(2048, num_classes)

    def _run(self, ops: list, x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            if isinstance(op, Conv):
                x = self.convs[_key(op.scope)](x)
            elif op[0] == "fork":
                x = torch.cat([self.convs[_key(c.scope)](x) for c in op[1]], 1)
            else:
                x = (tf_max_pool if op[0] == "max" else tf_avg_pool)(x, *op[1:])
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run(self.stem, x)
        for _, branches in self.blocks:
            x = torch.cat([self._run(ops, x) for ops in branches], 1)
        return self.logits(x.mean((2, 3)))  # logits/pool: 8x8 VALID average; dropout is off at eval


def load_paper_inception(path: str | Path, device: str | torch.device = "cpu") -> TFInceptionV3:
    """The converted net at ``path`` (weights-only read; number of classes from the file)."""
    path = Path(path)
    if not path.is_file():
        raise TFInceptionError(f"converted StackGAN Inception not found: {path} (make it with `python -m "
                               "stackgan.metrics.tf_inception convert --ckpt model.ckpt-5000 --out ...`)")
    sd = read_state_dict(path, TFInceptionError, "StackGAN Inception")
    w = sd.get("logits.weight")
    if w is None or w.ndim != 2 or w.shape[1] != 2048:
        raise TFInceptionError(f"{path}: no logits.weight of shape (classes, 2048): not a converted "
                               "StackGAN Inception (tf_inception convert)")
    net = TFInceptionV3(w.shape[0])
    want = net.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        raise TFInceptionError(f"{path}: {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} "
                               f"unexpected (e.g. {unexpected[:3]}) parameters for the StackGAN Inception")
    for k, v in sd.items():
        if v.shape != want[k].shape:
            raise TFInceptionError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(want[k].shape)}")
    net.load_state_dict(sd)
    return net.to(device).eval()


# --------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------
def state_dict_from_tf(shapes: dict[str, list[int] | tuple[int, ...]], get: Callable[[str], np.ndarray],
                       where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """A :class:`TFInceptionV3` state_dict from TF variables (name -> shape, name -> value).

    Each variable is read from its ExponentialMovingAverage shadow when the checkpoint has one
    (what the official score restores). Refused, naming the variable: a missing one, a wrong
    shape, or an unknown variable inside the network's scopes. Ignored: ``aux_logits/``
    (training-only head), optimizer slots (``<var>/RMSProp``...) and variables outside the
    network (``global_step``, loss averages). Returns (state_dict, report)."""
    bias = shapes.get("logits/logits/biases")
    if bias is None or len(bias) != 1:
        raise TFInceptionError(f"{where}: no logits/logits/biases variable: not a StackGAN-inception-model "
                               f"(TF-slim inception_v3) checkpoint (has e.g. {sorted(shapes)[:5]})")
    want = tf_shapes(int(bias[0]))
    scopes = {n.split("/")[0] for n in want}
    missing = sorted(n for n in want if n not in shapes)
    if missing:
        raise TFInceptionError(f"{where}: {len(missing)} variables missing, e.g. {missing[:4]}")
    unexpected, ignored = [], []
    for n in shapes:
        base = n[: -len(EMA)] if n.endswith(EMA) else n
        if base in want or any(n.startswith(w + "/") for w in want):
            continue
        (ignored if n.split("/")[0] not in scopes else unexpected).append(n)
    unexpected = [n for n in unexpected if not n.startswith("aux_logits/")]
    if unexpected:
        raise TFInceptionError(
            f"{where}: variables the StackGAN Inception does not have: {sorted(unexpected)[:6]}")
    sd, from_ema = {}, 0
    for n, shape in want.items():
        src = n + EMA if n + EMA in shapes else n
        from_ema += src != n
        if tuple(shapes[src]) != shape:
            raise TFInceptionError(f"{where}: {src} has shape {tuple(shapes[src])}, expected {shape}")
        v = torch.from_numpy(np.asarray(get(src), dtype=np.float32).copy())
        if n == "logits/logits/weights":
            sd["logits.weight"] = v.t().contiguous()
        elif n == "logits/logits/biases":
            sd["logits.bias"] = v
        elif n.endswith("/weights"):
            scope = _key(n[: -len("/weights")])
            sd[f"convs.{scope}.weight"] = v.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
        else:
            scope, _, var = n.rpartition("/BatchNorm/")
            sd[f"convs.{_key(scope)}.{var}"] = v
    report = {"variables": len(want), "from_ema": from_ema, "classes": int(bias[0]),
              "ignored": len(ignored) + sum(n.startswith("aux_logits/") for n in shapes)}
    return sd, report


def _tensorflow():
    try:
        import tensorflow as tf  # noqa: PLC0415 - only the converter needs it
    except ImportError as e:
        raise TFInceptionError("converting a TF checkpoint needs TensorFlow: pip install '.[paper-is]' "
                               f"(the paper-is extra, tensorflow-cpu) ({e})") from e
    return tf


def convert(ckpt: str | Path, out: str | Path) -> dict:
    """Read the TF checkpoint ``ckpt`` (prefix, e.g. model.ckpt-5000) and write the state_dict to ``out``."""
    tf = _tensorflow()
    try:
        reader = tf.train.load_checkpoint(str(ckpt))
    except Exception as e:
        raise TFInceptionError(f"cannot read TF checkpoint {ckpt}: {e}") from e
    sd, report = state_dict_from_tf(reader.get_variable_to_shape_map(), reader.get_tensor, str(ckpt))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(out)
    return report


# --------------------------------------------------------------------------------------
# The score
# --------------------------------------------------------------------------------------
def paper_probs(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """softmax(logits[:, 1:]) in float64: the official pred_op (background class 0 dropped)."""
    x = torch.as_tensor(logits, dtype=torch.float64)[:, 1:]
    return torch.softmax(x, 1).numpy()


def paper_inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` contiguous splits of exp(E_x KL(p(y|x) || p(y))), the
    official formula, from class probabilities (N, C) (use :func:`paper_probs` on logits)."""
    p = np.asarray(probs, dtype=np.float64)
    n = len(p)
    if p.ndim != 2 or n < splits:
        raise ValueError(f"need probabilities (N, C) with N >= splits ({splits}), got shape {p.shape}")
    scores = []
    for i in range(splits):
        part = p[i * n // splits: (i + 1) * n // splits]
        marg = part.mean(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marg)), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def paper_preprocess(images: torch.Tensor) -> torch.Tensor:
    """Generator images (B, 3, H, W) in [-1, 1] -> the official input: uint8 (as saved PNGs),
    PIL bilinear to 299x299 (scipy.misc.imresize), / 127.5 - 1; NCHW float32 on the CPU."""
    from PIL import Image

    u8 = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = u8.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(Image.fromarray(a).resize((299, 299), Image.BILINEAR)) for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1


@requirement("paper_inception")
def check_paper_inception(ctx: EvalContext) -> None:
    """The paper's IS needs the converted StackGAN Inception file, and enough samples."""
    if not ctx.paper_inception:
        raise MetricError("inception_score_paper needs the converted StackGAN Inception: pass "
                          "--paper-inception PATH (python -m stackgan.metrics.tf_inception convert "
                          "--ckpt model.ckpt-5000 --out PATH)")
    if not Path(ctx.paper_inception).is_file():
        raise MetricError(f"converted StackGAN Inception not found: {ctx.paper_inception}")
    if ctx.num_samples < ctx.is_splits:
        raise MetricError(f"num_samples ({ctx.num_samples}) must be >= is_splits ({ctx.is_splits})")


@register("inception_score_paper", requires=("paper_inception",))
def inception_score_paper_metric(G, ctx: EvalContext) -> dict:
    """The paper's IS over ``ctx.num_samples`` (30000) images of the test captions, in the
    order and with the noise of ``inception_score`` (same images), ``ctx.is_splits`` splits."""
    from .inception import TAG
    from .scores import split_data

    key = ("paper_inception", ctx.paper_inception, str(ctx.device))
    if key not in ctx.cache:
        ctx.cache[key] = load_paper_inception(ctx.paper_inception, ctx.device)
    net = ctx.cache[key]
    data = split_data(ctx, "test")
    s, c, n = len(data), data.emb.shape[1], ctx.num_samples
    perm = np.random.default_rng([ctx.seed, TAG]).permutation(s)
    i = np.arange(n)
    rows, caps = perm[i % s], (i // s) % c
    emb, texts = data.emb[rows, caps], data.texts(rows, caps)
    sums = ISSums(ctx.is_splits, net.logits.out_features - 1)
    with torch.no_grad(), full_precision(ctx.device):
        for lo, hi, img in generate(G, ctx, emb, TAG, what="paper IS samples", captions=texts):
            logits = net(paper_preprocess(img).to(ctx.device))
            sums.add(logits[:, 1:], torch.arange(lo, hi) * ctx.is_splits // n)
    mean, std = sums.reduce().score()
    return {"mean": mean, "std": std, "splits": ctx.is_splits, "n": n, "note": NOTE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.metrics.tf_inception",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="TF checkpoint (StackGAN-inception-model) -> PyTorch state_dict")
    c.add_argument("--ckpt", required=True, help="checkpoint prefix, e.g. .../birds_valid299/model.ckpt-5000")
    c.add_argument("--out", required=True, help="output .pt (plain state_dict, loads with weights_only=True)")
    args = p.parse_args(argv)
    try:
        info = convert(args.ckpt, args.out)
    except TFInceptionError as e:
        return report(e, p.prog)
    print(f"wrote {args.out}: {info['variables']} variables ({info['from_ema']} from moving averages), "
          f"{info['classes']} classes, {info['ignored']} checkpoint variables not used")
    return 0


if __name__ == "__main__":
    sys.exit(main())
