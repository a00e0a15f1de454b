"""The judge's ceiling (stackgan.metrics.judge_ceiling): the caption-faithful draw, its
stated-part mapping against judge consistency's own rule, the shard image path, the
scoring rule, and the command line (refusals with exit 2; an end-to-end run on the tiny
embedded shards with a small untrained judge)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from dataclasses import asdict

import numpy as np
import pytest
import torch

from stackgan.data import birds, cub
from stackgan.data.meta import ShardMeta, SplitInfo, load_metadata, write_metadata
from stackgan.data.prepare import jpeg_bytes
from stackgan.data.captions import caption_groups, caption_scope, stated_mask
from stackgan.metrics.evalset import center_crop, decode_image, is_holdout, load_split
from stackgan.metrics import redraw as R
from stackgan.metrics.judges import Judge, JudgeNet, group_hits
from stackgan.studies import judge_ceiling as JC

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = birds.ATTRIBUTE_NAMES


def _stated_groups(caption: str) -> set[str]:
    mask = stated_mask(caption, caption_groups(NAMES), len(NAMES))
    return {NAMES[i].split("::")[0] for i in np.nonzero(mask)[0]}


def test_template_parts_of_known_templates():
    cases = {
        "the crown is {crown_c} and the wings are {wing_c}.": {"crown", "wing"},
        "{size_a} bird with {crown} and {bill}.": {"size", "crown", "bill_color", "bill_shape",
                                                   "bill_length"},
        "this bird has {crown}, {wings} and {belly}.": {"crown", "wing", "wing_pattern", "belly"},
        "the belly is {belly_c}, the back is {back_c} and the tail is {tail_c}.": {"belly", "back", "tail"},
        "this {size} bird has {back}, {wings} and {tail}.": {"size", "back", "wing", "wing_pattern", "tail"},
    }
    for t, parts in cases.items():
        assert t in birds.TEMPLATES
        assert JC.template_parts(t) == parts
    for t in birds.TEMPLATES:  # a new template field must be mapped (KeyError otherwise)
        assert 2 <= len(JC.template_parts(t)) and JC.template_parts(t) <= JC.PART_GROUP.keys()


def test_template_parts_agree_with_judge_consistency_rule():
    """Rendered captions state (stated_mask) exactly the groups of the template's parts,
    except the two the wording may leave implicit: a solid wing pattern and a dagger bill's
    length (no word for 'about the head's length')."""
    rng = np.random.default_rng(1)
    for t in birds.TEMPLATES:
        want = {JC.PART_GROUP[p] for p in JC.template_parts(t)}
        for _ in range(30):
            a = JC.random_parts(rng)
            got = _stated_groups(birds.fill_caption(t, a, rng))
            assert got <= want, (t, a, got)
            implicit = ({"has_wing_pattern"} if a["wing_pattern"] == "solid" else set()) | \
                ({"has_bill_length"} if a["bill_shape"] == "dagger" else set())
            assert want - got <= implicit, (t, a, want - got)


def test_random_parts_keeps_stated_values_and_respects_constraints():
    rng = np.random.default_rng(2)
    train = birds.make_species(30, 0)
    backs = set()
    for i in range(300):
        sp = birds.image_attributes(train[i % 30], i % 7 == 0)
        keep = {p: sp[p] for p in JC.template_parts(birds.TEMPLATES[i % len(birds.TEMPLATES)])}
        a = JC.random_parts(rng, keep)
        assert all(a[p] == v for p, v in keep.items()), (keep, a)
        assert a["back"] not in (a["crown"], a["wing"], a["belly"])
        assert a["bill_length"] == birds.BILL_LENGTH[a["bill_shape"]]
        assert set(a) == set(sp) and a["size"] in birds.SIZES and a["wing_pattern"] in birds.WING_PATTERNS
        assert all(a[p] in birds.COLORS for p in ("crown", "back", "wing", "belly", "tail"))
        assert a["bill_color"] in birds.BILL_COLORS
        if "back" not in keep:
            backs.add(a["back"])
    assert len(backs) >= 5  # unstated parts are really drawn at random


def test_draw_conditions_labels_and_determinism():
    sps = birds.make_species(12, 0)
    train, test = sps[:9], sps[9:]
    c = JC.draw_conditions(train, test, 40, seed=3)
    assert list(c) == list(JC.CONDITIONS)
    vec = birds.attribute_vector
    own = {tuple(vec(birds.image_attributes(s, m))) for s in train for m in (False, True)}
    for a, lab in zip(*c["species"]):
        assert tuple(lab) == tuple(vec(a)) and tuple(lab) in own
    unseen = [birds.image_attributes(s, m) for s in test for m in (False, True)]
    for a, lab in zip(*c["test_species"]):
        assert a in unseen and tuple(lab) == tuple(vec(a))
    differs = 0
    for a, lab in zip(*c["caption_faithful"]):
        assert lab.sum() >= 1 and np.all(lab <= vec(a))  # scored: stated groups, with the drawn values
        assert any(np.all(lab <= np.array(o)) for o in own)  # ... which are a training image's
        differs += tuple(vec(a)) not in own
    assert differs >= 30  # the unstated parts are not the species'
    for a, lab in zip(*c["random"]):
        assert tuple(lab) == tuple(vec(a))
    again = JC.draw_conditions(train, test, 40, seed=3)
    other = JC.draw_conditions(train, test, 40, seed=4)
    for k in JC.CONDITIONS:
        assert again[k][0] == c[k][0] and np.array_equal(again[k][1], c[k][1])
    assert other["caption_faithful"][0] != c["caption_faithful"][0]
    assert "test_species" not in JC.draw_conditions(train, [], 2, seed=0)


def test_shard_view_is_the_shards_image(tmp_path):
    """The redraw path gives the pixels the judge reads from a prepared shard: the image
    birds._render_species writes, cropped and encoded as prepare does, decoded as evalset does."""
    sp = birds.make_species(3, 0)[2]
    recs = birds._render_species((asdict(sp), 2, 0, 1, str(tmp_path)))
    for j, r in enumerate(recs):
        path = tmp_path / f"{r['key']}.jpg"
        shard = decode_image(jpeg_bytes(cub.crop_resize(cub.load_rgb(path), r["bbox"], (76,))[0], 90), 76, 64)
        img, bbox = birds.draw_bird(r["attrs"], np.random.default_rng([0, sp.class_id, j, 0x1A6]))
        assert tuple(bbox) == tuple(r["bbox"])
        assert np.array_equal(center_crop(R.shard_view(img, bbox)[None], 64)[0], shard)
    x = JC.render([r["attrs"] for r in recs], seed=0)
    assert x.shape == (2, 64, 64, 3) and x.dtype == np.uint8
    assert np.array_equal(x, JC.render([r["attrs"] for r in recs], seed=0))


class _FixedJudge:
    """Returns given logits in order (a stand-in judge for the scoring arithmetic)."""

    def __init__(self, logits, groups):
        self.logits, self.groups, self.i = logits, groups, 0

    def __call__(self, x):
        out = self.logits[self.i:self.i + len(x)]
        self.i += len(x)
        return out, None

    def group_hits(self, logits, attrs):
        return group_hits(logits, torch.as_tensor(np.asarray(attrs)), self.groups)


def test_score_is_mean_per_image_share():
    groups = [[0, 1], [2, 3], [4, 5]]
    labels = np.array([[1, 0, 1, 0, 0, 0],  # states groups 0, 1; judge sees 0 only -> 0.5
                       [0, 1, 0, 0, 0, 1],  # states groups 0, 2; judge sees both -> 1.0
                       [1, 0, 0, 1, 1, 0]], np.uint8)  # states all; sees 0 -> 1/3
    logits = torch.tensor([[1., 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 1], [1, 0, 1, 0, 0, 1]])
    overall, per = JC.score(_FixedJudge(logits, groups), np.zeros((3, 64, 64, 3), np.uint8), labels, batch=2)
    assert overall == pytest.approx((0.5 + 1 + 1 / 3) / 3)
    assert per == pytest.approx([1.0, 0.0, 0.5])
    _, per = JC.score(_FixedJudge(logits[:1], groups), np.zeros((1, 64, 64, 3), np.uint8), labels[:1])
    assert per[2] is None  # a group no image states


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def _metadata(root, source) -> None:
    species, test = 6, birds.test_classes_for(6, 0)
    splits = {"train": SplitInfo(30, [c for c in range(1, species + 1) if c not in test]),
              "test": SplitInfo(10, sorted(test))}
    names = {s.class_id: s.name for s in birds.make_species(species, 0)}
    root.mkdir(parents=True, exist_ok=True)
    write_metadata(ShardMeta(root, "x", 4, [76], 10, splits, names, list(NAMES), source))


def _judge(path) -> None:
    by: OrderedDict[str, list[int]] = OrderedDict()
    for i, n in enumerate(NAMES):
        by.setdefault(n.split("::")[0], []).append(i)
    torch.manual_seed(0)
    judge = Judge(JudgeNet(len(NAMES), width=4), list(NAMES), list(by.values()), 10, torch.zeros(len(NAMES)))
    judge.save(path)


EMBEDDED = {"kind": "embedded", "jpeg_quality": 90, "generator": birds.GeneratorParams(6, 8, 0).to_json()}


def test_cli_end_to_end_small(tiny_shards, tmp_path, capsys):
    _judge(tmp_path / "j.pt")
    outs = []
    for k in range(2):
        assert JC.main(["--shards", str(tiny_shards), "--judge", str(tmp_path / "j.pt"), "--n", "6",
                        "--out", str(tmp_path / f"r{k}.json")]) == 0
        outs.append(json.loads((tmp_path / f"r{k}.json").read_text()))
    text = capsys.readouterr().out
    assert "caption_faithful" in text and "overall" in text and "caption_faithful / real_train" in text
    rep = outs[0]
    assert list(rep["conditions"]) == list(JC.CONDITIONS + JC.REAL)
    assert rep["n"] == 6 and rep["kind"] == "species"
    for v in rep["conditions"].values():
        assert 0 <= v["overall"] <= 1 and len(v["groups"]) == 10
    meta = load_metadata(tiny_shards)
    held_out = sum(is_holdout(k, 10) for k in load_split(meta, "train").keys)
    assert rep["conditions"]["real_train"]["n"] == held_out and rep["conditions"]["real_test"]["n"] == 12
    assert rep["conditions"] == outs[1]["conditions"]  # deterministic for a seed
    assert not list(tmp_path.glob(".*.tmp"))


def test_score_real_scores_each_caption_on_what_it_states(tiny_shards):
    """real_* = the mean over (image, caption) pairs of the share of the caption's stated
    groups the judge sees: with a judge that reads the true labels, exactly 1; with one that
    reads other labels, the share of the stated groups whose true value it still names."""
    meta = load_metadata(tiny_shards)
    data = load_split(meta, "test")
    by: OrderedDict[str, list[int]] = OrderedDict()
    for i, n in enumerate(NAMES):
        by.setdefault(n.split("::")[0], []).append(i)

    class LabelJudge:  # logits = the image's own labels (looked up by row order), or a fixed guess
        groups, holdout_mod = list(by.values()), 10

        def __init__(self, attrs):
            self.attrs, self.i = torch.as_tensor(attrs, dtype=torch.float32), 0

        def __call__(self, x):
            out = self.attrs[self.i:self.i + len(x)]
            self.i += len(x)
            return out, None

        def group_hits(self, logits, attrs):
            return group_hits(logits, torch.as_tensor(np.asarray(attrs)), self.groups)

    overall, per, n = JC.score_real(LabelJudge(data.attr), meta, "test")
    assert overall == 1.0 and n == len(data) and all(v in (None, 1.0) for v in per)
    wrong = np.roll(data.attr, 1, axis=0)
    overall, _, _ = JC.score_real(LabelJudge(wrong), meta, "test")
    scope = caption_scope(data.captions, NAMES)
    want, pairs = 0.0, 0
    for i in range(len(data)):
        for c in range(scope.shape[1]):
            stated = [g for g in by.values() if scope[i, c, g].any()]
            if stated:
                want += np.mean([wrong[i, g].argmax() == data.attr[i, g].argmax() for g in stated])
                pairs += 1
    assert overall == pytest.approx(want / pairs)


@pytest.mark.parametrize("source, message", [
    ({"kind": "cub"}, "not made by the embedded bird generator"),
    ({**EMBEDDED, "generator": {**EMBEDDED["generator"], "version": birds.GENERATOR_VERSION - 1}},
     "generator version"),
])
def test_cli_refuses_other_shards(tmp_path, capsys, source, message):
    _metadata(tmp_path / "s", source)
    _judge(tmp_path / "s" / "judge.pt")
    assert JC.main(["--shards", str(tmp_path / "s"), "--n", "2"]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_missing_judge_and_shards(tmp_path, capsys):
    _metadata(tmp_path / "s", EMBEDDED)
    assert JC.main(["--shards", str(tmp_path / "s"), "--n", "2"]) == 2
    assert "judge not found" in capsys.readouterr().err
    assert JC.main(["--shards", str(tmp_path / "nothing")]) == 2
    assert "not a prepared shard folder" in capsys.readouterr().err


def test_module_exit_code(tmp_path):
    """The command, and its old name (a deprecated alias that says so, then runs the same)."""
    _metadata(tmp_path / "s", {"kind": "cub"})
    old = "stackgan.metrics.judge_ceiling"
    old_note = f"note: `python -m {old}` is deprecated; use `python -m stackgan.studies"
    for module, note in (("stackgan.studies.judge_ceiling", ""), (old, old_note)):
        cmd = [sys.executable, "-m", module, "--shards", str(tmp_path / "s")]
        p = subprocess.run(cmd, capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.startswith(note) and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.removeprefix(p.stderr.split("\n")[0] + "\n" if note else "").startswith("error: ")
