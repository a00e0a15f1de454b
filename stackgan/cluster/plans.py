"""What to submit: the stage I -> stage II chain, and sweeps (a grid of overrides as one job
array, one run folder per point, and a summary job after the array).

Every config is checked here, before anything is submitted.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

from ..config import ConfigError, load_config
from ..files import config_path
from .jobs import SummaryJob, make_train_job
from .settings import ClusterConfig, executor_parameters
from .submit import Planned
from .summary import atomic_write


def plan_chain(cc: ClusterConfig, stage1_config: str, stage2_config: str, stage1_overrides: list[str],
               stage2_overrides: list[str]) -> list[Planned]:
    """Stage I, then stage II with afterok on stage I (its export is stage II's frozen G)."""
    s1 = make_train_job(stage1_config, stage1_overrides, stop_grace_s=cc.stop_grace_s)
    s1_cfg = load_config(s1.config, s1.overrides)
    if s1_cfg.model.stage != 1:
        raise ConfigError(f"{stage1_config}: model.stage must be 1 for the first job of the chain")
    export = Path(s1_cfg.train.run_dir) / "export" / "generator.safetensors"  # stackgan.export.export_path
    s2_over = [o for o in stage2_overrides if not o.startswith("model.stage1_export=")]
    if len(s2_over) == len(stage2_overrides):  # not set by the user: chain to this stage I
        s2_over.append(f"model.stage1_export={export}")
    else:
        s2_over = stage2_overrides
    s2 = make_train_job(stage2_config, s2_over, stop_grace_s=cc.stop_grace_s, need_stage1_export=False)
    if load_config(s2.config, s2.overrides).model.stage != 2:
        raise ConfigError(f"{stage2_config}: model.stage must be 2 for the second job of the chain")
    return [
        Planned("stage1", s1, executor_parameters(cc, cc.train, "stackgan-s1")),
        Planned("stage2", s2, executor_parameters(cc, cc.train, "stackgan-s2"), "stage1", "afterok"),
    ]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["optim.lr_g=1e-4,2e-4", "model.gf_dim=32,64"]`` -> ordered {key: [values]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like optim.lr_g=1e-4,2e-4")
        key, vals = item.split("=", 1)
        values = [v.strip() for v in vals.split(",") if v.strip()]
        if not key or not values:
            raise ConfigError(f"--grid {item!r}: needs a key and at least one value")
        if key in grid:
            raise ConfigError(f"--grid {key} given twice")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(index: int, point: dict[str, str]) -> str:
    """A folder name that says what the point is: ``03-lr_g=2e-4-gf_dim=64``."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join([f"{index:02d}", *parts]))


def plan_sweep(cc: ClusterConfig, config: str, overrides: list[str], grid: dict[str, list[str]],
               sweep_dir: str | Path, write_manifest: bool = True) -> list[Planned]:
    """Check every point's config, write ``sweep.json`` (the points and their run folders)."""
    sweep_dir = Path(sweep_dir).resolve()
    jobs, manifest = [], []
    for i, point in enumerate(grid_points(grid)):
        name = point_name(i, point)
        over = [*overrides, *(f"{k}={v}" for k, v in point.items()), f"train.run_dir={sweep_dir / name}"]
        try:
            jobs.append(make_train_job(config, over, stop_grace_s=cc.stop_grace_s))
        except ConfigError as e:
            raise ConfigError(f"sweep point {name}: {e}") from None
        manifest.append({"name": name, "point": point, "run_dir": str(sweep_dir / name), "overrides": over})
    if write_manifest:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(sweep_dir / "sweep.json", json.dumps(
            {"config": str(config_path(config).resolve()), "overrides": overrides, "grid": grid,
             "points": manifest},
            indent=2))
    return [
        Planned("points", jobs, executor_parameters(cc, cc.train, "stackgan-sweep")),
        Planned("summary", SummaryJob(str(sweep_dir)), executor_parameters(cc, cc.summary, "stackgan-sweep-summary"),
                "points", "afterany"),
    ]
