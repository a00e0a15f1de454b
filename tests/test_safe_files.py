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
