"""The main job on the embedded default data, end to end, with pictures and numbers at the end.

    python -m stackgan.demo [--out runs/demo] [--stage1-steps N] [--stage2-steps M] [--quick]

1. generate the embedded bird set (procedural birds in the CUB + StackGAN layout) and pack
   it into webdataset shards (``python -m stackgan.data.prepare --embedded``, which
   ``shards/prepare.py`` runs);
2. train stage I (``configs/birds_stage1.yaml``), then stage II from its export
   (``configs/birds_stage2.yaml``) with ``python -m stackgan.train``;
3. train the measuring nets (the part-wise attribute judge, on birds the renderer draws, and
   the 256-px detail net) beside stage I, on the core its training leaves idle; score stage I
   beside stage II, then stage II (judge consistency on training captions and on the unseen
   test species, judge-feature Frechet distance, diversity; stage II against its upsampled
   input) with ``python -m stackgan.evaluate``;
4. sample from free-text prompts with ``python -m stackgan.sample``;
5. plot the losses and diagnostics and print a summary (also ``<out>/summary.json``).

Every step is the same command a user would run by hand; each is skipped when its output
is already complete (the trainer resumes, prepare is a no-op on finished shards).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from .backends.base import cpu_has_bf16
from .data import birds
from .data.meta import load_metadata
from .files import atomic_json
from .metrics import detail
from .metrics.evalset import iter_split
from .metrics.judges.choice import choose_judge
from .metrics.netcache import cache_path
from .plots import plot_run, read_jsonl

# named as the docs name them; the trainer finds them from any folder (stackgan.files.config_path)
STAGE1_CONFIG, STAGE2_CONFIG = "configs/birds_stage1.yaml", "configs/birds_stage2.yaml"
OUT, DATA, SHARDS = "runs/demo", "data/birds-embedded", "shards/birds-embedded"

# natural sentences in the embedded set's vocabulary (its captions name the crown, back, wings,
# belly, tail and bill by colour, the bill's shape and length, the wing pattern and the size);
# the summary lists any prompt word the training captions never used (``prompt_coverage``)
PROMPTS = [
    "this small bird has a red crown, blue wings and a white belly.",
    "a bird with a yellow belly, black wings and a short orange conical beak.",
    "this bird has a green back, a grey belly and a green tail.",
    "a large bird with a white crown, brown wings and an orange hooked bill.",
]
WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def _run(step: str, args: list[str], log_dir: Path, echo: bool = True,
         env: dict[str, str] | None = None) -> float:
    """Run one stage as a subprocess, its output in ``<log_dir>/<step>.log`` and (``echo``) on the
    terminal, with ``env`` added to the environment; stop the demo if it fails."""
    header = f"=== {step}: {' '.join(args)}\n"
    if echo:
        print("\n" + header, end="", flush=True)
    t0 = time.time()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    with open(log_dir / f"{step}.log", "w") as log:
        log.write(header)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if echo:
                sys.stdout.write(line)
            log.write(line)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"demo: step {step!r} failed with exit status {rc} (log: {log_dir / (step + '.log')})")
    return time.time() - t0


class Background:
    """Steps run one after another on the core the foreground step leaves idle: one thread each,
    output to their logs only (the foreground step streams to the terminal).

    Why: a training step gains only ~1.3x from a second thread on a 2-core CPU (stage I: 94 vs
    71 img/s), so the measuring nets (attribute judge, detail net: ~2 CPU-minutes, which depend on
    the shards alone) cost stage I less time beside it than they would cost after it."""

    def __init__(self, steps: list[tuple[str, list[str]]], log_dir: Path):
        self.seconds: dict[str, float] = {}
        self.failed = ""
        self._thread = threading.Thread(target=self._run_all, args=(steps, log_dir), daemon=True)
        self._thread.start()
        if steps:
            names = ", ".join(s for s, _ in steps)
            print(f"\n=== in the background (one thread, logs in {log_dir}): {names}", flush=True)

    def _run_all(self, steps: list[tuple[str, list[str]]], log_dir: Path) -> None:
        for step, args in steps:
            try:
                self.seconds[step] = _run(step, args, log_dir, echo=False, env={"OMP_NUM_THREADS": "1"})
            except SystemExit as e:  # raised in this thread: kept for wait(), which stops the demo
                self.failed = str(e)
                return

    def wait(self) -> dict[str, float]:
        """Seconds per step, once all have finished; stop the demo if one failed."""
        self._thread.join()
        if self.failed:
            raise SystemExit(self.failed)
        return self.seconds


def measuring_net_steps(shards: str, py: str = sys.executable) -> list[tuple[str, list[str]]]:
    """The commands that train the evaluator's measuring nets for ``shards`` where they are not
    cached yet, to the files ``stackgan.evaluate`` reads (it would train them itself, in the
    foreground, on first use)."""
    meta = load_metadata(shards)
    judge = choose_judge(shards, meta=meta)
    net = cache_path(meta, detail.DEFAULT_FILE)
    steps = []
    if not judge.path.is_file():
        steps.append(("judge", [py, "-m", "stackgan.metrics.judges", "train", "--shards", shards, "--kind",
                                judge.kind, "--out", str(judge.path), "--threads", "1", "--workers", "1"]))
    if not net.is_file():
        steps.append(("detail-net", [py, "-m", "stackgan.metrics.detail", "train", "--shards", shards,
                                     "--out", str(net), "--threads", "1", "--reference-samples", "0"]))
    return steps


def training_words(shards: str | Path) -> set[str]:
    """Every word of the training split's captions (the ``txt.json`` field of each sample)."""
    return {w for raw in iter_split(load_metadata(shards), "train", ("txt.json",))
            for caption in json.loads(raw["txt.json"]) for w in WORD.findall(caption.lower())}


def prompt_coverage(prompts: list[str], words: set[str]) -> list[dict]:
    """Per prompt, the words its training captions never used: text the encoder embeds, but that
    the generator never learned to draw."""
    return [{"prompt": p, "unseen_words": sorted(set(WORD.findall(p.lower())) - words)} for p in prompts]


def demo_precision(asked: str, cuda: bool, cpu_bf16: bool) -> str:
    """The trainer's ``train.mixed_precision`` for the demo: bf16 where the CPU has bf16 units and
    trains on it (1.5x the images per second at the same quality per step, docs/quality.md), the
    configs' own choice elsewhere."""
    if asked == "auto":
        return "bf16" if cpu_bf16 and not cuda else "auto"
    return {"fp32": "no", "bf16": "bf16"}[asked]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stackgan.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=OUT, help="run folder root (--quick: runs/demo-quick)")
    p.add_argument("--data", default=DATA, help="where the embedded set is generated (--quick: <data>-quick)")
    p.add_argument("--shards", default=SHARDS, help="(--quick: <shards>-quick)")
    p.add_argument("--species", type=int, default=birds.DEFAULT_SPECIES,
                   help="species in the embedded set (a quarter are the unseen test species)")
    p.add_argument("--images-per-species", type=int, default=birds.DEFAULT_IMAGES)
    p.add_argument("--stage1-steps", type=int, default=None, help=f"default: {STAGE1_CONFIG}")
    p.add_argument("--stage2-steps", type=int, default=None, help=f"default: {STAGE2_CONFIG}")
    p.add_argument("--judge-samples", type=int, default=500, help="generated images per split for the judge")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on a CPU with bf16 units (AMX / AVX512-BF16) and no GPU, "
                        "else fp32")
    p.add_argument("--quick", action="store_true", help="a 3-minute smoke run (few steps, small set)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for both stages")
    a = p.parse_args(argv)
    a.precision = demo_precision(a.precision, torch.cuda.is_available(), cpu_has_bf16())
    if a.quick:  # a small set in folders of its own, so the full job's set is never replaced by it
        a.species, a.images_per_species = min(a.species, 8), min(a.images_per_species, 12)
        a.data = a.data if a.data != DATA else f"{DATA}-quick"
        a.shards = a.shards if a.shards != SHARDS else f"{SHARDS}-quick"
        a.out = a.out if a.out != OUT else f"{OUT}-quick"
        a.stage1_steps, a.stage2_steps = a.stage1_steps or 30, a.stage2_steps or 6
        a.judge_samples = min(a.judge_samples, 100)
    return a


def run_steps(a: argparse.Namespace, out: Path, logs: Path) -> tuple[dict[str, float], dict[str, dict]]:
    """Prepare, train both stages, evaluate both, sample from text: (seconds per step, metrics)."""
    py = sys.executable
    timings: dict[str, float] = {}
    s1, s2 = out / "stage1", out / "stage2"
    export1, export2 = s1 / "export" / "generator.safetensors", s2 / "export" / "generator.safetensors"

    timings["prepare"] = _run("prepare", [
        py, "-m", "stackgan.data.prepare", "--embedded", "--embedded-dir", a.data, "--out", a.shards,
        "--species", str(a.species), "--images-per-species", str(a.images_per_species)], logs)

    nets = Background(measuring_net_steps(a.shards, py), logs)  # beside stage I
    extra1 = [f"train.steps={a.stage1_steps}"] if a.stage1_steps else []
    extra1.append(f"train.mixed_precision={a.precision}")
    timings["stage1"] = _run("stage1", [
        py, "-m", "stackgan.train", "--config", STAGE1_CONFIG, f"data.shards={a.shards}",
        f"train.run_dir={s1}", *extra1, *a.overrides], logs)
    timings.update({f"{k} (background)": v for k, v in nets.wait().items()})

    def evaluate(name: str, export: Path) -> tuple[str, list[str]]:
        jsonl = out / f"metrics-{name}.jsonl"
        jsonl.unlink(missing_ok=True)
        return f"eval-{name}", [py, "-m", "stackgan.evaluate", "--export", str(export), "--shards", a.shards,
                                "--jsonl", str(jsonl), "--judge-samples", str(a.judge_samples)]

    eval1 = Background([evaluate("stage1", export1)], logs)  # beside stage II
    extra2 = [f"train.steps={a.stage2_steps}"] if a.stage2_steps else []
    extra2.append(f"train.mixed_precision={a.precision}")
    timings["stage2"] = _run("stage2", [
        py, "-m", "stackgan.train", "--config", STAGE2_CONFIG, f"data.shards={a.shards}",
        f"train.run_dir={s2}", f"model.stage1_export={export1}", *extra2, *a.overrides], logs)
    timings.update({f"{k} (background)": v for k, v in eval1.wait().items()})
    timings["eval-stage2"] = _run(*evaluate("stage2", export2), logs)

    metrics = {name: {r["metric"]: {k: v for k, v in r.items() if k not in ("metric", "time")}
                      for r in read_jsonl(out / f"metrics-{name}.jsonl")} for name in ("stage1", "stage2")}

    prompt_file = out / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    timings["sample"] = _run("sample", [
        py, "-m", "stackgan.sample", "--export", str(export2), "--prompts", str(prompt_file), "--n", "4",
        "--seed", "0", "--out", str(out / "samples-from-text"), "--stages"], logs)
    return timings, metrics


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings, metrics = run_steps(a, out, logs)
    s1, s2 = out / "stage1", out / "stage2"
    plots = [str(plot_run(s1, out / "plots" / "stage1.png")), str(plot_run(s2, out / "plots" / "stage2.png"))]
    summary = {
        "minutes": round((time.time() - t_start) / 60, 2),
        "data": {"species": a.species, "images_per_species": a.images_per_species, "shards": a.shards},
        "precision": a.precision,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "metrics": metrics,
        "plots": plots,
        "sample_grids": sorted(str(p) for p in (s1 / "samples").glob("step-*.png"))[-1:]
        + sorted(str(p) for p in (s2 / "samples").glob("step-*.png"))[-1:],
        "samples_from_text": str(out / "samples-from-text"),
        "exports": [str(s / "export" / "generator.safetensors") for s in (s1, s2)],
    }
    summary["stage2_vs_baseline"] = stage2_table(metrics.get("stage2", {}))
    summary["prompts"] = prompt_coverage(PROMPTS, training_words(a.shards))
    atomic_json(out / "summary.json", summary)
    print_summary(summary, out)
    return 0


def print_summary(summary: dict, out: Path) -> None:
    print("\n" + "=" * 78)
    print(f"StackGAN-HPC demo finished in {summary['minutes']} min -> {out}")
    for key, ms in summary["metrics"].items():
        parts = []
        for m in ("judge_consistency", "judge_fd", "diversity", "judge_diversity"):
            shown = {k: v for k, v in ms.get(m, {}).items()
                     if isinstance(v, (int, float)) and k not in ("step", "seconds")}
            parts.append(f"{m}: " + ", ".join(f"{k}={v:.3g}" for k, v in list(shown.items())[:4]))
        print(f"  {key:14s} " + " | ".join(parts))
    print_stage2_table(summary["stage2_vs_baseline"])
    print(f"  plots: {', '.join(summary['plots'])}")
    print(f"  samples from text: {out / 'samples-from-text'} (stages.png: stage I | upsampled | stage II)")
    unseen = sorted({w for p in summary["prompts"] for w in p["unseen_words"]})
    print("  prompts: every word appears in the training captions" if not unseen else
          f"  prompts: words the training captions never used (the encoder's guess): {', '.join(unseen)}")
    print(f"  summary: {out / 'summary.json'}")


# (label, metric, key of stage II, key of the upsampled stage-I baseline, key of a reference, its name)
STAGE2_ROWS = [
    ("consistency, training captions", "stage2_consistency", "train", "upsampled_train", "shuffled_train", "shuffled"),
    ("consistency, unseen test species", "stage2_consistency", "test", "upsampled_test", "shuffled_test", "shuffled"),
    ("FD at 256 px (detail net)", "fd256", "stage2", "upsampled", "floor", "real"),
    ("judge-feature FD at 64 px", "stage2_fd", "test", "upsampled_test", None, ""),
    ("sharpness (real = 1)", "sharpness", "stage2", "upsampled", None, ""),
]


def stage2_table(ms: dict) -> list[dict]:
    """Stage II next to its own stage-I input upsampled bicubically (the baseline it must beat),
    from ``stackgan.evaluate``'s stage-II metrics (plus judge_consistency's shuffled chance)."""
    rows = []
    for label, metric, mine, base, ref, ref_name in STAGE2_ROWS:
        r = ms.get(metric, {})
        if mine not in r:
            continue
        refs = ms.get("judge_consistency", {}) if ref_name == "shuffled" else r
        rows.append({"what": label, "stage2": r[mine], "upsampled_stage1": r.get(base),
                     "reference": refs.get(ref) if ref else None, "reference_is": ref_name})
    return rows


def print_stage2_table(rows: list[dict]) -> None:
    if not rows:
        return
    print("  stage II against its stage-I input upsampled bicubically (the baseline it must beat):")
    print(f"    {'':34s} {'stage II':>10s} {'upsampled':>10s}   reference")
    for r in rows:
        ref = f"{r['reference']:.3g} ({r['reference_is']})" if r["reference"] is not None else ""
        base = f"{r['upsampled_stage1']:10.3g}" if r["upsampled_stage1"] is not None else f"{'':10s}"
        print(f"    {r['what']:34s} {r['stage2']:10.3g} {base}   {ref}")


if __name__ == "__main__":
    sys.exit(main())
