"""What one worker process measures: a job's spec (JSON) in, its result (JSON) out.

Every part runs in a fresh process (``python -m stackgan.bench --worker SPEC``), so that its
peak memory is its own and nothing one part compiled or cached speeds up the next.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..backends.base import cpu_has_bf16
from .cases import Batch, Case, build_models, make_batch, tiny_case
from .measure import (conv_gflops, count_flops, cpu_theoretical_gflops, dense_kernels,
                      load_average, matmul_gflops, peak_memory_mb, process_peak_mb, reset_peak_memory,
                      sync_fn, time_interleaved)
from .original import OriginalStep
from .ours import VARIANTS, OursStep, check_original_matches, low_res_inference_mode, make_accelerator
from .report import write_json


def run_case(spec: dict) -> dict:
    """Original and our step(s) on one case, interleaved; FLOPs, memory, matmul figure."""
    device = torch.device(spec["device"])
    case = Case(**spec["case"])
    precision = spec["precision"]
    acc = make_accelerator(device.type, precision)
    batch = make_batch(case, device)
    res: dict = {"case": dataclasses.asdict(case), "name": case.name, "precision": precision, "runners": {},
                 "load_start": load_average()}
    steps: dict[str, Callable[[], object]] = {}
    names = list(spec["runners"])
    for name in names:  # the first runner is built and warmed alone: its peak memory is clean
        steps[name], r = _build_and_warm(name, acc, case, batch, device, spec)
        r["peak_mem_isolated"] = name == names[0]
        res["runners"][name] = r
        print(f"[bench]   {case.name} {precision} {name}: first iteration {r['first_s']:.2f}s",
              file=sys.stderr, flush=True)
    res["matmul_gflops"] = matmul_gflops(device, precision, spec["matmul_n"], 3)
    times = time_interleaved(steps, spec["rounds"], sync_fn(device), inner=spec.get("inner", 1))
    res["matmul_gflops_end"] = matmul_gflops(device, precision, spec["matmul_n"], 2)
    _add_timings(res["runners"], times, case.batch)
    if "infer" in spec.get("extras", ()) and case.stage == 2 and "ours" in names:
        res["inference_mode"] = measure_inference_mode(case, batch, device, spec["rounds"] + 1)
    res["process_peak_mb"] = process_peak_mb()
    res["load_end"] = load_average()
    return res


def _build_and_warm(name: str, acc, case: Case, batch: Batch, device: torch.device,
                    spec: dict) -> tuple[Callable[[], object], dict]:
    """One runner, ready to time: built, its FLOPs counted on the first iteration, warmed up,
    and the peak memory it reached."""
    t0 = time.perf_counter()
    if name == "original":
        orig = OriginalStep(*build_models(case, device))
        fn = (lambda: orig(batch.real, batch.emb, batch.z))
    else:
        ours = OursStep(acc, case, VARIANTS[name])
        fn = (lambda: ours(batch.real, batch.emb, batch.z, batch.widx))
    r: dict = {"build_s": time.perf_counter() - t0}
    sync = sync_fn(device)
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
    return fn, r


def _add_timings(runners: dict[str, dict], times: dict[str, list[float]], batch: int) -> None:
    """Seconds per iteration, images/s and the median per-round ratio to the original (in place)."""
    for name, r in runners.items():
        r["times"] = times[name]
        r["s_per_iter"] = statistics.median(times[name]) if times[name] else r["first_s"]
        r["img_per_s"] = batch / r["s_per_iter"]
    if "ours-compile" in runners:  # same arithmetic as ours
        rc = runners["ours-compile"]
        rc["flops"] = runners.get("ours", {}).get("flops")
        rc["compile_s"] = max(0.0, rc["first_s"] - rc["s_per_iter"])
    if times.get("original"):
        for name, r in runners.items():
            if name != "original" and times[name]:
                r["vs_original"] = statistics.median(a / b for a, b in zip(times[name], times["original"]))


def measure_inference_mode(case: Case, batch: Batch, device: torch.device, rounds: int) -> dict:
    """The frozen stage-I generator's forward: no_grad (current) vs inference_mode."""
    G, _ = build_models(case, device)
    G.train()
    fns = {"no_grad": lambda: G.low_res(batch.emb, batch.z),
           "inference_mode": lambda: low_res_inference_mode(G, batch.emb, batch.z)}
    for f in fns.values():
        f()
    times = time_interleaved(fns, rounds, sync_fn(device))
    out = {k + "_s": statistics.median(v) for k, v in times.items()}
    out["speedup"] = out["no_grad_s"] / out["inference_mode_s"]
    return out


def peak_precisions(device: torch.device) -> list[str]:
    """The precisions with a peak of their own: fp32 everywhere, bf16 on CPUs with bf16 units,
    tf32 / bf16 / fp16 on GPUs."""
    if device.type == "cpu":
        return ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    return ["fp32", "tf32", "bf16", "fp16"]


def run_peak(spec: dict) -> dict:
    """Every dense kernel per precision (the peak is their best), the ISA bound on CPUs, and
    StackGAN's own conv layers (fwd + bwd) in each memory layout."""
    device = torch.device(spec["device"])
    res: dict = {"load_start": load_average(), "kernels": {}, "theoretical": {}}
    for p in peak_precisions(device):
        res["kernels"][p] = dense_kernels(device, p, spec["matmul_n"], 5, spec.get("conv_scale", 1))
        if device.type == "cpu":
            res["theoretical"][p] = cpu_theoretical_gflops(p, torch.get_num_threads())
    res["conv"] = conv_gflops(device, spec["conv_batch"], spec["conv_reps"], spec.get("conv_scale", 1))
    res["load_end"] = load_average()
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
    write_json(Path(spec["out"]), res)
    return 0
