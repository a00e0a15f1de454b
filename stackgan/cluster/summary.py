"""A sweep's outcome: one row per point from its run folder, as ``summary.md`` and ``summary.csv``."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..files import atomic_write


def _read_jsonl(path: Path) -> list[dict]:
    recs = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill: ignore
    return recs


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Outcome and last metrics of one run folder (from COMPLETE, checkpoints and log.jsonl)."""
    run = Path(run_dir)
    recs = _read_jsonl(run / "log.jsonl")
    train_recs = [r for r in recs if "loss_d" in r]
    diag = [r for r in recs if "diversity" in r]
    ckpts = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
    if (run / "COMPLETE").is_file():
        status = "complete"
    elif (run / "TIME_LIMIT").is_file():
        status = "time limit (not complete)"
    elif ckpts:
        status = f"stopped ({ckpts[-1].name})"
    elif recs:
        status = "failed before a checkpoint"
    else:
        status = "not started"
    row: dict[str, Any] = {"status": status, "step": max((r.get("step", 0) for r in recs), default=0)}
    last = train_recs[-1] if train_recs else {}
    for k in ("loss_d", "loss_g", "kl", "g_d_ratio", "img_per_s"):
        row[k] = last.get(k, "")
    row.update({k: v for k, v in last.items() if k.startswith("d_") and isinstance(v, (int, float))})
    row["diversity"] = diag[-1]["diversity"] if diag else ""
    return row


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per point of the sweep (``sweep.json``): its grid values and its run's status."""
    man = Path(sweep_dir) / "sweep.json"
    if not man.is_file():
        raise ConfigError(f"{sweep_dir}: no sweep.json (not a sweep folder)")
    return [{"point": p["name"], **p["point"], **run_status(p["run_dir"])}
            for p in json.loads(man.read_text())["points"]]


def write_summary(sweep_dir: str | Path) -> Path:
    """``summary.csv`` (every column) and ``summary.md`` (a table) in the sweep folder."""
    sweep_dir = Path(sweep_dir)
    rows = summarize(sweep_dir)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write(sweep_dir / "summary.csv", buf.getvalue())

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    atomic_write(sweep_dir / "summary.md", "\n".join(md) + "\n")
    return sweep_dir / "summary.md"
