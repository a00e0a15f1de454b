"""Files that must not run code when read: StackGAN's .pickle data files (a restricted
unpickler) and generator exports (safetensors + JSON, no pickle)."""
from __future__ import annotations

import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stackgan.data import cub
from tests.test_cub_layout import make_replica

ROOT = Path(__file__).resolve().parents[1]


class _RunsAShell:
    """Unpickling this calls os.system: what a tampered data file can do to a plain pickle.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_pickle_that_calls_a_function_is_refused_by_prepare(tmp_path):
    rep = make_replica(tmp_path / "data")
    bad = rep["birds_root"] / "train" / "filenames.pickle"
    marker = tmp_path / "ran"
    bad.write_bytes(pickle.dumps([_RunsAShell(marker), "001.Black_footed_Albatross/x"], protocol=2))
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "shards/prepare.py", "--cub-root", str(rep["cub_root"]),
                        "--out", str(out), "--workers", "1", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert str(bad) in r.stderr and f"{os.system.__module__}.system" in r.stderr
    assert not marker.exists() and not out.exists()
    pickle.loads(bad.read_bytes())  # the same file through a plain pickle.load does run it
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_arrays_and_plain_containers_load(tmp_path, protocol):
    """What Python 3 writes at each protocol (bytes via _codecs at 2, buffers at 5) still loads."""
    obj = {"emb": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "ids": [1, 2], "key": b"k\xe9",
           "t": ("a", 1.5, None, True), "s": np.int64(7)}
    p = tmp_path / "x.pickle"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    got = cub.load_py2_pickle(p)
    assert np.array_equal(got["emb"], obj["emb"]) and got["emb"].dtype == np.float32
    assert (got["ids"], got["key"], got["t"], got["s"]) == (obj["ids"], obj["key"], obj["t"], obj["s"])


def test_refuses_other_classes_and_codecs(tmp_path):
    from collections import OrderedDict

    p = tmp_path / "class_info.pickle"
    p.write_bytes(pickle.dumps(OrderedDict(a=1), protocol=2))
    with pytest.raises(cub.DataError, match=f"{p}: refused to unpickle collections.OrderedDict"):
        cub.load_py2_pickle(p)
    # _codecs.encode is admitted only as protocol 2 writes bytes (latin1)
    p.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R.")
    with pytest.raises(cub.DataError, match="base64"):
        cub.load_py2_pickle(p)


def test_the_embedded_sets_py2_pickles_load(tmp_path):
    """The generated set's pickles are written the way Python 2 wrote StackGAN's (latin1
    byte strings, numpy.core arrays); they go through the restricted reader unchanged."""
    from stackgan.data import birds

    root = tmp_path / "emb"
    birds.generate(root, species=4, images_per_species=2, seed=0)
    for split in ("train", "test"):
        d = root / "birds" / split
        keys = cub.load_py2_pickle(d / "filenames.pickle")
        emb = cub.load_py2_pickle(d / "char-CNN-RNN-embeddings.pickle")
        cls = cub.load_py2_pickle(d / "class_info.pickle")
        assert len(keys) == len(cls) == emb.shape[0] > 0 and emb.ndim == 3
        assert b"numpy.core.multiarray" in (d / "char-CNN-RNN-embeddings.pickle").read_bytes()
        with open(d / "char-CNN-RNN-embeddings.pickle", "rb") as f:
            assert np.array_equal(emb, pickle.load(f, encoding="latin1"))


# ---- generator exports --------------------------------------------------------------------
def _generators(text_dim: int = 16):
    from stackgan.config import ModelConfig
    from stackgan.models import build_generator

    torch.manual_seed(0)
    s1 = ModelConfig(stage=1, gf_dim=8)
    s2 = ModelConfig(stage=2, gf_dim=8, r_num=1)
    g1 = build_generator(s1, text_dim)
    g2 = build_generator(s2, text_dim, stage1=build_generator(s1, text_dim))
    for g in (g1, g2):  # BN statistics that are not the defaults, so a lost buffer shows
        for m in g.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return (g1.eval(), s1), (g2.eval(), s2)


def _same_outputs(a, b, text_dim: int = 16) -> bool:
    emb, z = torch.randn(2, text_dim), torch.randn(2, 100)
    with torch.no_grad():
        torch.manual_seed(1)
        x = a(emb, z)[0]
        torch.manual_seed(1)
        y = b(emb, z)[0]
    return torch.equal(x, y)


def _refuse_pickle(monkeypatch):
    """Any torch.load or unpickling from here on fails the test."""
    def boom(*a, **k):
        raise AssertionError("an export was unpickled")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, boom)


def test_export_files_load_without_pickle(tmp_path, monkeypatch):
    from stackgan.export import load_generator, load_stage1_for_stage2, save_export

    (g1, s1), (g2, s2) = _generators()
    p1 = save_export(tmp_path / "s1" / "export" / "generator.safetensors", g1, s1, text_encoder="enc",
                     text_dim=16, step=5, config={"train": {"steps": 5}})
    p2 = save_export(tmp_path / "s2" / "export" / "generator.safetensors", g2, s2, text_encoder="enc",
                     text_dim=16, step=9, config={}, stage1_model=s1)
    assert sorted(f.name for f in p1.parent.iterdir()) == ["generator.json", "generator.safetensors"]
    assert not p1.read_bytes().startswith((b"PK", b"\x80"))  # neither torch's zip nor a pickle
    _refuse_pickle(monkeypatch)
    for given in (p1, p1.parent, p1.with_suffix(".pt"), p1.with_suffix(".json")):  # the paths users pass
        g, info = load_generator(given)
        assert (info.stage, info.step, info.text_encoder) == (1, 5, "enc")
        assert info.config == {"train": {"steps": 5}}
        assert _same_outputs(g, g1)
    g, info = load_generator(p2)
    assert info.stage == 2 and _same_outputs(g, g2)
    frozen, cfg = load_stage1_for_stage2(p1.with_suffix(".pt"), 16, "enc")
    assert cfg.gf_dim == 8 and _same_outputs(frozen, g1)


def test_weights_and_description_of_different_exports_are_refused(tmp_path):
    from stackgan.export import ExportError, load_generator, save_export

    (g1, s1), _ = _generators()
    a = save_export(tmp_path / "a" / "generator.safetensors", g1, s1, text_encoder="e", text_dim=16, step=5,
                    config={})
    b = save_export(tmp_path / "b" / "generator.safetensors", g1, s1, text_encoder="e", text_dim=16, step=6,
                    config={})
    b.with_suffix(".json").replace(a.with_suffix(".json"))
    with pytest.raises(ExportError, match=r"step 5.*step 6.*not from the same export"):
        load_generator(a)
    with pytest.raises(ExportError, match=r"generator.json is missing"):
        load_generator(b)
    with pytest.raises(ExportError, match=r"export not found: .*nowhere"):
        load_generator(tmp_path / "nowhere" / "generator.pt")


def _old_export(path: Path, g, mcfg, **extra) -> Path:
    """An export as the previous version wrote it: one torch.save pickle, format /1."""
    import dataclasses

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "stackgan-export/1", "stage": 1, "state_dict": g.state_dict(),
                "model": dataclasses.asdict(mcfg), "stage1_model": None, "text_encoder": "enc",
                "text_dim": 16, "image_size": 64, "step": 11, "config": {"model": dataclasses.asdict(mcfg)},
                **extra}, path)
    return path


def test_an_old_pt_export_loads_with_a_note_and_converts(tmp_path, capsys):
    from stackgan.export import load_generator

    (g1, s1), _ = _generators()
    old = _old_export(tmp_path / "run" / "export" / "generator.pt", g1, s1)
    g, info = load_generator(old)
    assert info.step == 11 and _same_outputs(g, g1)
    assert f"python -m stackgan.convert --to safetensors {old}" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "stackgan.convert", "--to", "safetensors", str(old)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    new = old.with_suffix(".safetensors")
    assert new.is_file() and old.with_suffix(".json").is_file()
    g, info = load_generator(old)  # the same path now resolves to the converted files, silently
    assert info.path == str(new) and info.step == 11 and _same_outputs(g, g1)
    assert "old pickle export" not in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "stackgan.convert", "--to", "safetensors", str(old)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"{new} exists" in r.stderr


def test_an_old_pt_export_that_would_run_code_is_refused(tmp_path):
    from stackgan.export import ExportError, load_generator

    (g1, s1), _ = _generators()
    marker = tmp_path / "ran"
    old = _old_export(tmp_path / "generator.pt", g1, s1, extra=_RunsAShell(marker))
    with pytest.raises(ExportError, match=rf"{old}: cannot read generator export \(UnpicklingError"):
        load_generator(old)
    assert not marker.exists()


def test_slurm_stage2_check_takes_the_old_path_and_names_a_missing_export(tmp_path):
    """``python -m stackgan.cluster resolve`` is what slurm/stage2.sh runs before any rank starts."""
    from stackgan.data.meta import ShardMeta, SplitInfo, write_metadata
    from stackgan.export import save_export

    (g1, s1), _ = _generators()
    shards = tmp_path / "shards"
    shards.mkdir()
    # the check reads the shard set's metadata (no shard file is opened)
    write_metadata(ShardMeta(root=shards, encoder="e", text_dim=16, image_sizes=[76, 304], captions_per_image=1,
                             splits={"train": SplitInfo(num_samples=1, classes=[1])}, class_names={},
                             attributes=[]))
    export = tmp_path / "s1" / "export"
    save_export(export / "generator.safetensors", g1, s1, text_encoder="e", text_dim=16, step=1, config={})

    def resolve(stage1_export):
        return subprocess.run([sys.executable, "-m", "stackgan.cluster", "resolve", "--config",
                               "configs/birds_stage2.yaml", f"data.shards={shards}",
                               f"train.run_dir={tmp_path / 's2'}", f"model.stage1_export={stage1_export}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)

    r = resolve(export / "generator.pt")  # the path a user's old command line still passes
    assert r.returncode == 0, r.stderr
    assert f"STAGE1_EXPORT={export / 'generator.pt'}" in r.stdout
    missing = tmp_path / "none" / "export" / "generator.safetensors"
    r = resolve(missing)
    assert r.returncode == 2 and f"model.stage1_export={missing}: file not found" in r.stderr
