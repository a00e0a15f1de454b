"""Score a generator export with the registered metrics.

    python -m stackgan.evaluate --export runs/stage1/export/generator.safetensors \\
        --shards shards/birds-embedded --metrics judge_consistency,judge_fd,diversity
    python -m stackgan.evaluate --export ... --shards shards/cub --metrics fid_inception \\
        --fid-inception /path/pt_inception-2015-12-05-6726825d.pth  # 30000 samples by default

A stage-II export is also scored against its own stage-I input (stage2_consistency,
stage2_fd, fd256, sharpness: on by default for stage II). Results are printed and appended
(one JSON line per metric) to ``metrics.jsonl`` in the run folder (``--jsonl`` to change).
The attribute judge is the one ``--judge`` selects: ``parts`` (the default on the embedded
set, ``judge-parts.pt``), ``species`` (``judge.pt``; the default on CUB) or a judge file; the
256px detail net is read from ``--detail-net`` (default ``detail256.pt``); each is trained at
its file first if the file does not exist. Default files live in the shard folder, or, when
that is read-only, in ``--cache-dir`` (default ``$XDG_CACHE_HOME/stackgan``, else
``~/.cache/stackgan``) under the shards' fingerprint. It runs on a GPU when there is one
(``--device auto``, the default), with a progress bar on a terminal.
Under ``torchrun --nproc-per-node K`` every rank evaluates a disjoint share of the images.

``fid_inception`` is FID with the FID Inception (pytorch-fid's network, the papers'); the
``inception_score`` / ``fid`` figures (torchvision's Inception-v3) are monitoring figures,
not directly comparable with published values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .errors import StackGANError, report
from .metrics import MetricError
from .export import load_generator
from .metrics import EvalContext, compute, names, rank_world, resolve_device

DEFAULT_METRICS = "judge_consistency,judge_fd,diversity,judge_diversity"
# stage II: first the figures against its own stage-I input (their generation pass serves the judge metrics)
DEFAULT_METRICS_STAGE2 = "stage2_consistency,stage2_fd,fd256,sharpness," + DEFAULT_METRICS


def default_metrics(stage: int) -> str:
    return DEFAULT_METRICS_STAGE2 if stage == 2 else DEFAULT_METRICS


def default_jsonl(export: str | Path) -> Path:
    parent = Path(export).resolve().parent
    return (parent.parent if parent.name == "export" else parent) / "metrics.jsonl"


def _init_distributed(device: str) -> str:
    """Join the process group torchrun describes (if any); returns this rank's device
    (``auto``: CUDA when present)."""
    device = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return device


def format_results(results: dict[str, dict]) -> str:
    """One line per metric; a breakdown (a dict value, e.g. per attribute group) on its own line."""
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = []
    for name, res in results.items():
        vals = ", ".join(f"{k} {fmt(v)}" for k, v in res.items() if k != "note" and not isinstance(v, dict))
        lines.append(f"{name}: {vals}")
        for k, v in res.items():
            if isinstance(v, dict):
                lines.append(f"  {k}: " + ", ".join(f"{kk} {fmt(vv)}" for kk, vv in v.items()))
        if "note" in res:
            lines.append(f"  ({res['note']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--export", required=True, help="generator export (<run>/export/generator.safetensors)")
    p.add_argument("--shards", required=True, help="the shard set the generator was trained on")
    p.add_argument("--metrics", default="",
                   help=f"comma-separated, from: {', '.join(names())} (default: {DEFAULT_METRICS}; "
                        f"stage II: {DEFAULT_METRICS_STAGE2})")
    p.add_argument("--judge", default="",
                   help="attribute judge: parts, species, or a judge file (default: parts on the embedded "
                        "set (<shards>/judge-parts.pt), species on other shards (<shards>/judge.pt))")
    p.add_argument("--inception", default="", help="Inception-v3 state_dict for inception_score / fid")
    p.add_argument("--fid-inception", default="",
                   help="FID-Inception weights (pt_inception-2015-12-05-6726825d.pth) for fid_inception "
                        "(default: the torch hub cache); never downloaded")
    p.add_argument("--paper-inception", default="",
                   help="converted StackGAN CUB Inception for inception_score_paper (tf_inception convert)")
    p.add_argument("--detail-net", default="",
                   help="256px detail net for fd256 (default detail256.pt in the shard or cache folder, "
                        "trained on first use)")
    p.add_argument("--cache-dir", default="",
                   help="where judges and the detail net are cached when the shard folder is read-only "
                        "(default $XDG_CACHE_HOME/stackgan or ~/.cache/stackgan)")
    p.add_argument("--num-samples", type=int, default=30000, help="generated images for IS / FID")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--judge-samples", type=int, default=1000,
                   help="generated images per split, judge metrics")
    p.add_argument("--judge-scope", choices=["caption", "image"], default="caption",
                   help="score the attribute groups each caption states (default), or all of the image's")
    p.add_argument("--diversity-captions", type=int, default=32)
    p.add_argument("--diversity-z", type=int, default=8, help="images per caption for the diversity score")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present, the default), cpu, cuda, ...")
    p.add_argument("--jsonl", default="", help="results file (default <run folder>/metrics.jsonl)")
    args = p.parse_args(argv)
    try:
        try:
            device = _init_distributed(args.device)
        except ValueError as e:  # a device name torch does not know, or CUDA missing
            raise MetricError(str(e)) from e
        G, info = load_generator(args.export, device)
        ctx = EvalContext.from_export(
            info, args.shards, device=device, seed=args.seed, batch_size=args.batch_size, judge=args.judge,
            inception=args.inception, fid_inception=args.fid_inception, paper_inception=args.paper_inception,
            num_samples=args.num_samples,
            judge_samples=args.judge_samples, judge_scope=args.judge_scope, detail_net=args.detail_net,
            diversity_captions=args.diversity_captions, diversity_z=args.diversity_z,
            is_splits=args.is_splits, cache_dir=args.cache_dir, progress=True,
        )
        jsonl = Path(args.jsonl) if args.jsonl else default_jsonl(args.export)
        results = compute(args.metrics or default_metrics(info.stage), G, ctx, step=info.step, jsonl=jsonl,
                          extra={"export": str(args.export), "stage": info.stage, "source": "evaluate"})
    except StackGANError as e:
        return report(e, "stackgan.evaluate")
    if rank_world()[0] == 0:
        print(format_results(results))
        print(f"appended to {jsonl}")
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
