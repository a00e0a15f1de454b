"""Experiment trackers (``train.report_to``) for real: a tiny run logs to TensorBoard, W&B
(offline) and MLflow (a local sqlite store) at once, is resumed once, and what each tracker
stored is read back with that tool's own reader and compared with the run's JSONL logs."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import sys
from pathlib import Path

import pytest

from stackgan.config import ConfigError, load_config

from .conftest import ROOT, run_cmd
from .test_train import TINY, log_records

HAVE = {n: importlib.util.find_spec(n) is not None for n in ("wandb", "mlflow", "comet_ml")}
NEEDS = "pip install -e '.[trackers]'"
STEPS, MORE = 4, 6  # the first launch, then resumed to MORE
TF_IMPORTED = "tensorflow-imported"


@pytest.fixture(scope="module")
def tracked(tiny_shards, tmp_path_factory) -> Path:
    """One run folder trained to STEPS, then resumed to MORE, with every installed tracker. A
    stand-in ``tensorflow`` package first on the path notes any import of it (then fails it, as
    where TensorFlow is not installed)."""
    work = tmp_path_factory.mktemp("tracked")
    run = work / "run"
    fake = work / "fake-tf" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        f"open({str(work / TF_IMPORTED)!r}, 'a').write('imported')\nraise ImportError('stand-in')\n")
    report = ",".join(["tensorboard", *(n for n in ("wandb", "mlflow") if HAVE[n])])
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    for steps in (STEPS, MORE):
        args = [sys.executable, "-m", "stackgan.train", "--config", str(ROOT / "configs/birds_stage1.yaml"),
                f"data.shards={tiny_shards}", f"train.run_dir={run}", *TINY, f"train.steps={steps}",
                "train.log_every=2", "train.sample_every=2", "train.ckpt_every=2", "train.metrics=diversity",
                "train.metrics_every=2", f"train.report_to={report}"]
        p = run_cmd(args, env=env, cwd=work, timeout=600)  # MLflow puts artifacts under the working folder
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return run


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss_d"] for r in log_records(run) if "loss_d" in r}


def _metric_scores(run: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["score"] for r in recs if r["metric"] == "diversity"}


def test_the_start_record_names_the_trackers_and_the_resume_step(tracked):
    starts = [r for r in log_records(tracked) if r.get("event") == "start"]
    assert [r["step"] for r in starts] == [0, STEPS]
    assert starts[1]["resumed_from"].endswith(f"step-{STEPS:08d}")
    assert "tensorboard" in starts[0]["trackers"] and starts[0]["precision"] == "no"
    assert set(_metric_scores(tracked)) == {2, 4, 6}


def test_tensorboard_has_the_scalars_an_image_and_the_config(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, {}
    for events in (tracked / "tb").glob("events.out.tfevents.*"):  # one file per launch
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        if "loss_d" in acc.Tags()["scalars"]:
            scalars.update({e.step: e.value for e in acc.Scalars("loss_d")})
        if "samples" in acc.Tags()["images"]:
            images.update({e.step: (e.width, e.height) for e in acc.Images("samples")})
    assert scalars == pytest.approx(_losses(tracked), rel=1e-6)
    assert sorted(images) == [2, 4, 6] and all(w > 64 and h > 64 for w, h in images.values())
    hparams = sorted((tracked / "tb").glob("*/hparams.yml"))
    assert hparams and "optim.lr_g: 0.0005" in hparams[0].read_text()


def test_tensorboard_writes_without_importing_tensorflow(tracked):
    """Where TensorFlow is installed TensorBoard would import it (7-9 s per process) for file I/O
    a local run folder does not need: the trainer switches TensorBoard to its own I/O."""
    assert list((tracked / "tb").glob("events.out.tfevents.*"))
    assert not (tracked.parent / TF_IMPORTED).exists(), "TensorFlow was imported by a training process"


def _wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file, parsed with wandb's own message classes.
    The file is a LevelDB-style log: a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks,
    each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


@pytest.mark.skipif(not HAVE["wandb"], reason=f"wandb not installed ({NEEDS})")
def test_wandb_offline_run_holds_scalars_images_metrics_and_config(tracked):
    files = sorted((tracked / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2, files  # one per launch, the same W&B run id (resumed)
    history, config, ids = {}, [], set()
    for f in files:
        for rec in _wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
                assert rec.run.display_name == tracked.name and rec.run.project == "stackgan"
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                history.setdefault(row["_step"], {}).update(row)
            elif kind == "config":
                config.append({u.key: json.loads(u.value_json) for u in rec.config.update})
    assert len(ids) == 1
    losses = {s: row["loss_d"] for s, row in history.items() if "loss_d" in row}
    assert losses == pytest.approx(_losses(tracked), rel=1e-6)
    key = "metrics/diversity/score"
    scores = {s: row[key] for s, row in history.items() if key in row}
    assert scores == pytest.approx(_metric_scores(tracked), rel=1e-6)
    grids = {s: row["samples/filenames"][0] for s, row in history.items() if "samples/filenames" in row}
    assert sorted(grids) == [2, 4, 6]
    assert all((f.parent / "files" / grids[2]).is_file() for f in files[:1])
    assert [c["run.resume_step"] for c in config] == [0, STEPS]
    assert config[0]["optim.lr_g"] == 5e-4 and config[0]["run.name"] == tracked.name


@pytest.mark.skipif(not HAVE["mlflow"], reason=f"mlflow not installed ({NEEDS})")
def test_mlflow_store_holds_scalars_images_metrics_and_params(tracked):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked.parent}/mlflow.db")
    exp = client.get_experiment_by_name("stackgan")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # one MLflow run per launch, tagged with the run folder
    assert {r.data.tags["stackgan.run_dir"] for r in runs} == {str(tracked.resolve())}
    assert [r.data.params["run.resume_step"] for r in runs] == ["0", str(STEPS)]
    assert runs[0].data.params["optim.lr_g"] == "0.0005" and runs[0].info.run_name == tracked.name
    losses, scores, grids = {}, {}, []
    for r in runs:
        losses.update({m.step: m.value for m in client.get_metric_history(r.info.run_id, "loss_d")})
        history = client.get_metric_history(r.info.run_id, "metrics/diversity/score")
        scores.update({m.step: m.value for m in history})
        grids += [a.path for a in client.list_artifacts(r.info.run_id, "samples")]
    assert losses == pytest.approx(_losses(tracked), rel=1e-6)
    assert scores == pytest.approx(_metric_scores(tracked), rel=1e-6)
    assert sorted(grids) == [f"samples/step-{s:08d}.png" for s in (2, 4, 6)]
    local = client.download_artifacts(runs[0].info.run_id, grids[0], str(tracked.parent))
    assert Path(local).read_bytes() == (tracked / grids[0]).read_bytes()


def test_report_to_is_checked_before_any_work(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, ["train.report_to=tensorbord"])
    with pytest.raises(ConfigError, match="train.report_to"):
        load_config(None, ["train.report_to=all,wandb"])
    missing = next((n for n, have in HAVE.items() if not have), None)
    if missing is None:
        pytest.skip("every tracker package is installed here")
    run = tmp_path / "run"
    p = run_cmd([sys.executable, "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
                 f"data.shards={tiny_shards}", f"train.run_dir={run}", *TINY, "train.steps=1",
                 f"train.report_to={missing}"])
    assert p.returncode == 2 and f"the {missing} package is not installed" in p.stderr, p.stderr[-2000:]
    assert not (run / "log.jsonl").exists()


def test_report_to_none_keeps_the_jsonl_logs_only(tiny_shards, tmp_path):
    run = tmp_path / "run"
    p = run_cmd([sys.executable, "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml",
                 f"data.shards={tiny_shards}", f"train.run_dir={run}", *TINY, "train.steps=2",
                 "train.report_to=none"], env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert not (run / "tb").exists() and _losses(run)
    assert [r["trackers"] for r in log_records(run) if r.get("event") == "start"] == [[]]
