"""The main job's own decisions (stackgan/demo.py): prompts in the set's vocabulary, the words a
prompt uses that no training caption did, and the precision it trains in."""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from stackgan import demo
from stackgan.data import birds


def embedded_vocabulary() -> set[str]:
    """Every word the embedded set's captions can use: captions of every colour, bill shape,
    wing pattern and size, each rendered with many random template choices."""
    words: set[str] = set()
    rng = np.random.default_rng(0)
    colours = list(birds.COLORS)
    for colour, shape, pattern, size in itertools.product(colours, birds.BILL_SHAPES, birds.WING_PATTERNS,
                                                          birds.SIZES):
        a = {"crown": colour, "back": colour, "wing": colour, "belly": colour, "tail": colour,
             "bill_color": birds.BILL_COLORS[len(words) % len(birds.BILL_COLORS)], "bill_shape": shape,
             "bill_length": birds.BILL_LENGTH[shape], "wing_pattern": pattern, "size": size}
        for caption in birds.caption_pool(a, rng, n=12):
            words.update(demo.WORD.findall(caption.lower()))
    return words


def test_the_demo_prompts_speak_the_sets_vocabulary():
    vocab = embedded_vocabulary()
    assert {"crown", "wings", "belly", "hooked", "conical", "striped"} <= vocab
    assert [p for p in demo.prompt_coverage(demo.PROMPTS, vocab) if p["unseen_words"]] == []
    # what the earlier prompts said and no caption does
    old = ["this bird is mostly green with a grey belly and a long tail",
           "a large bird with a white head, brown wings and an orange beak"]
    assert [p["unseen_words"] for p in demo.prompt_coverage(old, vocab)] == [["mostly"], ["head"]]


def test_training_words_are_the_training_captions_words(tiny_shards):
    words = demo.training_words(tiny_shards)
    captions = []
    for shard in sorted(tiny_shards.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".txt.json"):
                    captions += json.loads(tar.extractfile(m).read())
    assert captions and words == {w for c in captions for w in demo.WORD.findall(c.lower())}
    seen = captions[0]
    assert demo.prompt_coverage([seen, seen + " mostly zebra-striped"], words) == [
        {"prompt": seen, "unseen_words": []},
        {"prompt": seen + " mostly zebra-striped", "unseen_words": ["mostly", "zebra-striped"]}]


@pytest.mark.parametrize("asked,cuda,cpu_bf16,expected", [
    ("auto", False, True, "bf16"),  # a CPU with bf16 units: bf16 autocast
    ("auto", False, False, "auto"),  # none: the configs' choice (fp32 on a CPU)
    ("auto", True, True, "auto"),  # a GPU trains: the configs' choice
    ("fp32", False, True, "no"),
    ("bf16", False, False, "bf16"),
])
def test_demo_precision(asked, cuda, cpu_bf16, expected):
    assert demo.demo_precision(asked, cuda, cpu_bf16) == expected


def test_quick_runs_keep_out_of_the_full_jobs_folders():
    """``--quick`` draws a smaller set: in the default folders it would make the full job's next
    run find a set of other parameters (refused), so it uses folders of its own unless told."""
    full, quick = demo.parse_args([]), demo.parse_args(["--quick"])
    assert (full.data, full.shards, full.out) == ("data/birds-embedded", "shards/birds-embedded", "runs/demo")
    assert (full.species, full.images_per_species) == (birds.DEFAULT_SPECIES, birds.DEFAULT_IMAGES)
    assert {quick.data, quick.shards, quick.out}.isdisjoint({full.data, full.shards, full.out})
    assert quick.species < full.species
    mine = demo.parse_args(["--quick", "--data", "d", "--shards", "s", "--out", "o"])
    assert (mine.data, mine.shards, mine.out) == ("d", "s", "o")


def test_background_steps_run_in_order_each_on_one_thread(tmp_path):
    """The measuring nets train beside stage I on the core its training leaves idle: the steps run
    one after another, each told to use one thread, with their output in their own logs."""
    trace = tmp_path / "trace.txt"
    write = ("import os, sys; open({!r}, 'a').write(sys.argv[1] + ' ' + os.environ['OMP_NUM_THREADS']"
             " + '\\n'); print('hello from', sys.argv[1])")
    steps = [(n, [sys.executable, "-c", write.format(str(trace)), n]) for n in ("first", "second")]
    seconds = demo.Background(steps, tmp_path).wait()
    assert list(seconds) == ["first", "second"]
    assert trace.read_text().split("\n")[:2] == ["first 1", "second 1"]
    assert "hello from second" in (tmp_path / "second.log").read_text()


def test_a_failed_background_step_stops_the_demo_naming_its_log(tmp_path):
    steps = [("broken", [sys.executable, "-c", "raise SystemExit(3)"]),
             ("never", [sys.executable, "-c", f"open({str(tmp_path / 'ran')!r}, 'w')"])]
    with pytest.raises(SystemExit, match=r"'broken' failed with exit status 3 .*broken\.log"):
        demo.Background(steps, tmp_path).wait()
    assert not (tmp_path / "ran").exists()


def test_measuring_nets_train_in_the_background_only_where_not_cached(tiny_shards, tmp_path):
    """The background trains the files the evaluator reads (the shard folder's judge and detail
    net) and leaves cached ones alone."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    for name in ("judge-parts.pt", "judge.pt", "detail256.pt"):
        (shards / name).unlink(missing_ok=True)
    steps = dict(demo.measuring_net_steps(str(shards)))
    assert set(steps) == {"judge", "detail-net"}
    outs = {name: Path(args[args.index("--out") + 1]) for name, args in steps.items()}
    assert outs == {"judge": shards / "judge-parts.pt", "detail-net": shards / "detail256.pt"}
    outs["judge"].write_bytes(b"cached")
    assert [name for name, _ in demo.measuring_net_steps(str(shards))] == ["detail-net"]


@pytest.mark.slow
def test_the_quick_main_job_runs_end_to_end_with_its_nets_trained_in_the_background(tmp_path):
    """``python -m stackgan.demo --quick`` as a user runs it (2-3 minutes on 2 cores): every step,
    the measuring nets trained beside stage I (the evaluator finds them and trains none), and a
    summary with both stages' scores, the stage-II table and the sampled grid."""
    out, data, shards = tmp_path / "runs", tmp_path / "data", tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "stackgan.demo", "--quick", "--out", str(out),
                           "--data", str(data), "--shards", str(shards)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = out / "logs"
    assert "judge written to" in (logs / "judge.log").read_text()
    assert "detail net written to" in (logs / "detail-net.log").read_text()
    for name in ("eval-stage1", "eval-stage2"):
        assert "training one" not in (logs / f"{name}.log").read_text(), name
    summary = json.loads((out / "summary.json").read_text())
    assert {"judge (background)", "detail-net (background)", "eval-stage1 (background)", "stage1", "stage2",
            "eval-stage2", "sample"} <= set(summary["timings_s"])
    for stage in ("stage1", "stage2"):
        assert 0 <= summary["metrics"][stage]["judge_consistency"]["train"] <= 1
    assert [r["what"] for r in summary["stage2_vs_baseline"]][:2] == ["consistency, training captions",
                                                                      "consistency, unseen test species"]
    assert (out / "samples-from-text" / "grid.png").is_file()
