"""The figure command: one PNG per run (a judge panel when the run scored metrics), a
comparison PNG, a clear refusal of a folder that is not a run."""
from __future__ import annotations

import json

from PIL import Image

from stackgan import plots


def _run(tmp_path, name, judge: bool):
    d = tmp_path / name
    d.mkdir()
    rows = [{"step": s, "img_per_s": 50.0, "loss_d": 1.0 / s, "loss_g": 2.0, "d_real": 0.6, "d_wrong": 0.4,
             "d_fake": 0.3} for s in (50, 100, 150)]
    rows.append({"step": 100, "diversity": 0.3, "grad_norm_d": 2.0, "grad_norm_g": 3.0})
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if judge:
        m = [{"metric": "judge_consistency", "step": s, "train": 0.2 + s / 1000, "test": 0.2, "real_train": 0.9,
              "real_test": 0.6, "shuffled_train": 0.16, "shuffled_test": 0.17} for s in (100, 150)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in m))
    return d


def test_plots_per_run_and_comparison(tmp_path, capsys):
    a, b = _run(tmp_path, "a", judge=True), _run(tmp_path, "b", judge=False)
    out = tmp_path / "fig"
    assert plots.main([str(a), str(b), "--out", str(out), "--compare", "cmp"]) == 0
    wa, wb = Image.open(out / "a.png").size[0], Image.open(out / "b.png").size[0]
    assert wa > wb  # the run with metrics has the extra judge panel
    assert Image.open(out / "cmp.png").size[0] > 0


def test_plots_refuse_a_folder_without_a_log(tmp_path, capsys):
    assert plots.main([str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
