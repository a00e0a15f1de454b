"""The command lines: ``jobs/train_chain.py``, ``jobs/sweep.py``, ``jobs/evaluate.py`` (thin
wrappers around the ``*_main`` functions here) and ``python -m stackgan.cluster resolve |
summarize | env`` (used by ``slurm/*.sh`` and the sweep's summary job)."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from ..config import ConfigError
from ..errors import EXIT_BAD_INPUT, StackGANError, report
from .env import shell_text
from .jobs import CommandJob, check_train_config
from .plans import parse_grid, plan_chain, plan_sweep
from .settings import ClusterConfig, executor_parameters, load_cluster_config
from .submit import Planned, describe, format_reports, submit_plan, wait_for_outcome
from .summary import write_summary


def _common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cluster", default="jobs/cluster.yaml", help="cluster config (default: %(default)s)")
    ap.add_argument("--cluster-set", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override cluster config entries, e.g. train.nodes=2 partition=gpu")
    ap.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    ap.add_argument("--wait", action="store_true", help="wait for the jobs and print their outcome")


def _run(plan: list[Planned], cc: ClusterConfig, args, run_dirs: dict[str, list[str]],
         after: Callable[[], None] | None = None) -> int:
    """Print the plan (--dry-run) or submit it; with --wait, the outcome table (status 1 if
    any job did not complete)."""
    if args.dry_run:
        print(describe(plan), end="")
        print("(dry run: nothing submitted)")
        return 0
    jobs = submit_plan(cc, plan)
    for label, js in jobs.items():
        print(f"submitted {label}: {', '.join(j.job_id for j in js)}")
    print(f"logs: {Path(cc.folder).parent if '%' in cc.folder else cc.folder}/<job id>/")
    if not args.wait:
        return 0
    reports = wait_for_outcome(jobs, run_dirs, cc.poll_s)
    print(format_reports(reports))
    if after is not None:
        after()
    return 0 if all(r.state == "COMPLETED" for r in reports) else 1


def chain_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/train_chain.py",
                                 description="Stage I then stage II on Slurm (stage II waits for stage I's success).")
    ap.add_argument("--stage1-config", default="configs/birds_stage1.yaml")
    ap.add_argument("--stage2-config", default="configs/birds_stage2.yaml")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for both stages")
    ap.add_argument("--stage1-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for stage I")
    ap.add_argument("--stage2-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for stage II")
    _common_args(ap)
    args = ap.parse_args(argv)
    try:
        cc = load_cluster_config(args.cluster, args.cluster_set)
        plan = plan_chain(cc, args.stage1_config, args.stage2_config, [*args.set, *args.stage1_set],
                          [*args.set, *args.stage2_set])
    except StackGANError as e:
        return report(e, "train_chain")
    dirs = {p.label: [p.fn.run_dir] for p in plan}
    return _run(plan, cc, args, dirs)


def sweep_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/sweep.py",
                                 description="A grid of overrides as one Slurm job array + a summary table.")
    ap.add_argument("--config", default="configs/birds_stage1.yaml")
    ap.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                    help="one axis of the grid (repeat for more axes)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every point")
    ap.add_argument("--sweep-dir", help="folder holding one run folder per point (default: runs/sweeps/<time>)")
    ap.add_argument("--summarize", metavar="SWEEP_DIR", help="only (re)write SWEEP_DIR/summary.{md,csv} and print it")
    _common_args(ap)
    args = ap.parse_args(argv)
    try:
        if args.summarize:
            print(write_summary(args.summarize).read_text(), end="")
            return 0
        if not args.grid:
            raise ConfigError("give at least one --grid KEY=V1,V2")
        cc = load_cluster_config(args.cluster, args.cluster_set)
        sweep_dir = args.sweep_dir or f"runs/sweeps/{time.strftime('%Y%m%d-%H%M%S')}"
        plan = plan_sweep(cc, args.config, args.set, parse_grid(args.grid), sweep_dir,
                          write_manifest=not args.dry_run)
    except StackGANError as e:
        return report(e, "sweep")
    sweep_dir = str(Path(sweep_dir).resolve())
    dirs = {"points": [j.run_dir for j in plan[0].fn], "summary": [""]}
    return _run(plan, cc, args, dirs, after=lambda: print(Path(sweep_dir, "summary.md").read_text(), end=""))


def evaluate_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python jobs/evaluate.py",
                                 description="Run `python -m stackgan.evaluate ARGS` as a Slurm job "
                                             "(resources: the cluster config's `eval` section).")
    _common_args(ap)
    ap.add_argument("--module", default="stackgan.evaluate", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs=argparse.REMAINDER, help="arguments for stackgan.evaluate (after --)")
    args = ap.parse_args(argv)
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    if not any(a == "--device" or a.startswith("--device=") for a in rest):
        rest = [*rest, "--device", "auto"]  # the job's GPU when it has one (stated: --dry-run shows it)
    try:
        cc = load_cluster_config(args.cluster, args.cluster_set)
    except StackGANError as e:
        return report(e, "evaluate")
    job = CommandJob(args.module, rest, str(Path.cwd()))
    params = executor_parameters(cc, cc.eval, "stackgan-eval")
    params["tasks_per_node"] = 1  # one evaluation process, whatever the GPU count
    plan = [Planned("evaluate", job, params)]
    return _run(plan, cc, args, {})


def resolve_main(argv: list[str]) -> int:
    """``python -m stackgan.cluster resolve --config C [k=v ...]``: shell assignments for slurm/*.sh."""
    ap = argparse.ArgumentParser(prog="python -m stackgan.cluster resolve")
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = check_train_config(args.config, args.overrides)
    except StackGANError as e:
        return report(e, "stackgan.cluster")
    values = {"RUN_DIR": str(Path(cfg.train.run_dir).resolve()), "STAGE": str(cfg.model.stage),
              "STAGE1_EXPORT": cfg.model.stage1_export}
    print("\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["resolve"]:
        return resolve_main(argv[1:])
    if argv == ["env"]:
        print(shell_text())
        return 0
    if argv[:1] == ["summarize"] and len(argv) == 2:
        try:
            print(write_summary(argv[1]).read_text(), end="")
            return 0
        except StackGANError as e:
            return report(e, "stackgan.cluster")
    print("usage: python -m stackgan.cluster resolve --config FILE [key=value ...]\n"
          "       python -m stackgan.cluster summarize SWEEP_DIR\n"
          "       python -m stackgan.cluster env   (exit statuses and rendezvous values for slurm/*.sh)",
          file=sys.stderr)
    return EXIT_BAD_INPUT
