"""The plan: which worker jobs the chosen parts need, and running each in a fresh process."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import ROOT
from .cases import Case, embedded_case, official_case, tiny_case


@dataclass
class Job:
    part: str
    label: str
    spec: dict
    timeout: float
    nproc: int = 1  # > 1: started through torchrun


MAIN_RUNNERS = ["ours", "original", "ours-before"]  # in every case: the first runs alone first
VARIANT_RUNNERS = ["ours-no-upconv", "ours-cl-everywhere", "ours-foreach-adam", "ours-nchw",
                   "ours-plain-adam"]


def plan(device: str, parts: set[str], quick: bool) -> list[Job]:
    """The worker jobs for the chosen parts (the order is the run order).

    CPU: stage I and II at the official sizes (variants at stage I b16 and stage II b4,
    where an iteration is cheap), the embedded sizes, fp32; bf16 once. CUDA: every
    precision, fewer cases in the half precisions, so that the whole run stays < 5 min.
    ``quick``: the same parts on tiny networks, one or two rounds each.
    """
    cuda = device == "cuda"
    base = {"device": device, "matmul_n": 512 if quick else (8192 if cuda else 4096),
            "threads": 1 if quick else None}  # quick: tiny ops, no OpenMP contention
    jobs: list[Job] = []
    if "check" in parts:
        jobs.append(Job("check", "original == ours (tiny)", {**base, "kind": "check", "device": "cpu"}, 300))
    if "peak" in parts:
        spec = {**base, "kind": "peak", "conv_batch": 2 if quick else 16, "conv_reps": 2,
                "conv_scale": 8 if quick else 1}
        jobs.append(Job("peak", "matmul + conv", spec, 600))
    inner = 5 if cuda else 1  # iterations per timed sample
    case_job = functools.partial(_case_job, {**base, "inner": inner})
    if quick:
        jobs += _quick_cases(case_job, parts, cuda)
        mem_case, procs_case = tiny_case(2, 4), tiny_case(1, 4)
    else:
        jobs += _full_cases(case_job, parts, cuda)
        mem_case, procs_case = official_case(2, 64), official_case(1, 16)
    if "procs" in parts and not cuda:
        jobs += _procs_jobs(base, procs_case, rounds=1 if quick else 3)
    if "memory" in parts:
        spec = {**base, "kind": "case", "case": dataclasses.asdict(mem_case), "runners": ["ours"],
                "precision": "bf16" if cuda else "fp32", "rounds": 3 if cuda else 0, "warmup": 1,
                "inner": 1, "count_flops": False}
        jobs.append(Job("memory", f"{mem_case.name} peak memory", spec, 1200))
    return jobs


def _case_job(base: dict, part: str, case: Case, runners: list[str], precision: str = "fp32", rounds: int = 3,
              warmup: int = 1, extras: tuple[str, ...] = (), timeout: float = 1200) -> Job:
    spec = {**base, "kind": "case", "case": dataclasses.asdict(case), "runners": list(runners),
            "precision": precision, "rounds": rounds, "warmup": warmup, "extras": list(extras)}
    return Job(part, f"{case.name} {precision}", spec, timeout)


def _quick_cases(case_job, parts: set[str], cuda: bool) -> Iterator[Job]:
    """Every case part on tiny networks (the smoke test)."""
    s1, s2 = tiny_case(1, 4), tiny_case(2, 2)
    variants = VARIANT_RUNNERS if "variants" in parts else []
    if parts & {"stage1", "variants"}:
        yield case_job("stage1", s1, MAIN_RUNNERS + variants, rounds=2)
    if parts & {"stage2", "variants"}:
        yield case_job("stage2", s2, MAIN_RUNNERS + variants, rounds=2, extras=("infer",) if variants else ())
    if "compile" in parts:
        yield case_job("compile", s1, ["ours", "ours-compile"], rounds=2, warmup=2, timeout=600)
    if "bf16" in parts:
        for p in (["bf16", "fp16"] if cuda else ["bf16"]):
            yield case_job("bf16", s1, MAIN_RUNNERS, p, rounds=1)


def _full_cases(case_job, parts: set[str], cuda: bool) -> Iterator[Job]:
    """Official and embedded sizes; on CUDA in every precision, fewer cases in the half ones."""
    variants = VARIANT_RUNNERS if "variants" in parts else []
    w, r = (2, 10) if cuda else (1, 3)  # warm-up iterations, timed rounds
    for p in (["fp32", "bf16", "fp16"] if cuda else ["fp32"]):
        half = p != "fp32"
        if "stage1" in parts:
            yield case_job("stage1", official_case(1, 64), MAIN_RUNNERS, p, rounds=r, warmup=w)
            if p != "fp16":
                yield case_job("stage1", official_case(1, 16), MAIN_RUNNERS + ([] if half else variants), p,
                               rounds=10 if cuda else 4, warmup=w)
        if "stage2" in parts:
            yield case_job("stage2", official_case(2, 16), MAIN_RUNNERS, p, rounds=r, warmup=w)
        if "variants" in parts and not half:
            yield case_job("variants", official_case(2, 4), MAIN_RUNNERS + variants, p,
                           rounds=10 if cuda else 2, warmup=w, extras=("infer",))
        if "embedded" in parts and p != "fp16":
            for st, b in ((1, 64), (1, 16), (2, 16)) if not half else ((1, 64),):
                yield case_job("embedded", embedded_case(st, b), MAIN_RUNNERS, p, rounds=10 if cuda else 4,
                               warmup=2)
    if "compile" in parts:  # stage I only: compiling stage II takes too long here
        yield case_job("compile", official_case(1, 16), ["ours", "ours-compile"], "bf16" if cuda else "fp32",
                       rounds=r, warmup=2, timeout=900)
    if "bf16" in parts and not cuda:  # once, stage I b16: is autocast worth it on this CPU?
        yield case_job("bf16", official_case(1, 16), MAIN_RUNNERS, "bf16", rounds=2)


def _procs_jobs(base: dict, case: Case, rounds: int) -> list[Job]:
    """The same global batch in 1 process x 2 threads and in 2 DDP processes x 1 thread."""
    two = {**base, "kind": "procs", "case": dataclasses.asdict(case), "threads": 1, "rounds": rounds,
           "warmup": 1}
    one = {**two, "case": dataclasses.asdict(dataclasses.replace(case, batch=case.batch * 2)), "threads": 2}
    return [Job("procs", "1 process x 2 threads", one, 900),
            Job("procs", "2 processes x 1 thread (DDP, gloo)", two, 900, nproc=2)]


def run_job(job: Job, workdir: Path) -> dict:
    """Run one job in a fresh process; its JSON result, or the error it died of."""
    spec_path = workdir / f"{len(list(workdir.iterdir()))}-{job.part}.json"
    out = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps({**job.spec, "out": str(out)}))
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.nproc}"]
    worker = ["-m", "stackgan.bench", "--worker", str(spec_path)]
    cmd = [sys.executable, *torchrun, *worker] if job.nproc > 1 else [sys.executable, *worker]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=job.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {job.timeout:.0f}s (skipped)", "wall_s": job.timeout}
    wall = time.perf_counter() - t0
    for line in p.stderr.splitlines():
        if line.startswith("[bench]"):
            print(line, file=sys.stderr, flush=True)
    if p.returncode != 0 or not out.is_file():
        return {"error": f"worker exited with {p.returncode}: {p.stderr[-2000:]}", "wall_s": wall}
    return {**json.loads(out.read_text()), "wall_s": wall}


def run_data(shards: Path, workers: list[int], quick: bool) -> dict:
    """The shard stream's own samples/s (``stackgan.bench.data``), or why it was not measured."""
    if not (shards / "metadata.json").is_file():
        return {"skipped": f"no shards at {shards} (make them with shards/prepare.py, "
                           "or give --data-shards PATH)"}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "data.json"
        cmd = [sys.executable, "-m", "stackgan.bench.data", "--shards", str(shards), "--out", str(out),
               "--workers", *[str(w) for w in workers], "--batches", "4" if quick else "16",
               "--batch-size", "16" if quick else "64"]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if p.returncode != 0 or not out.is_file():
            return {"error": f"stackgan.bench.data exited with {p.returncode}: {p.stderr[-1500:]}"}
        return {"bench_data": json.loads(out.read_text())}
