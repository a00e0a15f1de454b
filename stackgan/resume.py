"""What a resumed run may change, and the run folder's record of every config it ran with.

A run folder holds one experiment. Continuing it with another learning rate, loss or model
option would make its checkpoints, logs and export describe a mix of two, so on resume the
checkpoint's config is compared with the new one: the keys in :data:`MAY_CHANGE` (how long to
train, how often to log / sample / checkpoint / measure, how many loader workers, the tracker,
which checkpoints to keep) may differ and are logged; any other difference is refused before
training (exit 2) with every key and both values, unless ``--resume force`` (then recorded).

``config.yaml`` is the config the run started with; ``config-history.jsonl`` gets one line per
config the run continued with (the first, and each change), with the step it took effect at.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import Config, ConfigError, dump_config, flat_keys, to_dict

# Keys that change how long or how visibly a run trains, never what it computes at a step.
MAY_CHANGE = frozenset({
    "train.steps", "train.epochs", "train.time_limit_min",
    "train.log_every", "train.sample_every", "train.ckpt_every",
    "train.metrics", "train.metrics_every", "train.metrics_samples", "train.judge",
    "train.inception", "train.fid_inception",
    "train.keep_last", "train.keep_every",
    "train.report_to",  # the experiment tracker
    "train.run_dir",  # the folder may have moved
    "data.num_workers", "data.cache_dir", "data.cache_gb",  # where remote shards are cached, not which
})
HISTORY = "config-history.jsonl"


def config_changes(saved: dict, cfg: Config) -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every key whose value differs. A key the saved
    config lacks (an option added since) counts as its default; keys that no longer exist are
    :func:`stackgan.config.changed_by_removal`'s business."""
    old, new, default = flat_keys(saved), flat_keys(to_dict(cfg)), flat_keys(to_dict(Config()))
    return {k: (old.get(k, default[k]), v) for k, v in new.items() if old.get(k, default[k]) != v}


def check_changes(changes: dict[str, tuple], where: Path, force: bool) -> None:
    """Refuse (:class:`ConfigError`) changes outside :data:`MAY_CHANGE` unless ``force``."""
    refused = {k: v for k, v in changes.items() if k not in MAY_CHANGE}
    if refused and not force:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now"
                           for k, (a, b) in sorted(refused.items()))
        raise ConfigError(
            f"{where} was trained with another config; resuming would mix two experiments: {listed}. "
            "Use another train.run_dir (or --resume none) for a new run, or --resume force to continue "
            "this one with the new values (recorded in config-history.jsonl)")


def describe_changes(changes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items()))


def record_config(run_dir: Path, cfg: Config, step: int, changes: dict[str, tuple] | None,
                  forced: bool = False, resumed_from: Path | None = None) -> None:
    """A fresh run (``changes`` None) writes ``config.yaml``; every fresh start and every resume
    with changes appends its config to ``config-history.jsonl`` (rank 0 only)."""
    if changes is None or not (run_dir / "config.yaml").is_file():
        dump_config(cfg, run_dir / "config.yaml")
    if changes == {}:
        return
    rec = {"step": step, "time": time.time(), "resumed_from": str(resumed_from) if resumed_from else None,
           "changes": {k: list(v) for k, v in (changes or {}).items()}, "forced": forced,
           "config": to_dict(cfg)}
    with open(run_dir / HISTORY, "a") as f:
        f.write(json.dumps(rec) + "\n")
