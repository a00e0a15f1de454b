"""Metrics: judge consistency follows the caption, diversity sees collapse, Frechet / IS
maths on known inputs, Inception weights from a file, the registry, ranks, the CLI."""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from torch import nn

from stackgan.config import ModelConfig
from stackgan.evaluate import main as evaluate_main
from stackgan.export import save_export
from stackgan.metrics import EvalContext, MetricError, compute, names
from stackgan.data.captions import caption_groups, caption_scope, stated_mask
from stackgan.metrics.evalset import to_tensor
from stackgan.metrics.fid_inception import (FIDInceptionError, FIDInceptionV3, hub_weights_path,
                                            load_fid_inception)
from stackgan.metrics.inception import InceptionError, features, fid_from_features, load_inception
from stackgan.metrics.stats import (GaussianSums, frechet_distance, frechet_distance_of_samples,
                                    inception_score)
from stackgan.models import build_generator
from tests.test_judge import COLORS, DIM, ENCODER, PARTS, eval_shards, render, trained_judge

Z_DIM = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class OracleG(nn.Module):
    """Draws exactly what a caption embedding states (argmax colour per part), with pose
    and background from z: a perfectly text-consistent generator. ``swap`` draws the
    caption of the batch's previous item instead; ``collapse`` ignores z and the caption."""

    def __init__(self, swap: bool = False, collapse: bool = False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # something to carry a device / mode
        self.z_dim, self.swap, self.collapse = Z_DIM, swap, collapse

    def forward(self, emb, z):
        idx = emb[:, :12].reshape(-1, 3, 4).argmax(-1).cpu().numpy()
        if self.swap:
            idx = np.roll(idx, 1, axis=0)
        if self.collapse:
            idx = np.zeros_like(idx)
        imgs = []
        for row, zz in zip(idx, z.cpu()):
            seed = 0 if self.collapse else int(zz.abs().sum() * 1e5)
            spec = {p: list(COLORS)[c] for p, c in zip(PARTS, row)}
            imgs.append(render(spec, np.random.default_rng(seed))[6:70, 6:70])
        x = to_tensor(np.stack(imgs)).to(emb.device)
        zero = torch.zeros(len(x), 4, device=emb.device)
        return x, zero, zero


class NoiseG(OracleG):
    def forward(self, emb, z):
        g = torch.Generator().manual_seed(int(z.abs().sum() * 1e5))
        x = torch.rand(len(z), 3, 64, 64, generator=g) * 2 - 1
        return x.to(emb.device), None, None


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return eval_shards(tmp_path_factory)


@pytest.fixture(scope="module")
def ctx(shards, tmp_path_factory):
    return EvalContext(shards=str(shards), image_size=64, z_dim=Z_DIM, text_encoder=ENCODER, text_dim=DIM,
                       judge=str(trained_judge(tmp_path_factory)), judge_samples=48, batch_size=16,
                       diversity_captions=6, diversity_z=4, log=lambda m: None)


# --------------------------------------------------------------------------------------
# Judge-based scores
# --------------------------------------------------------------------------------------
def test_consistency_is_scored_against_the_generating_caption(ctx):
    good = compute("judge_consistency", OracleG(), ctx)["judge_consistency"]
    swapped = compute("judge_consistency", OracleG(swap=True), ctx)["judge_consistency"]
    for split in ("train", "test"):
        # a generator that draws its caption scores like real images of it ...
        assert good[f"ratio_{split}"] > 0.85, good
        # ... and far above the same images scored against other captions
        assert good[split] - good[f"shuffled_{split}"] > 0.3, good
        # drawing another item's caption drops the score to about that level
        assert good[split] - swapped[split] > 0.3, (good, swapped)
        assert abs(swapped[split] - good[f"shuffled_{split}"]) < 0.2, (good, swapped)
        assert good[f"n_{split}"] == 48
        # the per-group breakdown says the same, group by group, next to its chance level
        groups, swapped_groups = good[f"groups_{split}"], swapped[f"groups_{split}"]
        chance = good[f"shuffled_groups_{split}"]
        assert groups.keys() == good[f"real_groups_{split}"].keys() == swapped_groups.keys() == chance.keys()
        above = [groups[g] - chance[g] for g in groups if groups[g] is not None]
        assert min(above) > 0 and sum(above) / len(above) > 0.25, (groups, chance)
        stated = [g for g, v in groups.items() if v is not None]
        assert stated, groups
        gaps = [groups[g] - swapped_groups[g] for g in stated]
        assert min(gaps) > 0 and sum(gaps) / len(gaps) > 0.3, (groups, swapped_groups)
    assert good["real_test"] - good["chance_random"] > 0.3
    assert good["real_test"] - good["chance_shuffled_real"] > 0.3
    assert good["chance_groups_shuffled_real"].keys() == good["groups_test"].keys()
    assert good["judge"] == "species"  # the synthetic shards are not the renderer's: the species judge


def test_judge_fd_and_diversity(ctx):
    res = compute(["judge_fd", "diversity"], OracleG(), ctx)
    noise = compute(["judge_fd", "diversity"], NoiseG(), ctx)
    collapsed = compute(["diversity"], OracleG(collapse=True), ctx)["diversity"]
    assert 0 <= res["judge_fd"]["test"] < 0.5 * noise["judge_fd"]["test"], (res, noise)
    assert noise["judge_fd"]["test"] == pytest.approx(res["judge_fd"]["noise_test"], rel=0.5)
    assert collapsed["score"] == 0.0 and collapsed["vs_real"] == 0.0
    assert 0.3 < res["diversity"]["vs_real"] < 3 and res["diversity"]["score"] > 0.05, res
    assert noise["diversity"]["score"] == pytest.approx(1.0, abs=0.05)  # independent uniform noise
    assert res["diversity"]["real"] == noise["diversity"]["real"]  # reference independent of G


def test_judge_diversity_is_relative_to_real_birds_of_one_species(ctx):
    """Samples of one caption spread in the judge's feature space about as much as real
    images of one species do when pose and background come from z; not at all when G
    ignores z; the real reference does not depend on G; pairs are averaged exactly."""
    from stackgan.metrics.scores import _pairwise_l2

    res = compute(["judge_diversity"], OracleG(), ctx)["judge_diversity"]
    collapsed = compute(["judge_diversity"], OracleG(collapse=True), ctx)["judge_diversity"]
    assert collapsed["score"] == 0.0 and collapsed["vs_real"] == 0.0
    assert 0.5 < res["vs_real"] < 2 and res["real"] > 0, res
    assert res["real"] == collapsed["real"] and res["z_per_caption"] == 4
    f = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]])  # distances 5, 0, 5
    assert float(_pairwise_l2(f)[0]) == pytest.approx(10 / 3)


def test_compute_appends_jsonl_restores_mode_and_is_reproducible(ctx, tmp_path):
    G = OracleG().train()
    out = tmp_path / "run" / "metrics.jsonl"
    a = compute("diversity,judge_consistency", G, ctx, step=7, jsonl=out, extra={"tag": "x"})
    b = compute(["diversity"], G, ctx, step=8, jsonl=out)
    assert G.training  # mode restored
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["metric"], r["step"]) for r in lines] == [("diversity", 7), ("judge_consistency", 7),
                                                         ("diversity", 8)]
    assert lines[0]["tag"] == "x" and lines[0]["score"] == a["diversity"]["score"]
    assert b["diversity"]["score"] == a["diversity"]["score"]  # same seed, same numbers


def test_shared_generation_passes_do_not_change_a_metrics_numbers(ctx):
    """A metric gives the same numbers alone as with others sharing its generation pass, and the
    sharing is real: together, G makes each image once."""
    class Counting(OracleG):
        calls = 0

        def forward(self, emb, z):
            Counting.calls += len(emb)
            return super().forward(emb, z)

    def run(metrics: str) -> tuple[dict, int]:
        Counting.calls = 0
        res = compute(metrics, Counting(), ctx)
        return {m: {k: v for k, v in r.items() if k != "seconds"} for m, r in res.items()}, Counting.calls

    alone = {}
    calls_alone = 0
    for m in ("judge_consistency", "judge_fd", "diversity", "judge_diversity"):
        res, calls = run(m)
        alone |= res
        calls_alone += calls
    together, calls_together = run("judge_diversity,judge_fd,diversity,judge_consistency")
    assert together == alone
    per_split, div = 2 * ctx.judge_samples, ctx.diversity_captions * ctx.diversity_z
    assert calls_alone == 2 * per_split + 2 * div and calls_together == per_split + div
    assert ctx.passes is None  # a call's passes end with it (G changes between calls)


def test_bad_requests_are_refused_before_any_work(ctx, shards, tmp_path):
    class Boom(OracleG):
        def forward(self, emb, z):
            raise AssertionError("generator must not run")

    with pytest.raises(MetricError, match="unknown metric.*known: diversity"):
        compute("diversity,nope", Boom(), ctx)
    other = EvalContext(shards=str(shards), image_size=64, z_dim=Z_DIM, text_encoder="all-MiniLM-L6-v2",
                        text_dim=384)
    with pytest.raises(MetricError, match="'all-MiniLM-L6-v2'.*'onehot-test'"):
        compute("diversity", Boom(), other)
    with pytest.raises(MetricError, match="--inception"):
        compute("diversity,fid", Boom(), ctx)
    missing = EvalContext(**{**ctx.__dict__, "cache": {}, "inception": str(tmp_path / "none.pth")})
    with pytest.raises(MetricError, match="not found"):
        compute("inception_score", Boom(), missing)
    assert {"judge_consistency", "judge_fd", "diversity", "judge_diversity", "inception_score", "fid",
            "fid_inception"} <= set(names())


RANK_METRICS = "diversity,judge_consistency,fid_inception"


def _rank_worker(rank: int, world: int, port: int, ctx_kwargs: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = compute(RANK_METRICS, OracleG(), EvalContext(**ctx_kwargs))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(res, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_numbers(ctx, fid_inception_file, tmp_path):
    kwargs = {k: v for k, v in ctx.__dict__.items() if k not in ("cache", "log")}
    kwargs |= {"fid_inception": str(fid_inception_file), "inception_size": 75, "num_samples": 20}
    single = compute(RANK_METRICS, OracleG(), EvalContext(**kwargs))
    with socket.socket() as sock:  # a free port for the process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(_rank_worker, args=(2, port, kwargs, str(tmp_path / "r.json")),
                                          nprocs=2, start_method="fork")  # no re-import: fast
    multi = json.loads((tmp_path / "r.json").read_text())
    for name, res in single.items():
        for k, v in res.items():
            if k != "seconds":  # FID: real images are batched differently per rank (float32 convs)
                rel = 1e-4 if name == "fid_inception" else 1e-9
                want = v if isinstance(v, str) else pytest.approx(v, rel=rel, abs=1e-12)
                assert multi[name][k] == want, (name, k)
    assert single["fid_inception"]["n_gen"] == 20 and single["fid_inception"]["n_real"] == 36


def test_caption_states_only_the_groups_it_mentions():
    names = ([f"has_bill_shape::{v}" for v in ("cone", "dagger", "needle")]
             + [f"has_{p}_color::{c}" for p in ("crown", "wing", "bill", "upper_tail")
                for c in ("red", "grey")]
             + ["has_bill_length::shorter_than_head", "has_bill_length::longer_than_head",
                "has_size::small_(5_-_9_in)", "has_size::large_(16_-_32_in)"])
    groups = caption_groups(names)

    def stated(caption):
        m = stated_mask(caption, groups, len(names))
        return sorted({names[i].split("::")[0] for i in np.nonzero(m)[0]})

    assert stated("this bird has a red crown and grey wings.") == ["has_crown_color", "has_wing_color"]
    assert stated("a little bird with a long needle-like grey beak.") == [
        "has_bill_color", "has_bill_length", "has_bill_shape", "has_size"]
    assert stated("the wings are grey and the tail feathers are red") == [
        "has_upper_tail_color", "has_wing_color"]
    assert stated("a bird with wings") == []  # a part without a colour states nothing
    scope = caption_scope([["a red crown", "grey wings"]], names)
    assert scope.shape == (1, 2, len(names)) and scope[0, 0, 3] and not scope[0, 1, 3]


# --------------------------------------------------------------------------------------
# Frechet distance, Inception Score, Inception weights
# --------------------------------------------------------------------------------------
def test_frechet_distance_known_values():
    # diagonal: |dmu|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)) = 25 + (1 + 4 - 4) + (4 + 9 - 12)
    assert frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([3.0, 4.0]), np.diag([4.0, 9.0])) == \
        pytest.approx(27.0)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + np.eye(6)
    mu = rng.normal(size=6)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu, cov, mu + 1, 4 * cov) == pytest.approx(6 + np.trace(cov))  # Tr(C+4C-2*2C)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, cov, mu[:5], cov[:5, :5])
    # from samples: the low-rank route (n < dim) agrees with the covariance route
    a, b = rng.normal(size=(9, 16)), rng.normal(size=(12, 16)) + 0.5
    full = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance_of_samples(a, b) == pytest.approx(full, rel=1e-9)
    big_a, big_b = rng.normal(size=(40, 16)), rng.normal(size=(50, 16)) * 2
    sums_a, sums_b = GaussianSums(16), GaussianSums(16)
    sums_a.add(torch.from_numpy(big_a))
    sums_b.add(torch.from_numpy(big_b))
    assert frechet_distance(*sums_a.mean_cov(), *sums_b.mean_cov()) == pytest.approx(
        frechet_distance_of_samples(big_a, big_b), rel=1e-9)


def test_inception_score_known_values():
    c = 7
    confident = torch.full((c * 4, c), -30.0)
    confident[torch.arange(c * 4), torch.arange(c * 4) % c] = 30.0
    assert inception_score(confident, splits=2)[0] == pytest.approx(c, rel=1e-6)  # sure and uniform: C
    same = torch.randn(1, c).expand(20, c)
    mean, std = inception_score(same, splits=4)
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)  # identical: 1


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random Inception-v3 weights in torchvision's layout (nothing downloaded)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    return path


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g) * 1.6 - 0.8
    return torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)


def test_fid_and_is_through_inception_weights_from_a_file(inception_file):
    net = load_inception(inception_file, size=75)  # small input keeps the CPU test fast
    x = _smooth_images(24, 0)
    fx, logits = features(net, x)
    assert fx.shape == (24, 2048) and logits.shape == (24, 1000)
    shifted = [fid_from_features(fx, features(net, (x + d).clamp(-1, 1))[0]) for d in (0.05, 0.15, 0.3)]
    self_fid = fid_from_features(fx, features(net, x.clone())[0])
    assert self_fid < 1e-3 * shifted[0], (self_fid, shifted)  # a set with itself: ~0
    assert shifted[0] < shifted[1] < shifted[2], shifted  # grows with the mean shift
    _, same_logits = features(net, x[:1].expand(10, -1, -1, -1))
    assert inception_score(same_logits, splits=2)[0] == pytest.approx(1.0, abs=1e-6)


def test_inception_weights_errors(inception_file, tmp_path):
    with pytest.raises(InceptionError, match="not found.*nothing is downloaded"):
        load_inception(tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, tmp_path / "part.pth")
    with pytest.raises(InceptionError, match="do not fit torchvision's inception_v3: .* missing"):
        load_inception(tmp_path / "part.pth")
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(InceptionError, match="not an Inception-v3"):
        load_inception(tmp_path / "resnet.pth")


def test_inception_metrics_through_the_registry(ctx, inception_file, tmp_path):
    c = EvalContext(**{**ctx.__dict__, "cache": {}, "inception": str(inception_file), "inception_size": 75,
                       "num_samples": 20, "is_splits": 2})
    res = compute("inception_score,fid", OracleG(), c, jsonl=tmp_path / "m.jsonl")
    assert res["inception_score"]["mean"] >= 1.0 - 1e-9 and res["inception_score"]["n"] == 20
    assert res["fid"]["fid"] > 0 and res["fid"]["n_real"] == 36 and res["fid"]["n_gen"] == 20
    assert "not directly comparable" in res["fid"]["note"]
    assert [json.loads(x)["metric"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        "inception_score", "fid"]


@pytest.fixture(scope="module")
def fid_inception_file(tmp_path_factory):
    """Randomly initialised FID-Inception weights in pytorch-fid's layout (nothing downloaded)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "pt_inception-random.pth"
    torch.save(FIDInceptionV3().state_dict(), path)
    return path


def test_fid_inception_from_a_file_is_zero_for_a_set_against_itself(fid_inception_file):
    net = load_fid_inception(fid_inception_file, size=75)  # small input keeps the CPU test fast
    saved = torch.load(fid_inception_file)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())  # the file's weights
    x = _smooth_images(24, 0)
    fx = net(x)
    assert fx.shape == (24, 2048)
    self_fid = fid_from_features(fx, net(x.clone()))
    shifted = [fid_from_features(fx, net((x + d).clamp(-1, 1))) for d in (0.05, 0.15, 0.3)]
    assert self_fid < 1e-3 * shifted[0], (self_fid, shifted)
    assert shifted[0] < shifted[1] < shifted[2], shifted


def test_fid_inception_is_inception_v3_with_the_tf_graphs_pooling(tmp_path):
    """Layers, parameter names and branch order are torchvision's Inception-v3 (so converted
    weights keyed by it load): with torchvision's pooling swapped in, the same features; with
    the TF graph's (padding not averaged, a max pool in Mixed_7c), other ones."""
    import torch.nn.functional as F
    from torchvision.models import inception_v3

    from stackgan.metrics.inception import _TRUNK

    torch.manual_seed(1)
    tv = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    net = load_fid_inception(tmp_path / "tv.pth", size=75)
    x = _smooth_images(3, 1)
    with torch.no_grad():
        h = F.interpolate(x, size=(75, 75), mode="bilinear", align_corners=False)
        for name in _TRUNK:
            h = getattr(tv, name)(h)
        ref = h.flatten(1)
    tf_pooled = net(x)
    for block in (net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
                  net.Mixed_6e, net.Mixed_7b, net.Mixed_7c):
        block.pool = lambda t: F.avg_pool2d(t, 3, 1, 1)
    rel = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    assert rel(net(x)) < 1e-5 and rel(tf_pooled) > 1e-2, (rel(net(x)), rel(tf_pooled))


def test_fid_inception_weights_come_from_a_path_or_the_hub_cache(fid_inception_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FIDInceptionError, match="torch hub cache.*nothing is downloaded"):
        load_fid_inception()
    with pytest.raises(FIDInceptionError, match="missing.pth.*nothing is downloaded"):
        load_fid_inception(tmp_path / "missing.pth")
    cached = hub_weights_path()
    assert cached.is_relative_to(tmp_path / "torch")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(fid_inception_file.read_bytes())
    assert load_fid_inception().Mixed_7c.branch_pool.conv.weight.shape == (192, 2048, 1, 1)
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(FIDInceptionError, match="not FID-Inception weights.*missing"):
        load_fid_inception(tmp_path / "resnet.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(FIDInceptionError, match="cannot read"):
        load_fid_inception(tmp_path / "junk.pth")


def test_fid_inception_through_the_registry_shares_the_generation_pass(ctx, inception_file,
                                                                      fid_inception_file, tmp_path):
    class Counting(OracleG):
        calls = 0

        def forward(self, emb, z):
            Counting.calls += len(emb)
            return super().forward(emb, z)

    c = EvalContext(**{**ctx.__dict__, "cache": {}, "inception": str(inception_file),
                       "fid_inception": str(fid_inception_file), "inception_size": 75, "num_samples": 20,
                       "is_splits": 2})
    res = compute("fid_inception,fid", Counting(), c, jsonl=tmp_path / "m.jsonl")
    assert Counting.calls == 20  # one pass of num_samples images fed both networks
    f = res["fid_inception"]
    assert f["fid"] > 0 and f["n_gen"] == 20 and f["n_real"] == 36 and "pytorch-fid" in f["note"]
    assert f["fid"] != res["fid"]["fid"]  # another network
    assert EvalContext.__dataclass_fields__["num_samples"].default == 30000  # the papers' protocol by default
    missing = EvalContext(**{**c.__dict__, "cache": {}, "fid_inception": str(tmp_path / "none.pth")})

    class Boom(OracleG):
        def forward(self, emb, z):
            raise AssertionError("generator must not run")

    with pytest.raises(MetricError, match="none.pth"):
        compute("diversity,fid_inception", Boom(), missing)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
def _tiny_export(path, encoder: str, dim: int):
    mcfg = ModelConfig(stage=1, z_dim=Z_DIM, cond_dim=8, gf_dim=4, df_dim=4)
    torch.manual_seed(0)
    return save_export(path, build_generator(mcfg, dim), mcfg, text_encoder=encoder, text_dim=dim, step=123,
                       config={})


def test_evaluate_cli(ctx, shards, tmp_path, capsys):
    export = _tiny_export(tmp_path / "run" / "export" / "generator.pt", ENCODER, DIM)
    rc = evaluate_main(["--export", str(export), "--shards", str(shards), "--judge", ctx.judge,
                        "--metrics", "judge_consistency,diversity", "--judge-samples", "16",
                        "--diversity-captions", "3", "--diversity-z", "2", "--batch-size", "8"])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["metric"], r["step"], r["source"]) for r in lines] == [
        ("judge_consistency", 123, "evaluate"), ("diversity", 123, "evaluate")]
    assert 0 <= lines[0]["test"] <= 1 and lines[1]["score"] >= 0
    assert "judge_consistency: train" in capsys.readouterr().out
    other = _tiny_export(tmp_path / "other.pt", "all-MiniLM-L6-v2", 384)
    assert evaluate_main(["--export", str(other), "--shards", str(shards)]) == 2
    assert "'all-MiniLM-L6-v2'" in capsys.readouterr().err


def test_generation_progress_bar_only_on_a_terminal():
    """The bar of the long generation passes is drawn on a terminal, never into a log file."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    code = ("from stackgan.metrics.core import EvalContext, progress\n"
            "ctx = EvalContext(shards='-', image_size=64, z_dim=4, text_encoder='-', text_dim=4,\n"
            "                  progress=True)\n"
            "batches = list(progress([(0, 8), (8, 12)], ctx, 'judge, test captions'))\n"
            "assert batches == [(0, 8), (8, 12)]\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has columns
    p = subprocess.run([sys.executable, "-c", code], stderr=follower, stdout=subprocess.PIPE, env=env,
                       timeout=120)
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        drawn += chunk
    os.close(leader)
    assert p.returncode == 0 and b"judge, test captions:" in drawn and b"/12 [" in drawn, drawn
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=120)
    assert piped.returncode == 0 and piped.stderr == b"" and piped.stdout == b"", piped.stderr


def test_device_auto_and_refusals(capsys):
    """--device auto (the default of evaluate, sample and the evaluation job) is CUDA when present."""
    from stackgan.metrics import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="'gpu0': not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
    assert evaluate_main(["--export", "none.pt", "--shards", "none", "--device", "gpu0"]) == 2
    assert "--device 'gpu0'" in capsys.readouterr().err  # refused before the export is read


def test_evaluation_job_runs_on_the_jobs_gpu(capsys):
    """jobs/evaluate.py asks Slurm for a GPU: its command says --device auto unless told otherwise."""
    from stackgan.cluster.cli import evaluate_main as job_main

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cluster = os.path.join(root, "jobs", "cluster.yaml")
    assert job_main(["--cluster", cluster, "--dry-run", "--", "--export", "g.pt", "--shards", "s"]) == 0
    out = capsys.readouterr().out
    assert "gpus_per_node: 1" in out
    assert "python -m stackgan.evaluate --export g.pt --shards s --device auto" in out
    assert job_main(["--cluster", cluster, "--dry-run", "--", "--shards", "s", "--device=cpu"]) == 0
    assert "--shards s --device=cpu\n" in capsys.readouterr().out
