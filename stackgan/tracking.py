"""Experiment trackers through Accelerate (``train.report_to``): TensorBoard, W&B, MLflow, Comet.

The run folder's JSONL files stay the source of truth; trackers get a copy, from rank 0 only:
every log record's numbers, the sample grids as images, the metric snapshots
(``metrics.jsonl``), and once at the start the resolved config as hyper-parameters together
with the run's identity (``run.name``, ``run.dir``, ``run.resume_step``, precision, backend,
processes). Accelerate's tracker API does the work (``Accelerator(log_with=...)``,
``init_trackers``, ``log``, ``get_tracker``); where it has no image call for a tracker
(MLflow, Comet) the grid's PNG file is logged as that tracker's artifact / image.

Where each tracker writes: TensorBoard to ``<run>/tb``; W&B under ``<run>/wandb`` (online,
or ``WANDB_MODE=offline``), as one W&B run per run folder across resumes; MLflow to
``MLFLOW_TRACKING_URI`` (default ``./mlruns``), one MLflow run per launch tagged with the run
folder; Comet as its own config says. The project (W&B, Comet) is ``stackgan`` unless
``WANDB_PROJECT`` names another; MLflow's experiment likewise, or ``MLFLOW_EXPERIMENT_NAME``.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any

from .config import REPORT_TO, Config, ConfigError, flat_keys, to_dict

PROJECT = "stackgan"
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}


def requested(report_to: str) -> list[str]:
    """``train.report_to`` as tracker names (``all``: every supported one that is installed)."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names == ["none"] or not names:
        return []
    if "all" in names:
        return [n for n in REPORT_TO if n in PACKAGES and importlib.util.find_spec(PACKAGES[n]) is not None]
    for n in names:
        if importlib.util.find_spec(PACKAGES[n]) is None:
            raise ConfigError(f"train.report_to={report_to}: the {n} package is not installed "
                              f"(pip install {n}, or the extra: pip install 'stackgan-hpc[trackers]')")
    return names


def tensorboard_without_tensorflow() -> None:
    """Make TensorBoard write its event files with its own TF-free I/O even where TensorFlow is
    installed. TensorBoard imports TensorFlow only for ``tf.io.gfile``, which costs 7-9 s per
    training process here and nothing a local run folder needs; the marker module
    ``tensorboard.compat.notf`` is TensorBoard's own switch to its stub."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def tracker_setup(cfg: Config) -> tuple[list | None, str | None]:
    """``log_with`` and ``project_dir`` for the run's ``Accelerator``. TensorBoard is handed over
    built, so that it writes to ``<run>/tb`` (Accelerate's would write to ``<run>/<project>``)."""
    names = requested(cfg.train.report_to)
    if not names:
        return None, None
    if "tensorboard" in names:
        tensorboard_without_tensorflow()
    from accelerate.tracking import TensorBoardTracker  # import cost

    log_with: list[Any] = [TensorBoardTracker("tb", cfg.train.run_dir) if n == "tensorboard" else n
                           for n in names]
    return log_with, cfg.train.run_dir


def _numbers(rec: dict) -> dict:
    return {k: v for k, v in rec.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}


class Trackers:
    """The run's trackers, started on rank 0 (``accelerator.trackers`` is empty elsewhere)."""

    def __init__(self, accelerator, cfg: Config, *, resume_step: int, identity: dict):
        self.acc = accelerator
        run_dir = Path(cfg.train.run_dir).resolve()
        name = run_dir.name
        hparams = {**flat_keys(to_dict(cfg)), "run.name": name, "run.dir": str(run_dir),
                   "run.resume_step": resume_step, **{f"run.{k}": v for k, v in identity.items()}}
        run_id = hashlib.sha256(str(run_dir).encode()).hexdigest()[:16]  # one W&B run per run folder
        init_kwargs = {
            "wandb": {"name": name, "dir": str(run_dir), "id": run_id, "resume": "allow"},
            "mlflow": {"run_name": name, "tags": {"stackgan.run_dir": str(run_dir),
                                                  "stackgan.resume_step": str(resume_step)}},
        }
        project = os.environ.get("WANDB_PROJECT") or PROJECT
        self.acc.init_trackers(project, config=hparams, init_kwargs=init_kwargs)
        self.metrics_offset = 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.acc.trackers]

    def log(self, rec: dict) -> None:
        """A JSONL record's numbers at its step."""
        values = _numbers(rec)
        if values and self.acc.trackers:
            self.acc.log(values, step=int(rec["step"]))

    def log_image(self, key: str, png: Path, step: int) -> None:
        """A PNG written to the run folder (a sample grid), as each tracker takes images."""
        if not self.acc.trackers:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            arr = np.asarray(im.convert("RGB"))
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({key: arr[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({key: [arr]}, step=step)
            elif tracker.name == "mlflow":
                tracker.log_artifact(str(png), artifact_path=key)
            elif tracker.name == "comet_ml":
                tracker.tracker.log_image(str(png), name=f"{key}/{png.name}", step=step)

    def mirror_metrics(self, path: Path) -> None:
        """Log the metric snapshots appended to ``metrics.jsonl`` since the last call, as
        ``metrics/<metric>/<key>`` at their steps."""
        if not self.acc.trackers or not path.exists():
            return
        with open(path) as f:
            f.seek(self.metrics_offset)
            lines = f.read()
            self.metrics_offset = f.tell()
        for line in lines.splitlines():
            if line.strip():
                rec = json.loads(line)
                values = {f"metrics/{rec['metric']}/{k}": v for k, v in _numbers(rec).items()
                          if k != "seconds"}
                if values:
                    self.acc.log(values, step=int(rec["step"]))

    def skip_existing_metrics(self, path: Path) -> None:
        """A resumed run: the snapshots already in ``metrics.jsonl`` were logged by the earlier launch."""
        if path.exists():
            self.metrics_offset = path.stat().st_size

    def close(self) -> None:
        """Finish every tracker; one that fails to (a lost connection) is reported, not raised,
        so that it never hides why the run ended."""
        for tracker in self.acc.trackers:
            try:
                tracker.finish()
            except Exception as e:  # noqa: BLE001  (any tracker's own error)
                warnings.warn(f"train.report_to: {tracker.name} did not finish cleanly: {e}")
        self.acc.trackers.clear()
