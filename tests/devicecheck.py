"""Find host work inside a device step: host->device copies that make the host wait, and
reads of device values (``.item()``, ``float(t)``, ``bool(t)``), each named with the line of
stackgan code that did it; and which precision the step's convolutions and matmuls ran in.

A training step on a GPU should only queue kernels. A ``.to(device)`` from pageable memory
(or any copy without ``non_blocking``) and every read of a device value stop the host until
the GPU has run everything queued before it, so the host cannot prepare the next kernels
meanwhile: on small networks, where the GPU finishes each kernel in microseconds, that
costs more than the arithmetic. Such calls hide in innocent lines (a constant moved to the
weights' device in ``forward``), and nothing fails on a CPU.

:class:`DeviceGuard` is a ``TorchDispatchMode``: every aten op of the code run under it
passes through it. It works on CUDA and on the ``meta`` device, so a CPU-only machine can
check a step: build the networks and inputs on ``meta`` (shapes, no data) and run it.
On ``meta`` a read of a value is reported and answered with 0, so the step runs to the end
and every finding is listed, not only the first.

    with DeviceGuard("meta") as guard:
        gan_step(...)
    assert not guard.findings, guard.report()
"""
from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stackgan

__all__ = ["DeviceGuard", "Finding"]

aten = torch.ops.aten
_PACKAGE = str(Path(stackgan.__file__).resolve().parent)  # findings name the stackgan line
_THIS = str(Path(__file__).resolve())
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
_COPY_OPS = {aten._to_copy.default, aten.copy_.default}
_MATH_OPS = {aten.convolution.default: "convolution",
             aten.convolution_backward.default: "convolution_backward",
             aten.mm.default: "matmul", aten.addmm.default: "matmul",
             aten.bmm.default: "matmul", aten.baddbmm.default: "matmul"}


class Finding(NamedTuple):
    kind: str  # "host-copy" (host->device copy that waits) or "sync" (a device value read by the host)
    op: str  # the aten op
    where: str  # innermost stackgan line (file:line function), else the innermost caller outside torch


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-3] if f.filename != _THIS]
    ours = [f for f in frames if f.filename.startswith(_PACKAGE)]
    outside = [f for f in frames if "/torch/" not in f.filename]
    f = (ours or outside or frames)[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}"


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat = list(args) + list(kwargs.values())
    return [a for a in flat if isinstance(a, torch.Tensor)]


class DeviceGuard(TorchDispatchMode):
    """Records :class:`Finding` s for ``device`` (a CUDA device or ``meta``) while active."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        if self.device.type == "cpu":
            raise ValueError("DeviceGuard: the CPU is the host; check a step on 'meta' or 'cuda'")
        self.findings: list[Finding] = []
        self.precision: Counter = Counter()  # (op kind, input dtype) -> count

    def _on_device(self, t: torch.Tensor) -> bool:
        return t.device.type == self.device.type

    def _copy_waits(self, func, args, kwargs) -> bool:
        """A host->device copy the host has to wait for (not pinned + non_blocking)."""
        if func is aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            blocking = not kwargs.get("non_blocking", False)
        else:  # copy_(dst, src, non_blocking=False)
            dst_t, src = args[0], args[1]
            dst = dst_t.device if isinstance(dst_t, torch.Tensor) else None
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        if not isinstance(src, torch.Tensor) or src.device.type != "cpu" or dst is None:
            return False
        if torch.device(dst).type != self.device.type:
            return False
        return blocking or not src.is_pinned()

    def _reads_device(self, func, args, kwargs) -> bool:
        if func in _SYNC_OPS:
            return any(self._on_device(t) for t in _tensors(args, kwargs))
        if func in _COPY_OPS:  # device -> host
            if func is aten._to_copy.default:
                dst = kwargs.get("device")
                return dst is not None and torch.device(dst).type == "cpu" and self._on_device(args[0])
            src = args[1]
            return args[0].device.type == "cpu" and isinstance(src, torch.Tensor) and self._on_device(src)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATH_OPS:
            self.precision[(_MATH_OPS[func], str(args[0].dtype).replace("torch.", ""))] += 1
        if func in _COPY_OPS and self._copy_waits(func, args, kwargs):
            self.findings.append(Finding("host-copy", str(func.overloadpacket.__name__), _where()))
        elif self._reads_device(func, args, kwargs):
            self.findings.append(Finding("sync", str(func.overloadpacket.__name__), _where()))
            if self.device.type == "meta" and func is aten._local_scalar_dense.default:
                return False if args[0].dtype == torch.bool else 0  # no data on meta: go on
        return func(*args, **kwargs)

    def report(self) -> str:
        """One line per distinct finding, with its count (for assertion messages and logs)."""
        counts = Counter(self.findings)
        return "\n".join(f"{n} x {f.kind} ({f.op}) at {f.where}" for f, n in counts.most_common()) or "none"

    def dtypes(self, kind: str) -> dict[str, int]:
        """How many ``kind`` ops ("convolution", "convolution_backward", "matmul") ran per input dtype."""
        return {dt: n for (k, dt), n in self.precision.items() if k == kind}
