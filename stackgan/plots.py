"""Training plots from a run folder: the figures in the docs come from this command.

    python -m stackgan.plots RUN_DIR [RUN_DIR ...] --out DIR [--compare NAME]

One PNG per run (``<DIR>/<run name>.png``): losses, D(real / wrong / fake), diagnostics
(diversity, gradient norms), images/s, and -- when the run scored metrics at snapshot time
(``train.metrics``) -- the attribute judge's consistency on training captions and on the
unseen test species, with the shuffled-caption chance level. With ``--compare``, one more
PNG puts every run's judge curves side by side, in units of the judge's score on real images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["plot_compare", "plot_run", "read_jsonl"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _judge_rows(run_dir: Path) -> list[dict]:
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("metric") == "judge_consistency"]
    by_step = {r["step"]: r for r in rows}  # a later evaluation of the same step replaces the snapshot
    return [by_step[s] for s in sorted(by_step)]


def _plt():
    # here, not at the top: matplotlib costs ~0.5 s to import and needs its backend chosen first
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, out: str | Path) -> Path:
    """Losses, D outputs, diagnostics, throughput (and judge consistency if scored) as one PNG."""
    plt = _plt()
    run_dir, out = Path(run_dir), Path(out)
    recs = read_jsonl(run_dir / "log.jsonl")
    train = [r for r in recs if "loss_d" in r]
    diag = [r for r in recs if "diversity" in r]
    judge = _judge_rows(run_dir)
    fig, ax = plt.subplots(1, 5 if judge else 4, figsize=(22 if judge else 18, 3.6))
    steps = [r["step"] for r in train]
    ax[0].plot(steps, [r["loss_d"] for r in train], label="D loss")
    ax[0].plot(steps, [r["loss_g"] for r in train], label="G loss (incl. KL)")
    ax[0].set_title("losses")
    for k in ("d_real", "d_wrong", "d_fake"):
        if train and k in train[0]:
            ax[1].plot(steps, [r[k] for r in train], label=k)
    ax[1].set_title("D outputs (mean probability)")
    if diag:
        ax[2].plot([r["step"] for r in diag], [r["diversity"] for r in diag], label="diversity")
        ax[2].plot([r["step"] for r in diag], [min(r["grad_norm_d"] or 0, 1e3) for r in diag], label="|grad D|")
        ax[2].plot([r["step"] for r in diag], [min(r["grad_norm_g"] or 0, 1e3) for r in diag], label="|grad G|")
        ax[2].set_yscale("log")
    ax[2].set_title("diagnostics")
    ax[3].plot(steps, [r["img_per_s"] for r in train])
    ax[3].set_title("images / s")
    if judge:
        js = [r["step"] for r in judge]
        for split, style in (("train", "-o"), ("test", "-s")):
            ax[4].plot(js, [r[split] for r in judge], style, label=f"{split} captions")
            ax[4].plot(js, [r[f"shuffled_{split}"] for r in judge], ":", label=f"{split}, shuffled (chance)")
        ax[4].set_title("judge consistency")
    for a in ax:
        a.set_xlabel("step")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_compare(run_dirs: list[str | Path], out: str | Path, targets: tuple[float, float] = (0.8, 0.6)) -> Path:
    """Judge consistency / the judge's score on real images, per run, for both splits, with the
    targets (default: 80% on training captions, 60% on the unseen test species)."""
    plt = _plt()
    out = Path(out)
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, split in enumerate(("train", "test")):
        for rd in map(Path, run_dirs):
            rows = _judge_rows(rd)
            if rows:
                ax[i].plot([r["step"] for r in rows], [r[split] / r[f"real_{split}"] for r in rows], "-o",
                           label=rd.name)
                ax[i].plot([r["step"] for r in rows], [r[f"shuffled_{split}"] / r[f"real_{split}"] for r in rows],
                           ":", color=ax[i].lines[-1].get_color(), label=f"{rd.name}, shuffled captions")
        ax[i].axhline(targets[i], color="k", lw=0.8, ls="--", label=f"target {targets[i]:.0%}")
        ax[i].set_title(f"judge consistency / real images, {split} "
                        + ("captions" if split == "train" else "(unseen species)"))
        ax[i].set_xlabel("step")
        ax[i].set_ylim(0, 1)
        ax[i].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stackgan.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (with log.jsonl)")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--compare", default="", help="also write <out>/<NAME>.png comparing the runs' judge curves")
    a = p.parse_args(argv)
    missing = [r for r in a.runs if not (Path(r) / "log.jsonl").is_file()]
    if missing:
        print(f"error: no log.jsonl in {', '.join(missing)} (not a run folder?)", file=sys.stderr)
        return 2
    for r in a.runs:
        print(plot_run(r, Path(a.out) / f"{Path(r).name}.png"))
    if a.compare:
        print(plot_compare(a.runs, Path(a.out) / f"{a.compare}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
