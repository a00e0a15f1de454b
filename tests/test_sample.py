"""Sampling from text: deterministic bytes for a seed, prompts / files / split captions,
stage I and II exports, encoder mismatches refused, and the captioned grid."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from stackgan.config import ModelConfig
from stackgan.export import save_export
from stackgan.grid import make_grid, save_grid
from stackgan.models import build_generator
from stackgan.sample import SamplingError, main, run
from stackgan.text import SENTENCE_ENCODER, get_encoder
from tests.test_judge import DIM, ENCODER, eval_shards

Z_DIM = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _export(path, encoder: str, dim: int, stage: int = 1):
    s1 = ModelConfig(stage=1, z_dim=Z_DIM, cond_dim=8, gf_dim=4)
    torch.manual_seed(0)
    g1 = build_generator(s1, dim)
    for m in g1.modules():  # visible, seed-dependent pictures: BN stats away from identity
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            m.running_var.fill_(0.05)
    if stage == 1:
        return save_export(path, g1, s1, text_encoder=encoder, text_dim=dim, step=5, config={})
    s2 = ModelConfig(stage=2, z_dim=Z_DIM, cond_dim=8, gf_dim=4, r_num=1)
    g2 = build_generator(s2, dim, stage1=g1)
    return save_export(path, g2, s2, text_encoder=encoder, text_dim=dim, step=9, config={}, stage1_model=s1)


@pytest.fixture(scope="module")
def minilm():
    return get_encoder(SENTENCE_ENCODER)  # offline, from the installed package


@pytest.fixture(scope="module")
def text_export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("run") / "export" / "generator.pt", SENTENCE_ENCODER, 384)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_free_text_sampling_is_deterministic_for_a_seed(text_export, minilm, tmp_path):
    prompts = ["this bird has a red crown, blue wings and a white belly",
               "a small yellow bird with black wings"]
    a = run(text_export, prompts=prompts, n=3, seed=1, out=tmp_path / "a", text_encoder=minilm)
    b = run(text_export, prompts=prompts + ["another prompt"], n=3, seed=1, out=tmp_path / "b",
            text_encoder=minilm)  # an extra prompt does not change the others' images
    c = run(text_export, prompts=prompts, n=3, seed=2, out=tmp_path / "c", text_encoder=minilm)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    pngs = [f"p{p:03d}_s{s:03d}.png" for p in range(2) for s in range(3)]
    assert sorted(fa) == sorted(pngs + ["grid.png", "prompts.json"]) and a["images"] == 6
    assert all(fa[k] == fb[k] for k in pngs)  # same seed: same bytes
    a2 = run(text_export, prompts=prompts, n=3, seed=1, out=tmp_path / "a2", text_encoder=minilm)
    assert _files(tmp_path / "a2") == fa and a2["images"] == 6
    assert all(fa[k] != fc[k] for k in pngs)  # another seed: other images
    imgs = [np.asarray(Image.open(tmp_path / "a" / k)) for k in pngs]
    assert imgs[0].shape == (64, 64, 3) and not np.array_equal(imgs[0], imgs[1])  # z varies per sample
    assert not np.array_equal(imgs[0], imgs[3])  # and the prompt matters
    rec = json.loads(fa["prompts.json"])
    assert rec["prompts"] == prompts and rec["seed"] == 1 and rec["text_encoder"] == SENTENCE_ENCODER
    assert not list((tmp_path / "a").glob(".*"))  # no temp files left


def test_prompts_file_and_default_out(text_export, minilm, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a blue bird\n\n  a red bird with a long beak  \n")
    res = run(text_export, prompts_file=str(f), n=1, text_encoder=minilm)
    out = text_export.parent.parent / "generated"
    assert res["out"] == str(out) and json.loads((out / "prompts.json").read_text())["prompts"] == [
        "a blue bird", "a red bird with a long beak"]
    with pytest.raises(SamplingError, match="not found"):
        run(text_export, prompts_file=str(tmp_path / "none.txt"), text_encoder=minilm)
    with pytest.raises(SamplingError, match="not both"):
        run(text_export, prompts=["x"], split="test", shards=str(tmp_path))


def test_split_captions_stage2_cli(tmp_path_factory, tmp_path, capsys):
    shards = eval_shards(tmp_path_factory)
    export = _export(tmp_path / "s2.pt", ENCODER, DIM, stage=2)
    rc = main(["--export", str(export), "--split", "test", "--shards", str(shards), "--limit", "3",
               "--n", "2",
               "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((tmp_path / "out" / "prompts.json").read_text())
    assert rec["source"] == "split:test" and rec["stage"] == 2 and len(rec["prompts"]) == 3
    assert "crown" in rec["prompts"][0]  # the shards' own captions
    assert Image.open(tmp_path / "out" / "p002_s001.png").size == (256, 256)


def test_encoder_mismatches_are_refused(text_export, tmp_path_factory, tmp_path, capsys):
    cub = _export(tmp_path / "cub.pt", "char-CNN-RNN", 1024)
    assert main(["--export", str(cub), "--prompt", "a red bird", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'char-CNN-RNN'" in err and "--reembed" in err and "--split test" in err
    assert main(["--export", str(text_export), "--prompt", "a red bird", "--encoder", "char-CNN-RNN",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"trained with text encoder '{SENTENCE_ENCODER}'" in err and "'char-CNN-RNN' was asked" in err
    shards = eval_shards(tmp_path_factory)  # onehot-test embeddings, not MiniLM
    assert main(["--export", str(text_export), "--split", "test", "--shards", str(shards),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"'{ENCODER}'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before writing anything


def test_grid_writes_a_caption_under_each_row(tmp_path):
    imgs = torch.rand(6, 3, 64, 64) * 2 - 1
    plain = make_grid(imgs, nrow=3)
    short = make_grid(imgs, nrow=3, captions=["a", "b"])
    long = make_grid(imgs, nrow=3, captions=["a " * 200, "b"])
    assert plain.size[0] == short.size[0] == long.size[0]
    assert plain.size[1] < short.size[1] < long.size[1]  # text rows under the images, wrapped
    arr = np.asarray(short)
    assert (arr[: 2 + 128] != 255).any() and arr.shape[1] == 3 * 128 + 4 * 2  # 64px cells shown at 128
    with pytest.raises(ValueError, match="one per row"):
        make_grid(imgs, nrow=3, captions=["only one"])
    p = save_grid(imgs, tmp_path / "g" / "grid.png", nrow=2, captions=["x", "y", "z"])
    assert Image.open(p).size == make_grid(imgs, nrow=2, captions=["x", "y", "z"]).size
