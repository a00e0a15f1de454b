"""Reporting: the machine, figures derived from the raw timings, Markdown tables, the JSON file.

:func:`derive` works on the JSON alone, so ``--report FILE`` prints an earlier run's tables
exactly as the run itself did.
"""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import torch

from ..files import atomic_json

TARGET_VS_ORIGINAL = 0.5  # our s/iter at most this fraction of the original's (official sizes, fp32)
TARGET_FRAC_PEAK = 0.6  # achieved GFLOP/s at least this fraction of the measured peak (goal 0.75)


def write_json(path: Path, obj, indent: int | None = None) -> None:
    """Write atomically: a reader never sees half a file."""
    atomic_json(path, obj, indent=indent)


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


# --------------------------------------------------------------------------------------
# Derived figures
# --------------------------------------------------------------------------------------
def peaks(report: dict) -> dict[str, dict]:
    """The peak per precision: the best dense kernel of the run (GFLOP/s and which kernel).

    Candidates are every kernel of the ``peak`` part and the matmul each case worker measured
    around its timed rounds (a shared machine can make one measurement land in a busy moment;
    the machine's peak is what it reached at its best, so fractions of it are conservative).
    Worker matmuls only count for precisions the peak part measured, so a CPU without bf16
    units gets no bf16 peak from an emulated bf16 matmul; without a peak part they stand alone.
    """
    best: dict[str, dict] = {}

    def offer(prec: str, gflops: float, kernel: str) -> None:
        if gflops and gflops > best.get(prec, {}).get("gflops", 0.0):
            best[prec] = {"gflops": gflops, "kernel": kernel}

    measured = (report.get("peak") or {}).get("kernels", {})
    for prec, kernels in measured.items():
        for name, v in kernels.items():
            offer(prec, v["gflops"], name)
    for c in report["cases"]:
        if measured and c.get("precision") not in measured:
            continue
        for k in ("matmul_gflops", "matmul_gflops_end"):
            if c.get(k):
                offer(c["precision"], c[k], "matmul (case worker)")
    return best


def derive(report: dict) -> None:
    """GFLOP/s, fractions of the peak, target checks and the data stream's lead (in place)."""
    report["peak_gflops"] = pk = peaks(report)
    cases = [c for c in report["cases"] if "runners" in c]
    for c in cases:
        _derive_rates(c, {p: v["gflops"] for p, v in pk.items()})
    report["targets"] = [t for c in cases for t in _targets(c)]
    data = report.get("data") or {}
    if "bench_data" in data:
        data["stream_vs_trainer"] = stream_vs_trainer(data["bench_data"], report["cases"])


def share_of_peak(gflops: float, peak: float | None) -> tuple[float | None, bool]:
    """(fraction of the peak, peak understated). A step faster than the "peak" means the peak
    kernels missed the machine's limit: the fraction is withheld, never reported above 100%."""
    if not peak:
        return None, False
    frac = gflops / peak
    return (None, True) if frac > 1.0 else (frac, False)


def _derive_rates(case: dict, peak: dict[str, float]) -> None:
    """Per runner of one case (in place).

    ``frac_peak``: of the run's peak in the step's precision (None and ``peak_understated``
    when above it); ``frac_matmul_local``: of the mean matmul figure of its own worker (start
    and end); ``frac_peak_useful``: the original step's FLOPs per second of this step, of the peak.
    """
    orig = case["runners"].get("original", {})
    local = [case[k] for k in ("matmul_gflops", "matmul_gflops_end") if case.get(k)]
    for name, r in case["runners"].items():
        prec = "fp32" if name == "original" else case["precision"]
        mm = peak.get(prec)
        if not (r.get("flops") and r.get("s_per_iter")):
            continue
        r["gflops_per_s"] = r["flops"] / r["s_per_iter"] / 1e9
        r["frac_peak"], r["peak_understated"] = share_of_peak(r["gflops_per_s"], mm)
        if local and prec == case["precision"]:
            r["frac_matmul_local"] = r["gflops_per_s"] / statistics.mean(local)
        if orig.get("flops"):  # the original algorithm's work per second of this step
            r["original_gflops_per_s"] = orig["flops"] / r["s_per_iter"] / 1e9
            r["frac_peak_useful"], _ = share_of_peak(r["original_gflops_per_s"], mm)


def _targets(case: dict) -> list[dict]:
    """The targets (official sizes, fp32): time against the original's, fraction of the peak."""
    official = case["case"]["size"] == "official" and case["part"] in ("stage1", "stage2")
    if not (official and case["precision"] == "fp32" and "original" in case["runners"]):
        return []
    out = []
    for name in ("ours", "ours-before"):
        r = case["runners"].get(name)
        if r and "vs_original" in r:
            out.append({"case": case["name"], "step": name, "vs_original": r["vs_original"],
                        "ok_time": r["vs_original"] <= TARGET_VS_ORIGINAL,
                        "frac_peak": r.get("frac_peak"), "peak_understated": r.get("peak_understated", False),
                        "frac_matmul_local": r.get("frac_matmul_local"),
                        "frac_peak_useful": r.get("frac_peak_useful"),
                        "ok_peak": (r.get("frac_peak") or 0) >= TARGET_FRAC_PEAK})
    return out


def stream_vs_trainer(bench_data: dict, cases: list[dict]) -> list[dict]:
    """Per stream result: its samples/s against the fastest trainer step at that image size."""
    lines = []
    for r in bench_data.get("results", []):
        if r.get("loader") != "stream":
            continue
        stage = 1 if r["size"] == 64 else 2
        need = [c["runners"]["ours"]["img_per_s"] for c in cases
                if c.get("case", {}).get("stage") == stage and "ours" in c.get("runners", {})
                and c.get("precision") in ("fp32", "bf16")]
        fastest = max(need) if need else None
        lines.append({"size": r["size"], "workers": r["workers"], "stream_samples_per_s": r["samples_per_s"],
                      "trainer_img_per_s_max": fastest,
                      "stream_over_trainer": r["samples_per_s"] / fastest if fastest else None})
    return lines


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------
def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v) -> str:
    return _f(v and 100 * v, ".0f") + "%"


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table after a blank line (nothing without rows)."""
    if not rows:
        return []
    lines = ["", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def format_tables(report: dict) -> str:
    """Markdown tables (also readable in a terminal)."""
    sections = (_machine_lines, _peak_tables, _case_table, _procs_table, _target_table, _data_table,
                _check_lines)
    return "\n".join(line for section in sections for line in section(report))


def _machine_lines(report: dict) -> list[str]:
    m = report["machine"]
    out = [f"machine: {m.get('cpu_model', '?')}, {m['cpus']} CPUs, torch {m['torch']}"
           + (f", GPU {m['gpu']}" if "gpu" in m else "")
           + f"; load average start {report['load_start']} end {report.get('load_end')}"]
    if report.get("peak_gflops"):
        out.append("peak (best dense kernel of the run, GFLOP/s): " + ", ".join(
            f"{k} {v['gflops']:.0f} ({v['kernel']})" for k, v in report["peak_gflops"].items()))
    return out


def _peak_share(r: dict, key: str = "frac_peak") -> str:
    return "peak understated" if r.get("peak_understated") and key == "frac_peak" else _pct(r.get(key))


def _peak_tables(report: dict) -> list[str]:
    pk = report.get("peak") or {}
    if "kernels" not in pk:
        return []
    theory = pk.get("theoretical") or {}
    dense = [[p, name, v["shape"], f"{v['gflops']:.1f}",
              _f((theory.get(p) or {}).get("gflops"), ".0f") if name == "matmul" else ""]
             for p, kernels in pk["kernels"].items() for name, v in kernels.items()]
    conv = [[r["layer"], str(r["batch"]), f"{r['nchw_gflops']:.1f}", f"{r['channels_last_gflops']:.1f}",
             _f(r.get("upconv_channels_last_gflops"), ".1f")] for r in pk["conv"]]
    conv_columns = ["conv fwd+bwd (GFLOP/s)", "batch", "NCHW", "channels-last", "upconv (channels-last)"]
    return (_table(["precision", "dense kernel (fwd)", "shape", "GFLOP/s", "ISA bound"], dense)
            + _table(conv_columns, conv))


def _case_table(report: dict) -> list[str]:
    rows = []
    for c in report["cases"]:
        if "runners" not in c:
            rows.append([c["label"], "", c.get("error", "")[:80]] + [""] * 7)
            continue
        for name, r in c["runners"].items():
            mem = _f(r.get("peak_mem_mb"), ".0f") + ("" if r.get("peak_mem_isolated") else "*")
            extra = f" (compile {r['compile_s']:.0f}s)" if "compile_s" in r else ""
            rows.append([c["name"], "fp32" if name == "original" else c["precision"], name + extra,
                         f"{r['s_per_iter']:.3f}", f"{r['img_per_s']:.1f}",
                         _f(r.get("flops") and r["flops"] / 1e9, ".1f"), _f(r.get("gflops_per_s"), ".1f"),
                         _peak_share(r), _f(r.get("vs_original"), ".2f"), mem])
    if not rows:
        return []
    out = _table(["case", "prec", "step", "s/iter", "img/s", "GFLOP/iter", "GFLOP/s", "of peak",
                  "x original", "peak mem MiB"], rows)
    out.append("(peak memory: RSS of the worker process (CUDA: GPU memory) while that step ran first "
               "and alone; * = later steps, with the earlier ones still resident)")
    for c in report["cases"]:
        if "inference_mode" in c:
            im = c["inference_mode"]
            out.append(f"\nfrozen stage-I G forward ({c['name']}): no_grad {im['no_grad_s'] * 1e3:.0f} ms, "
                       f"inference_mode {im['inference_mode_s'] * 1e3:.0f} ms ({im['speedup']:.2f}x)")
    return out


def _procs_table(report: dict) -> list[str]:
    rows = [[r["label"], f"error: {r['error'][:80]}", "", ""] if "error" in r else
            [f"{r['processes']} x {r['threads_per_process']}", str(r["global_batch"]),
             f"{r['s_per_iter']:.3f}", f"{r['img_per_s']:.1f}"] for r in report.get("procs", [])]
    return _table(["processes x threads", "global batch", "s/iter", "img/s"], rows)


def _target_table(report: dict) -> list[str]:
    rows = [[t["case"], t["step"], f"{t['vs_original']:.2f} " + ("ok" if t["ok_time"] else "MISSED"),
             _peak_share(t) + (" ok" if t["ok_peak"] else " MISSED"),
             _pct(t.get("frac_matmul_local")), _pct(t.get("frac_peak_useful"))]
            for t in report.get("targets", [])]
    return _table(["target (official fp32)", "step", f"x original (<= {TARGET_VS_ORIGINAL})",
                   f"of peak (>= {TARGET_FRAC_PEAK:.0%})", "of its worker's matmul",
                   "original's FLOPs per second of this step, of peak"], rows)


def _data_table(report: dict) -> list[str]:
    d = report.get("data")
    if not d:
        return []
    if not d.get("stream_vs_trainer"):
        return [f"\ndata stream: {d.get('skipped') or d.get('error')}"]
    rows = [[f"{r['size']}px", str(r["workers"]), f"{r['stream_samples_per_s']:.1f}",
             _f(r["trainer_img_per_s_max"], ".1f"), _f(r["stream_over_trainer"], ".1f")]
            for r in d["stream_vs_trainer"]]
    columns = ["data stream", "workers", "samples/s", "trainer img/s (fastest)", "stream / trainer"]
    return _table(columns, rows)


def _check_lines(report: dict) -> list[str]:
    return [f"\ncheck {c['case']}: original vs ours over {c['steps']} steps: max loss diff "
            f"{c['max_loss_diff']:.2e}, max parameter diff {c['max_param_diff']:.2e}, "
            f"parameters off by > 1e-5: {_f(c.get('frac_params_off'), '.2e')}"
            for c in report.get("checks", [])]
