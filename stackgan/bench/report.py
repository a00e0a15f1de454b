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

TARGET_VS_ORIGINAL = 0.75  # our s/iter at most this fraction of the original's
TARGET_FRAC_PEAK = 0.75  # achieved GFLOP/s at least this fraction of the matmul figure


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
    """GFLOP/s, fractions of the matmul peak, target checks and the data stream's lead (in place)."""
    peaks = report["matmul_peak_gflops"] = matmul_peaks(report)
    cases = [c for c in report["cases"] if "runners" in c]
    for c in cases:
        _derive_rates(c, peaks)
    report["targets"] = [t for c in cases for t in _targets(c)]
    data = report.get("data") or {}
    if "bench_data" in data:
        data["stream_vs_trainer"] = stream_vs_trainer(data["bench_data"], report["cases"])


def _derive_rates(case: dict, peaks: dict[str, float]) -> None:
    """Per runner of one case (in place).

    ``frac_matmul``: of the run's best matmul figure in the step's precision;
    ``frac_matmul_local``: of the mean matmul figure of its own worker (start and end);
    ``frac_matmul_useful``: the original step's FLOPs per second of this step, of the peak.
    """
    orig = case["runners"].get("original", {})
    local = [case[k] for k in ("matmul_gflops", "matmul_gflops_end") if case.get(k)]
    for name, r in case["runners"].items():
        prec = "fp32" if name == "original" else case["precision"]
        mm = peaks.get(prec)
        if not (r.get("flops") and r.get("s_per_iter")):
            continue
        r["gflops_per_s"] = r["flops"] / r["s_per_iter"] / 1e9
        if mm:
            r["frac_matmul"] = r["gflops_per_s"] / mm
        if local and prec == case["precision"]:
            r["frac_matmul_local"] = r["gflops_per_s"] / statistics.mean(local)
        if orig.get("flops"):  # the original algorithm's work per second of this step
            r["original_gflops_per_s"] = orig["flops"] / r["s_per_iter"] / 1e9
            if mm:
                r["frac_matmul_useful"] = r["original_gflops_per_s"] / mm


def _targets(case: dict) -> list[dict]:
    """The targets (official sizes, fp32): time against the original's, fraction of the matmul peak."""
    official = case["case"]["size"] == "official" and case["part"] in ("stage1", "stage2")
    if not (official and case["precision"] == "fp32" and "original" in case["runners"]):
        return []
    out = []
    for name in ("ours", "ours-before"):
        r = case["runners"].get(name)
        if r and "vs_original" in r:
            out.append({"case": case["name"], "step": name, "vs_original": r["vs_original"],
                        "ok_time": r["vs_original"] <= TARGET_VS_ORIGINAL,
                        "frac_matmul": r.get("frac_matmul"),
                        "frac_matmul_local": r.get("frac_matmul_local"),
                        "frac_matmul_useful": r.get("frac_matmul_useful"),
                        "ok_peak": (r.get("frac_matmul") or 0) >= TARGET_FRAC_PEAK})
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
    if report.get("matmul_peak_gflops"):
        out.append("matmul peak (best figure of the run, GFLOP/s): " + ", ".join(
            f"{k} {v:.0f}" for k, v in report["matmul_peak_gflops"].items()))
    return out


def _peak_tables(report: dict) -> list[str]:
    pk = report.get("peak") or {}
    if "matmul" not in pk:
        return []
    matmul = [[p, str(v["n"]), f"{v['gflops']:.1f}"] for p, v in pk["matmul"].items()]
    conv = [[r["layer"], str(r["batch"]), f"{r['nchw_gflops']:.1f}", f"{r['channels_last_gflops']:.1f}",
             _f(r.get("upconv_channels_last_gflops"), ".1f")] for r in pk["conv"]]
    conv_columns = ["conv fwd+bwd (GFLOP/s)", "batch", "NCHW", "channels-last", "upconv (channels-last)"]
    return _table(["matmul", "n", "GFLOP/s"], matmul) + _table(conv_columns, conv)


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
                         _pct(r.get("frac_matmul")), _f(r.get("vs_original"), ".2f"), mem])
    if not rows:
        return []
    out = _table(["case", "prec", "step", "s/iter", "img/s", "GFLOP/iter", "GFLOP/s", "of matmul peak",
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
             _pct(t["frac_matmul"]) + (" ok" if t["ok_peak"] else " MISSED"),
             _pct(t.get("frac_matmul_local")), _pct(t.get("frac_matmul_useful"))]
            for t in report.get("targets", [])]
    return _table(["target (official fp32)", "step", "x original (<= 0.75)", "of matmul peak (>= 75%)",
                   "of its worker's matmul", "original's FLOPs per second of this step, of peak"], rows)


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
