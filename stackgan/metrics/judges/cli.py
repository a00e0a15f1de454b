"""``python -m stackgan.metrics.judges train|show``: train and cache an attribute judge, or
print a judge file's report (see the package docstring)."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from stackgan.data.meta import ShardError, load_metadata

from ..core import resolve_device
from ..redraw import RedrawError
from .base import KINDS, JudgeError
from .choice import choose_judge, default_kind, format_report, load_judge, train_judge
from .species import MIN_STEPS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.metrics.judges",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train an attribute judge for a shard set and cache it")
    t.add_argument("--shards", required=True, help="prepared shard folder with attr.npy labels")
    t.add_argument("--kind", choices=KINDS, default=None,
                   help="parts (embedded set only) or species; default: parts on the embedded set, "
                        "else species")
    t.add_argument("--out", default="",
                   help="judge file (default judge-parts.pt or judge.pt in the shard folder, or the cache "
                        "folder when that is read-only)")
    t.add_argument("--steps", type=int, default=None, help="optimizer updates (default: the kind's)")
    t.add_argument("--batch-size", type=int, default=None,
                   help="default: 128 (species); parts: by the set's size")
    t.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 2e-3 (species); parts: by the set's size)")
    t.add_argument("--width", type=int, default=None, help="network width (default: 16)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    t.add_argument("--cache-dir", default="",
                   help="cache folder used when the shard folder is read-only "
                        "(default $XDG_CACHE_HOME/stackgan)")
    t.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default; 1 is fastest on a busy small machine)")
    sp = t.add_argument_group("species judge")
    sp.add_argument("--epochs", type=float, default=6.0,
                    help=f"passes over the training images (at least {MIN_STEPS} steps)")
    sp.add_argument("--holdout", type=int, default=10, help="hold out 1 in this many train keys")
    pa = t.add_argument_group("part-wise judge")
    pa.add_argument("--images", type=int, default=None,
                    help="rendered training birds (default: by the set's size)")
    pa.add_argument("--val-images", type=int, default=None,
                    help="held-out rendered birds (default: a tenth, >= 500)")
    pa.add_argument("--workers", type=int, default=None,
                    help="rendering processes (default: the usable cores)")
    s = sub.add_parser("show", help="print a judge file's stored report")
    s.add_argument("path")
    args = p.parse_args(argv)
    try:
        if args.cmd == "show":
            j = load_judge(args.path)
            print(json.dumps({"kind": j.kind, "trained_on": j.trained_on,
                              **(asdict(j.report) if j.report else {})}, indent=1))
            return 0
        kind = args.kind or default_kind(load_metadata(args.shards))
        out = Path(args.out) if args.out else choose_judge(args.shards, kind, cache_dir=args.cache_dir).path
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        options = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "width": args.width,
                   "seed": args.seed}
        options |= ({"epochs": args.epochs, "holdout": args.holdout} if kind == "species" else
                    {"images": args.images, "val_images": args.val_images, "workers": args.workers})
        try:
            device = resolve_device(args.device)
        except ValueError as e:  # an unknown device name, or CUDA asked for where there is none
            raise JudgeError(str(e)) from e
        options = {k: v for k, v in options.items() if v is not None}
        judge = train_judge(args.shards, kind, device=device, **options)
        judge.save(out)
        print(f"{kind} judge written to {out}")
        print(format_report(judge.report))
        print(json.dumps({"kind": kind, **asdict(judge.report)}))
        return 0
    except (JudgeError, ShardError, RedrawError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
