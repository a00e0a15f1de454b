"""``python -m stackgan.bench``: run the plan's worker jobs, print the tables, write the JSON."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import errors
from . import __doc__ as _package_doc
from .measure import load_average
from .plan import plan, run_data, run_job
from .report import derive, format_tables, machine_info, write_json
from .workers import worker_main

PARTS = ("check", "peak", "stage1", "stage2", "embedded", "variants", "compile", "bf16", "procs", "memory",
         "data")
DATA_SHARDS = ("shards/birds-embedded", "shards/birds-cub-scale", "shards/cub")


class BenchError(errors.StackGANError, ValueError):
    """Bad command-line input for the benchmark (names the option)."""


def parse_parts(text: str | None) -> set[str]:
    if not text:
        return set(PARTS)
    parts = {p.strip() for p in text.split(",") if p.strip()}
    bad = sorted(parts - set(PARTS))
    if bad:
        raise BenchError(f"--only: unknown part(s) {', '.join(bad)} (known: {', '.join(PARTS)})")
    return parts


def _default_shards() -> str:
    for d in DATA_SHARDS:  # relative to the working folder, as data.shards is
        if (Path(d) / "metadata.json").is_file():
            return str(Path(d).resolve())
    return str(Path(DATA_SHARDS[0]).resolve())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stackgan.bench", description=_package_doc.split("\n\n")[0],
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
    except errors.StackGANError as e:
        return errors.report(e, "stackgan.bench")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / "bench" / f"bench-{args.device}-{stamp}.json"
    cmdline = " ".join(argv if argv is not None else sys.argv[1:])
    report = run_parts(args, parts, f"python -m stackgan.bench {cmdline}".strip())
    print(format_tables(report))
    write_json(out, report, indent=1)
    print(f"\nwrote {out} ({report['wall_s']:.0f}s)")
    return 1 if report["errors"] else 0


def run_parts(args: argparse.Namespace, parts: set[str], command: str) -> dict:
    """Every job of the plan in its own worker process, then the data stream; the report."""
    report: dict = {"schema": 1, "command": command,
                    "started": _dt.datetime.now().isoformat(timespec="seconds"), "device": args.device,
                    "quick": args.quick, "parts": sorted(parts), "machine": machine_info(args.device),
                    "load_start": load_average(), "cases": [], "procs": [], "checks": [], "errors": []}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stackgan-bench-") as d:
        for job in plan(args.device, parts, args.quick):
            print(f"[bench] {job.part}: {job.label} (load {load_average()})", file=sys.stderr, flush=True)
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
        print(f"[bench] data: stackgan.bench.data on {args.data_shards}", file=sys.stderr, flush=True)
        report["data"] = run_data(Path(args.data_shards), args.data_workers, args.quick)
    report["load_end"] = load_average()
    report["wall_s"] = time.perf_counter() - t_all
    derive(report)
    return report
