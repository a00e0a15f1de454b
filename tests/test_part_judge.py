"""The part-wise judge: it reads the parts a bird shows, not its species; how it is chosen,
stored, refused; the redraw path it learns from.

One small judge is trained per module through the command line on the tiny embedded shard
set (conftest's ``tiny_shards``): a few hundred renderer birds and a hundred-odd steps, far
from the real judge's budget but enough to tell a drawn caption from a contradicted one."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from stackgan.data import birds
from stackgan.data.meta import load_metadata
from stackgan.metrics import EvalContext, MetricError
from stackgan.metrics import judges as J
from stackgan.metrics import redraw as R
from stackgan.data.captions import caption_groups, stated_mask
from stackgan.metrics.judges.parts import PartJudgeNet
from stackgan.studies import judge_ceiling as JC

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = birds.ATTRIBUTE_NAMES
STEPS = 320
VALUES = {**{p: list(birds.COLORS) for p in ("crown", "back", "wing", "belly", "tail")},
          "bill_color": birds.BILL_COLORS, "bill_shape": birds.BILL_SHAPES,
          "wing_pattern": birds.WING_PATTERNS, "size": list(birds.SIZES)}


@pytest.fixture(scope="module")
def part_judge(tiny_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("partjudge") / "judge-parts.pt"
    rc = J.main(["train", "--shards", str(tiny_shards), "--kind", "parts", "--out", str(out),
                 "--images", "1600", "--val-images", "300", "--steps", str(STEPS), "--batch-size", "32",
                 "--lr", "3e-3", "--workers", "1", "--threads", "1"])
    assert rc == 0
    return out


def _swapped(a: dict, parts: set[str], rng: np.random.Generator) -> dict:
    """Random parts, except that every part in ``parts`` gets a value other than ``a``'s."""
    while True:
        keep = {p: rng.choice([v for v in VALUES[p] if v != a[p]]) for p in parts if p in VALUES}
        keep = {p: str(v) for p, v in keep.items()}
        if keep.get("back") is None or keep["back"] not in {keep.get(p) for p in ("crown", "wing", "belly")}:
            return R.random_parts(rng, keep)


def _caption_triplets(species: list[birds.Species], n: int, seed: int):
    """Per caption of a species image: the species' bird, the caption's parts with the rest
    at random, and the caption's parts contradicted; labels = the caption's stated groups."""
    rng = np.random.default_rng(seed)
    groups = caption_groups(NAMES)
    drawn = {"species": [], "faithful": [], "swapped": []}
    labels = []
    for _ in range(n):
        sp = species[int(rng.integers(len(species)))]
        a = birds.image_attributes(sp, bool(rng.random() < birds.MORPH_PROB))
        template = birds.TEMPLATES[int(rng.integers(len(birds.TEMPLATES)))]
        parts = JC.template_parts(template)
        caption = birds.fill_caption(template, a, rng)
        labels.append(birds.attribute_vector(a) * stated_mask(caption, groups, len(NAMES)))
        drawn["species"].append(a)
        drawn["faithful"].append(R.random_parts(rng, {p: a[p] for p in parts}))
        drawn["swapped"].append(_swapped(a, parts, rng))
    return drawn, np.stack(labels).astype(np.uint8)


def test_judge_reads_the_captions_parts_not_the_species(part_judge, tiny_shards):
    """A bird drawn with what its caption states scores as high as the species' own bird and
    far above one whose stated parts are contradicted, for species it has never seen (the
    renderer's species of another seed) and whatever the unstated parts are."""
    judge = J.load_judge(part_judge, attributes=NAMES)
    assert judge.kind == "parts" and judge.report.steps == STEPS
    species = birds.make_species(60, seed=11)  # not the tiny set's species: the judge never saw any
    scores = {}
    for half, sps in (("a", species[:30]), ("b", species[30:])):
        drawn, labels = _caption_triplets(sps, 40, seed=len(half))
        for cond, attrs in drawn.items():
            images = R.render(attrs, seed=5, stream=list(drawn).index(cond))
            scores[half, cond] = JC.score(judge, images, labels)[0]
    for half in ("a", "b"):
        assert scores[half, "faithful"] - scores[half, "swapped"] > 0.4, scores
        assert abs(scores[half, "faithful"] - scores[half, "species"]) < 0.12, scores  # no species cue
    assert abs(scores["a", "faithful"] - scores["b", "faithful"]) < 0.12, scores


def test_report_and_show(part_judge, tiny_shards, capsys):
    judge = J.load_judge(part_judge)
    r = judge.report
    assert judge.trained_on == R.embedded_renderer(load_metadata(tiny_shards)).identity()
    assert r.n_render == 1600 and r.n_val == 300 and r.real_shards == str(tiny_shards)
    groups = J.group_names(NAMES, judge.groups)
    assert set(r.per_group_val) <= {g for g in (n.split("::")[0] for n in NAMES)}
    assert set(groups) == set(r.per_group_val) - set(r.dropped_groups)
    for g in ("has_belly_color", "has_back_color", "has_upper_tail_color"):  # large parts: learnt first
        assert r.per_group_val[g] > 0.6 and r.per_group_real_train[g] > 0.5, r
    assert r.val > r.majority_val + 0.2 and r.real_test > r.shuffled_real_test + 0.15, r
    assert J.main(["show", str(part_judge)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "parts" and shown["steps"] == STEPS


def test_choose_judge_by_name_or_file(tiny_shards, tmp_path):
    meta = load_metadata(tiny_shards)
    assert J.default_kind(meta) == "parts"
    assert J.choose_judge(tiny_shards, "", meta) == J.JudgeChoice("parts", tiny_shards / "judge-parts.pt",
                                                                   True)
    assert J.choose_judge(tiny_shards, "species", meta).path == tiny_shards / "judge.pt"
    own_file = J.choose_judge(tiny_shards, str(tmp_path / "j.pt"), meta)
    assert own_file == J.JudgeChoice("parts", tmp_path / "j.pt", False)
    from tests.test_judge import write_eval_shards  # shards of no renderer: species only

    other = write_eval_shards(tmp_path / "other", per_train=1, per_test=1)
    assert J.choose_judge(other).kind == "species"
    with pytest.raises(J.JudgeError, match="not drawn by it.*--judge species"):
        J.choose_judge(other, "parts")
    ctx = EvalContext(shards=str(other), image_size=64, z_dim=4, text_encoder="onehot-test", text_dim=16,
                      judge="parts")
    with pytest.raises(MetricError, match="part-wise judge"):
        ctx.check({"attributes"})


def test_ensure_judge_loads_the_named_kind_and_refuses_others(part_judge, tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    shutil.copy(part_judge, shards / "judge-parts.pt")
    meta = load_metadata(shards)

    def ctx(judge: str) -> EvalContext:
        return EvalContext(shards=str(shards), image_size=64, z_dim=4, text_encoder=meta.encoder,
                           text_dim=meta.text_dim, judge=judge, log=lambda m: None)

    assert J.ensure_judge(ctx("")).kind == "parts"  # the embedded set's default, from its default file
    assert J.ensure_judge(ctx(str(part_judge))).kind == "parts"
    shutil.copy(part_judge, shards / "judge.pt")  # a part judge where the species judge belongs
    with pytest.raises(MetricError, match="holds a parts judge, not the species judge"):
        J.ensure_judge(ctx("species"))
    j = J.load_judge(part_judge)
    j.trained_on = {**j.trained_on, "jpeg_quality": 75}
    j.save(tmp_path / "other-renderer.pt")
    with pytest.raises(MetricError, match="trained on renderer"):
        J.ensure_judge(ctx(str(tmp_path / "other-renderer.pt")))


def test_net_has_one_head_per_group():
    groups = J.attribute_groups(NAMES, np.eye(len(NAMES)))
    torch.manual_seed(0)
    net = PartJudgeNet(len(NAMES), groups, width=4).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    before, feats = net(x)
    assert before.shape == (3, len(NAMES)) and feats.shape == (3, net.feature_dim)
    crown = [i for i, n in enumerate(NAMES) if n.startswith("has_crown_color")]
    g = groups.index(crown)
    with torch.no_grad():  # another classifier for the crown head: only the crown's logits move
        net.what[g].add_(1.0)
    after, _ = net(x)
    moved = (after - before).abs().amax(0) > 1e-6
    assert moved[crown].all() and moved.sum() == len(crown)
    cfg = net.config()
    again = PartJudgeNet(**cfg)
    again.load_state_dict(net.state_dict())
    assert torch.equal(again.eval()(x)[0], after)


def test_render_random_is_deterministic_and_worker_independent():
    one, lab1 = R.render_random(6, seed=3, workers=1, chunk=2)
    two, lab2 = R.render_random(6, seed=3, workers=2, chunk=2)
    assert one.shape == (6, 76, 76, 3) and one.dtype == np.uint8
    assert np.array_equal(one, two) and np.array_equal(lab1, lab2)
    per_group = [lab1[:, [i for i, n in enumerate(NAMES) if n.startswith(g + "::")]].sum(1)
                 for g in dict.fromkeys(n.split("::")[0] for n in NAMES)]
    assert all((s == 1).all() for s in per_group)  # exactly one value per group
    other, _ = R.render_random(6, seed=3, stream=1, workers=1)
    assert not np.array_equal(one, other)


def test_judges_measure_in_fp32_under_a_callers_autocast(part_judge):
    """A bf16 run's snapshot metrics run under autocast; the judge must give its fp32 numbers."""
    judge = J.load_judge(part_judge)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    plain = judge(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = judge(x)[0]
    assert under.dtype == torch.float32 and torch.equal(under, plain)
