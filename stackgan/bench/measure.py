"""Measuring helpers: timing, FLOPs, peak memory, and the machine's dense-kernel peak.

Device-generic: the CUDA path differs only in the syncs around timed calls and in where
peak memory is read.

The peak a step is measured against is the best of several dense kernels that can reach
the FMA limit, not one BLAS call: on some CPUs (AMD Zen with MKL) the 4096^2 fp32 matmul
takes a slow path and runs at ~40% of what oneDNN's convolutions reach on the same cores,
so a fraction of the matmul alone is not a fraction of anything physical.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..backends.base import cpu_flags
from ..models import upsample_conv3x3


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def sync_fn(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def time_calls(fn: Callable[[], object], reps: int, sync: Callable[[], None], inner: int = 1) -> list[float]:
    """Seconds per call: ``reps`` samples of ``inner`` calls each, synced at both ends
    (on CUDA, several calls per sample amortise the sync)."""
    ts = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        ts.append((time.perf_counter() - t) / inner)
    return ts


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None],
                     inner: int = 1) -> dict[str, list[float]]:
    """One sample of every function per round, so that load changes hit all of them alike;
    the order rotates every round (no fixed position bias)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(rounds):
        k = rnd % len(names)
        for name in names[k:] + names[:k]:
            times[name] += time_calls(fns[name], 1, sync, inner)
    return times


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
    return process_peak_mb()


def process_peak_mb() -> float:
    """The process's peak RSS over its whole life (``ru_maxrss``), in MiB."""
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
        sync = sync_fn(device)
        a @ b
        ts = time_calls(lambda: a @ b, reps, sync, inner=1 if device.type == "cpu" else 10)
        return 2 * n**3 / statistics.median(ts) / 1e9
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dense_1x1(device, dt, scale: int):
    """A GEMM-shaped 1x1 convolution in channels-last (oneDNN / cuDNN's GEMM path)."""
    n, c, hw = max(1, 32 // scale), max(8, 1024 // scale), max(4, 32 // scale)
    x = _cl(torch.randn(n, c, hw, hw, device=device, dtype=dt))
    w = _cl(torch.randn(c, c, 1, 1, device=device, dtype=dt))
    return (lambda: F.conv2d(x, w)), 2 * n * hw * hw * c * c, f"1x1 conv {c}->{c} ch, {hw}px, batch {n}"


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _dense_3x3(device, dt, scale: int):
    """A large 3x3 convolution in channels-last (512 channels at 16 px: StackGAN's residual blocks)."""
    n, c, hw = max(1, 32 // scale), max(8, 512 // scale), max(4, 16 // max(1, scale // 2))
    x = _cl(torch.randn(n, c, hw, hw, device=device, dtype=dt))
    w = _cl(torch.randn(c, c, 3, 3, device=device, dtype=dt))
    flops = 2 * n * hw * hw * c * c * 9
    return (lambda: F.conv2d(x, w, padding=1)), flops, f"3x3 conv {c}->{c} ch, {hw}px, batch {n}"


def dense_kernels(device: torch.device, precision: str, matmul_n: int, reps: int, scale: int = 1) -> dict:
    """Forward throughput (GFLOP/s, median of ``reps``) of each dense kernel in ``precision``:
    the n x n matmul, a GEMM-shaped 1x1 conv and a large 3x3 conv (both channels-last)."""
    out = {"matmul": {"gflops": matmul_gflops(device, precision, matmul_n, reps), "shape": f"{matmul_n}^2"}}
    dt = DTYPES[precision]
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.no_grad():
            for name, make in (("conv1x1_cl", _dense_1x1), ("conv3x3_cl", _dense_3x3)):
                fn, flops, shape = make(device, dt, scale)
                fn()
                ts = time_calls(fn, reps, sync_fn(device), inner=1 if device.type == "cpu" else 10)
                out[name] = {"gflops": flops / statistics.median(ts) / 1e9, "shape": shape}
    finally:
        torch.backends.cudnn.allow_tf32 = prev
    return out


def cpu_theoretical_gflops(precision: str, threads: int) -> dict | None:
    """An upper bound from the ISA: threads x clock x FLOP per cycle, assuming two FMA pipes of
    the widest vector unit the CPU reports (the pipe count is not readable; some parts have one).
    Recorded next to the measured kernels, never used as the denominator."""
    flags = cpu_flags()
    mhz = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
                break
    except (OSError, ValueError):
        pass
    if not mhz or not flags:
        return None
    if precision == "fp32":
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
        per_cycle, unit = 2 * 2 * lanes, "avx512f" if lanes == 16 else "avx2" if lanes == 8 else "sse"
    elif precision == "bf16" and "amx_bf16" in flags:
        per_cycle, unit = 1024, "amx_bf16"  # one 16x32 x 32x16 bf16 tile product per cycle
    elif precision == "bf16" and "avx512_bf16" in flags:
        per_cycle, unit = 2 * 2 * 32, "avx512_bf16"  # vdpbf16ps: 32 bf16 pairs, two pipes
    else:
        return None
    return {"gflops": threads * mhz / 1e3 * per_cycle, "basis": f"{threads} threads x {mhz:.0f} MHz x "
            f"{per_cycle} FLOP/cycle ({unit}, two FMA pipes assumed)"}


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
    return [_conv_row(device, layer, batch, reps, scale) for layer in CONV_LAYERS]


def _conv_row(device: torch.device, layer: tuple, batch: int, reps: int, scale: int) -> dict:
    """One layer in NCHW and channels-last (and, for an up-block, as the transposed-conv rewrite)."""
    name, cin, cout, hw, k, s, p, up = layer
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
    sync = sync_fn(device)
    for label, cl, upc in forms:
        mf = torch.channels_last if cl else torch.contiguous_format
        x = x0.contiguous(memory_format=mf).requires_grad_()
        w = w0.contiguous(memory_format=mf).requires_grad_()

        def fwd_bwd():
            if upc:
                y = upsample_conv3x3(x, w)
            else:
                xi = F.interpolate(x, scale_factor=2, mode="nearest") if up else x
                y = F.conv2d(xi, w, stride=s, padding=p)
            y.backward(torch.ones_like(y))

        fwd_bwd()
        row[label + "_gflops"] = flops / statistics.median(time_calls(fwd_bwd, reps, sync)) / 1e9
    return row
