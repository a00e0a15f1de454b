"""Stage-II metrics: each separates constructed cases (real 256 crops vs their own 64-px
versions upsampled, blurred crops), the judge views agree on real images, one generation
serves every figure and is the one G refines, stage-I generators are refused early, the
detail net's file is checked, ``evaluate`` defaults for stage II, the ``--stages`` sheet.

The shard set is built in-process (meta.py's format) from the test judge's birds
(``tests/test_judge.py``) drawn at 304 px with real fine detail (background grain, outlines,
feather strokes), their 76-px versions downsampled from those.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from torch import nn

from stackgan.config import ModelConfig
from stackgan.data.meta import load_metadata
from stackgan.evaluate import main as evaluate_main
from stackgan.export import save_export
from stackgan.metrics import EvalContext, MetricError, compute
from stackgan.metrics import detail as D
from stackgan.metrics.core import resize
from stackgan.metrics.evalset import load_split, to_tensor
from stackgan.metrics.judges import train_judge
from stackgan.metrics.stage2 import stage_batches
from stackgan.models import build_generator
from tests.test_judge import COLORS, DIM, ENCODER, _jpeg, write_eval_shards

Z_DIM = 8
SAMPLES = 32  # generated items per split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------
# A shard set with detailed 304-px birds
# --------------------------------------------------------------------------------------
def render_hi(spec: dict, rng: np.random.Generator, size: int = 304) -> np.ndarray:
    """The test judge's bird at ``size`` px with detail a 64-px image cannot hold."""
    k = size / 76
    jit = lambda c: tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in c)  # noqa: E731
    grain = rng.integers(140, 235, 3) + rng.normal(0, 9, (size, size, 3))
    img = Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.85, 1.1) * k
    cx, cy = size / 2 + rng.uniform(-5, 5) * k, size / 2 + (4 + rng.uniform(-4, 4)) * k
    body, line = jit((115, 90, 70)), (45, 35, 30)
    d.ellipse((cx - 20 * s, cy - 11 * s, cx + 16 * s, cy + 17 * s), fill=body, outline=line, width=2)
    belly = (cx - 12 * s, cy + 3 * s, cx + 12 * s, cy + 16 * s)
    d.ellipse(belly, fill=jit(COLORS[spec["belly"]]), outline=line)
    wing = (cx - 17 * s, cy - 7 * s, cx + 5 * s, cy + 5 * s)
    d.ellipse(wing, fill=jit(COLORS[spec["wing"]]), outline=line, width=2)
    for _ in range(10):  # feather strokes
        x, y = rng.uniform(wing[0] + 4 * s, wing[2] - 6 * s), rng.uniform(wing[1] + 3 * s, wing[3] - 3 * s)
        d.line((x, y, x + 4 * s, y + rng.uniform(-1, 1) * s), fill=line, width=1)
    head = (cx + 6 * s, cy - 27 * s, cx + 24 * s, cy - 9 * s)
    d.ellipse(head, fill=body, outline=line, width=2)
    d.pieslice(head, 180, 360, fill=jit(COLORS[spec["crown"]]))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    return np.asarray(img)


def _hires_images(spec: dict, rng: np.random.Generator) -> dict[str, bytes]:
    hi = render_hi(spec, rng)
    low = np.asarray(Image.fromarray(hi).resize((76, 76), Image.BOX))
    return {"76.jpg": _jpeg(low), "304.jpg": _jpeg(hi)}


def write_hires_shards(root: Path, per_train: int = 6, per_test: int = 4, seed: int = 0) -> Path:
    """16 train and 6 unseen test species; 76 and 304 px images, attributes, one-hot embeddings."""
    return write_eval_shards(root, per_train, per_test, seed, images=_hires_images, image_sizes=(76, 304),
                             stream=2, kind="test-hires")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_hires_shards(tmp_path_factory.mktemp("hires") / "birds")


@pytest.fixture(scope="module")
def judge_file(shards, tmp_path_factory) -> Path:
    judge = train_judge(shards, steps=80, batch_size=48, lr=3e-3, log=lambda m: None)
    return judge.save(tmp_path_factory.mktemp("judge") / "judge.pt")


@pytest.fixture(scope="module")
def detail_file(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("detail") / "detail256.pt"
    assert D.main(["train", "--shards", str(shards), "--out", str(out), "--steps", "40", "--batch-size", "16",
                   "--reference-samples", "0"]) == 0
    return out


def make_ctx(shards, judge_file, detail_file, **kw) -> EvalContext:
    return EvalContext(**{"shards": str(shards), "image_size": 256, "z_dim": Z_DIM, "text_encoder": ENCODER,
                          "text_dim": DIM, "judge": str(judge_file), "detail_net": str(detail_file),
                          "judge_samples": SAMPLES, "batch_size": 16, "diversity_captions": 4,
                          "diversity_z": 2, "log": lambda m: None, **kw})


@pytest.fixture(scope="module")
def ctx(shards, judge_file, detail_file) -> EvalContext:
    return make_ctx(shards, judge_file, detail_file)


# --------------------------------------------------------------------------------------
# Generators made of real images
# --------------------------------------------------------------------------------------
def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (reflect padding)."""
    r = int(3 * sigma + 0.5)
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma**2))
    k = (k / k.sum()).to(x)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


class RealG(nn.Module):
    """Behaves like a Stage2G whose stage II draws the real 256-px crop of the caption's image
    and whose stage I is that crop's 64-px version (area). ``stage2`` reworks stage II's
    image: ``"real"``, ``"upsampled"`` (its 64-px version upsampled bicubically),
    ``"blur<sigma>"`` or ``"grey"``."""

    def __init__(self, shards: Path, stage2: str = "real"):
        super().__init__()
        meta = load_metadata(shards)
        parts = [load_split(meta, s, image=304, attributes=False) for s in ("train", "test")]
        self.register_buffer("emb", torch.from_numpy(np.concatenate([p.emb for p in parts])))  # (N, C, D)
        self.register_buffer("images", torch.cat([to_tensor(p.img) for p in parts]))  # (N, 3, 256, 256)
        self.stage2, self.z_dim = stage2, Z_DIM

    def real(self, emb: torch.Tensor) -> torch.Tensor:
        d = (self.emb[None] - emb[:, None, None]).square().sum(-1).amin(-1)  # (B, N)
        return self.images[d.argmin(1)]

    def low_res(self, emb, z):
        return resize(self.real(emb), 64)

    def forward(self, emb, z):
        x = self.real(emb)
        if self.stage2 == "upsampled":
            x = D.reduce_detail(x)
        elif self.stage2.startswith("blur"):
            x = blur(x, float(self.stage2[4:]))
        elif self.stage2 == "grey":
            x = torch.zeros_like(x)
        return x, None, None


@pytest.fixture(scope="module")
def real_g(shards) -> RealG:
    return RealG(shards)


def tiny_stage2(dim: int = DIM, seed: int = 0, **model) -> tuple[nn.Module, ModelConfig, ModelConfig]:
    """A small real Stage2G with visible, seed-dependent pictures (BN stats away from identity)."""
    s1 = ModelConfig(stage=1, z_dim=Z_DIM, cond_dim=8, gf_dim=4)
    s2 = ModelConfig(stage=2, z_dim=Z_DIM, cond_dim=8, gf_dim=4, r_num=1, **model)
    torch.manual_seed(seed)
    g1 = build_generator(s1, dim)
    for m in g1.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_var.fill_(0.05)
    return build_generator(s2, dim, stage1=g1).eval(), s1, s2


# --------------------------------------------------------------------------------------
# Sharpness
# --------------------------------------------------------------------------------------
def test_hf_share_known_cases():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(8, 3, 256, 256, generator=g) * 2 - 1
    flat_band = 1 - (65 / 256) ** 2  # bins outside |k| <= 32 along both axes, of a flat spectrum
    assert D.hf_share(noise).mean().item() == pytest.approx(flat_band, abs=0.01)
    up = D.upsample(torch.rand(8, 3, 64, 64, generator=g) * 2 - 1)
    assert D.hf_share(up).max().item() < 0.08  # bicubic leaks little above the band (white noise: worst case)
    assert torch.allclose(D.hf_share(0.3 * noise), D.hf_share(noise))  # free of contrast
    assert D.hf_share(torch.full((1, 3, 256, 256), 0.4)).item() == 0.0  # no power at all
    with pytest.raises(ValueError, match="hf_share"):
        D.hf_share(torch.zeros(1, 1, 256, 256))


def test_sharpness_ranks_real_over_blurred_and_upsampled(ctx, shards):
    res = {m: compute("sharpness", RealG(shards, m), ctx)["sharpness"]
           for m in ("real", "blur0.7", "blur1.5", "upsampled")}
    real = res["real"]
    assert 0.8 < real["stage2"] < 1.25, real  # real crops score like the real reference
    assert real["real_upsampled"] < 0.3 and real["upsampled"] < 0.3, real  # a 64-px image holds little of it
    assert real["stage2"] > res["blur0.7"]["stage2"] > res["blur1.5"]["stage2"] > 0, res
    assert res["blur1.5"]["stage2"] < 0.5 * real["stage2"], res
    assert res["upsampled"]["stage2"] == pytest.approx(real["upsampled"], rel=1e-6)  # stage II = the baseline
    assert real["n_gen"] == SAMPLES and real["n_real"] == 24 and real["cutoff"] == 32


# --------------------------------------------------------------------------------------
# The detail net and fd256
# --------------------------------------------------------------------------------------
def test_fd256_real_crops_beat_their_upsampled_versions(ctx, shards):
    real = compute("fd256", RealG(shards), ctx)["fd256"]
    up = compute("fd256", RealG(shards, "upsampled"), ctx)["fd256"]
    blurred = compute("fd256", RealG(shards, "blur1.5"), ctx)["fd256"]
    # generated = real test crops: near the real test set, far closer than their upsampled inputs
    assert real["stage2"] < 0.25 * real["upsampled"], real
    assert up["stage2"] == pytest.approx(real["upsampled"], rel=1e-6)  # the baseline scores as the baseline
    assert blurred["stage2"] > 2 * real["stage2"], (blurred, real)
    # the net's reference: other real birds are much closer than the same birds upsampled
    assert real["real_upsampled"] > 3 * real["floor"], real
    # its effective-resolution reading (40 steps here: a compressed scale) sees the difference too
    assert real["resolution_real"] > real["resolution_real_upsampled"] + 25, real
    assert real["resolution_stage2"] > real["resolution_upsampled"] + 25, real
    assert (real["n_gen"], real["n_real"], real["n_floor"]) == (SAMPLES, 24, SAMPLES)


def test_detail_net_file_refusals_and_report(detail_file, shards, tmp_path, capsys):
    net = D.load_detail_net(detail_file, load_metadata(shards))
    r = net.report
    assert (r.steps, r.batch_size, r.n_train, r.classes) == (40, 16, 96, 16) and r.seconds > 0
    assert net.net.feature_dim == 23 * 8 and net.trained_on["fingerprint"]
    assert [p.name for p in detail_file.parent.iterdir()] == [detail_file.name]  # atomic: no temp files
    assert D.main(["show", str(detail_file)]) == 0
    assert json.loads(capsys.readouterr().out)["report"]["steps"] == 40
    other = write_hires_shards(tmp_path / "other", per_train=2, per_test=2, seed=1)
    with pytest.raises(D.DetailNetError, match="trained on other shards"):
        D.load_detail_net(detail_file, load_metadata(other))
    c = EvalContext(shards=str(other), image_size=256, z_dim=Z_DIM, text_encoder=ENCODER, text_dim=DIM,
                    detail_net=str(detail_file), judge_samples=4)
    with pytest.raises(MetricError, match="other shards"):
        compute("fd256", RealG(other), c)
    with pytest.raises(D.DetailNetError, match="not found"):
        D.load_detail_net(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(D.DetailNetError, match="cannot read"):
        D.load_detail_net(tmp_path / "bad.pt")
    assert D.main(["train", "--shards", str(tmp_path), "--steps", "1"]) == 2  # no metadata.json
    assert "metadata.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# The judge's views
# --------------------------------------------------------------------------------------
def test_judge_views_agree_on_real_images_and_catch_a_bad_stage2(ctx, shards, real_g):
    res = compute("stage2_consistency,stage2_fd,judge_consistency,judge_fd", real_g, ctx)
    cons, fds = res["stage2_consistency"], res["stage2_fd"]
    grey = compute("stage2_consistency,stage2_fd", RealG(shards, "grey"), ctx)
    for split in ("train", "test"):
        # real crops, their 64-px versions and those upsampled: one bird to a 64-px judge
        assert cons[split] > 0.8 * cons[f"real_{split}"], cons
        assert abs(cons[split] - cons[f"stage1_{split}"]) <= 0.1 and abs(cons[f"gain_{split}"]) <= 0.1, cons
        assert fds[split] < 0.3 * grey["stage2_fd"][split], (fds, grey)
        # a stage II that loses the bird falls far below its own input
        g = grey["stage2_consistency"]
        assert g[f"gain_{split}"] < -0.3 and g[f"stage1_{split}"] == cons[f"stage1_{split}"], g
        # stage II's figures are judge_consistency's / judge_fd's (same items, noise and images)
        assert cons[split] == res["judge_consistency"][split] and cons[f"n_{split}"] == SAMPLES
        assert fds[split] == pytest.approx(res["judge_fd"][split], rel=1e-9)
    assert res["judge_consistency"]["seconds"] < 0.5 * cons["seconds"]  # it reused the stage-II pass


# --------------------------------------------------------------------------------------
# A real Stage2G: one generation, the images G refined, early refusals
# --------------------------------------------------------------------------------------
def test_one_generation_serves_every_figure_with_the_stage1_images_G_refined(ctx):
    G, _, _ = tiny_stage2()
    calls, inner = [], []
    G.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    G.stage1.register_forward_hook(lambda m, i, o: inner.append(o[0].clone()))
    c = make_ctx(ctx.shards, ctx.judge, ctx.detail_net, judge_samples=20)
    res = compute("stage2_consistency,stage2_fd,fd256,sharpness,judge_consistency,judge_fd", G, c)
    assert sum(calls) == 2 * 20, calls  # each train and test item made once, for all six metrics
    assert all(np.isfinite(v) for r in res.values() for v in r.values() if isinstance(v, float)), res
    assert res["fd256"]["stage2"] > res["fd256"]["floor"]  # an untrained G is no real bird
    # the stage-I images the metrics see are the ones G's forward refined
    inner.clear()
    emb = np.random.default_rng(0).normal(size=(20, DIM)).astype(np.float32)
    lows = [low for _, _, _, low in stage_batches(G, c, emb, tag=5)]
    refined = [x for k, x in enumerate(inner) if k % 2 == 0]  # forward's stage-I call, then low_res's
    assert len(lows) == len(refined) == 2 and all(torch.equal(a, b) for a, b in zip(lows, refined))


def test_an_untrained_upsample_skip_stage2_scores_as_the_baseline(ctx):
    """model.upsample_skip starts G at its input upsampled bicubically: every figure must
    put it at the baseline (up to the skip's clamp to +-0.99)."""
    G, _, _ = tiny_stage2(upsample_skip=True)
    res = compute("stage2_consistency,stage2_fd,fd256,sharpness", G, ctx)
    for split in ("train", "test"):
        assert res["stage2_consistency"][f"gain_{split}"] == pytest.approx(0, abs=0.05), res
        fds = res["stage2_fd"]
        assert fds[split] == pytest.approx(fds[f"upsampled_{split}"], rel=0.05), fds
    assert res["fd256"]["stage2"] == pytest.approx(res["fd256"]["upsampled"], rel=0.05), res["fd256"]
    assert res["sharpness"]["stage2"] == pytest.approx(res["sharpness"]["upsampled"], rel=0.05), res
    plain = compute("sharpness", tiny_stage2()[0], ctx)["sharpness"]  # the official G draws a new image
    assert plain["stage2"] > 2 * plain["upsampled"], plain


def test_stage1_generators_are_refused_before_any_work(ctx):
    class Boom(nn.Module):
        def forward(self, emb, z):
            raise AssertionError("generator must not run")

    c64 = make_ctx(ctx.shards, ctx.judge, ctx.detail_net, image_size=64)
    for name in ("stage2_consistency", "stage2_fd", "fd256", "sharpness"):
        with pytest.raises(MetricError, match="makes 64px images \\(stage I\\)"):
            compute(f"diversity,{name}", Boom(), c64)
        with pytest.raises(MetricError, match=f"{name}: .*has no low_res"):
            compute(name, Boom(), ctx)


STAGE2_METRICS = "stage2_consistency,stage2_fd,fd256,sharpness"


def _rank_worker(rank: int, world: int, port: int, ctx_kwargs: dict, shards: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = compute(STAGE2_METRICS, RealG(Path(shards), "blur0.7"), EvalContext(**ctx_kwargs))
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_give_the_single_process_numbers(ctx, shards, tmp_path):
    kwargs = {k: v for k, v in ctx.__dict__.items() if k not in ("cache", "log")}
    single = compute(STAGE2_METRICS, RealG(shards, "blur0.7"), EvalContext(**kwargs))
    with socket.socket() as sock:  # a free port for the process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (2, port, kwargs, str(shards), str(tmp_path / "r.json"))
    torch.multiprocessing.start_processes(_rank_worker, args=args, nprocs=2, start_method="fork")
    multi = json.loads((tmp_path / "r.json").read_text())
    for name, res in single.items():
        for k, v in res.items():
            if k != "seconds":
                assert multi[name][k] == pytest.approx(v, rel=1e-4, abs=1e-9), (name, k)


# --------------------------------------------------------------------------------------
# Command lines
# --------------------------------------------------------------------------------------
def _export(path: Path, stage: int) -> Path:
    G, s1, s2 = tiny_stage2()
    if stage == 1:
        return save_export(path, G.stage1, s1, text_encoder=ENCODER, text_dim=DIM, step=3, config={})
    return save_export(path, G, s2, text_encoder=ENCODER, text_dim=DIM, step=7, config={}, stage1_model=s1)


def test_evaluate_scores_a_stage2_export_against_its_stage1_by_default(ctx, tmp_path, capsys):
    export = _export(tmp_path / "run" / "export" / "generator.pt", stage=2)
    common = ["--shards", ctx.shards, "--judge", ctx.judge, "--detail-net", ctx.detail_net,
              "--judge-samples", "8", "--diversity-captions", "2", "--diversity-z", "2", "--batch-size", "8"]
    assert evaluate_main(["--export", str(export), *common]) == 0, capsys.readouterr().err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["metric"] for r in lines] == ["stage2_consistency", "stage2_fd", "fd256", "sharpness",
                                            "judge_consistency", "judge_fd", "diversity", "judge_diversity"]
    by = {r["metric"]: r for r in lines}
    assert by["fd256"]["stage"] == 2 and by["fd256"]["step"] == 7 and by["fd256"]["n_gen"] == 8
    assert by["sharpness"]["stage2"] > 0 and by["diversity"]["score"] >= 0  # diversity: stage II at 64 px
    assert "fd256: stage2" in capsys.readouterr().out
    one = _export(tmp_path / "s1.pt", stage=1)
    assert evaluate_main(["--export", str(one), *common, "--metrics", "judge_fd,sharpness"]) == 2
    assert "64px images (stage I)" in capsys.readouterr().err


def test_sample_stages_sheet(ctx, tmp_path, capsys):
    from stackgan.grid import to_uint8
    from stackgan.sample import generate_images
    from stackgan.sample import main as sample_main

    export = _export(tmp_path / "s2.pt", stage=2)
    out = tmp_path / "out"
    assert sample_main(["--export", str(export), "--split", "test", "--shards", ctx.shards, "--limit", "2",
                        "--n", "2", "--stages", "--out", str(out)]) == 0, capsys.readouterr().err
    rec = json.loads((out / "prompts.json").read_text())
    assert rec["grids"] == ["grid.png", "stages.png"]
    sheet = np.asarray(Image.open(out / "stages.png"))
    pad, cell = 2, 256
    assert sheet.shape[1] == 6 * cell + 7 * pad  # per sample: stage I | bicubic | stage II
    x0 = [pad + c * (cell + pad) for c in range(6)]
    col = lambda c: sheet[pad : pad + cell, x0[c] : x0[c] + cell]  # noqa: E731
    assert np.array_equal(col(2), np.asarray(Image.open(out / "p000_s000.png")))  # stage II of sample 0
    assert np.array_equal(col(5), np.asarray(Image.open(out / "p000_s001.png")))
    # the stage-I column shows the image G's forward refined, nearest x4
    G, _, _ = tiny_stage2()
    inner = []
    G.stage1.register_forward_hook(lambda m, i, o: inner.append(o[0].clone()))
    emb = load_split(load_metadata(ctx.shards), "test", attributes=False).emb[[0], 0]
    generate_images(G, emb, 2, 0, Z_DIM)
    low = to_uint8(inner[0][:1])[0]
    assert np.array_equal(col(0), low.repeat(4, 0).repeat(4, 1))
    assert not np.array_equal(col(1), col(0))  # bicubic, not the nearest copy
    one = _export(tmp_path / "s1.pt", stage=1)
    assert sample_main(["--export", str(one), "--prompt", "a red bird", "--stages", "--out", str(out)]) == 2
    assert "needs a stage-II export" in capsys.readouterr().err


def test_trainer_snapshots_stage2_metrics(tiny_shards, tmp_path):
    """The stage-II metrics as ``train.metrics`` on the trainer's EMA generator (the detail
    net cached beforehand in a copy of the shards, where the trainer looks for it)."""
    from tests.test_train import TINY, train_args

    from .conftest import run_cmd

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    assert D.main(["train", "--shards", str(shards), "--steps", "4", "--batch-size", "8",
                   "--reference-samples", "0"]) == 0
    sizes = {k: int(v) for k, v in (a.split("=") for a in TINY) if k in ("model.z_dim", "model.cond_dim")}
    s1 = ModelConfig(stage=1, z_dim=sizes["model.z_dim"], cond_dim=sizes["model.cond_dim"], gf_dim=4)
    export1 = save_export(tmp_path / "s1.pt", build_generator(s1, 384), s1, text_encoder="all-MiniLM-L6-v2",
                          text_dim=384, step=1, config={})
    run = tmp_path / "s2"
    extra = ["train.steps=2", "data.batch_size=2", f"model.stage1_export={export1}",
             "train.metrics=sharpness,fd256", "train.metrics_samples=8"]
    p = run_cmd(train_args(shards, run, *extra, config="configs/birds_stage2.yaml"))
    assert p.returncode == 0, p.stderr[-3000:]
    snaps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["metric"], r["step"]) for r in snaps] == [("sharpness", 2), ("fd256", 2)]
    assert snaps[0]["n_gen"] == 8 and snaps[1]["floor"] >= 0 and snaps[1]["stage2"] > 0, snaps
