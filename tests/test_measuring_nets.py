"""Measuring-net files (stackgan.metrics.netcache): evaluation on read-only shard storage caches
its judge in the user cache folder, files load without running code, earlier files still load.

The shard set and the tiny export are those of ``tests/test_judge.py`` and ``tests/test_metrics.py``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from stackgan.data.meta import load_metadata
from stackgan.metrics import detail as D
from stackgan.metrics import judges as J
from stackgan.metrics import netcache
from tests.test_judge import DIM, ENCODER, eval_shards, trained_judge, write_eval_shards
from tests.test_metrics import _tiny_export

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _read_only_prefix(folder: Path) -> list[str] | None:
    """A command prefix under which ``folder`` is really read-only for the command (we run as
    root, for whom chmod alone changes nothing): a read-only bind mount in a private mount
    namespace, else an unprivileged user after ``chmod a-w``; None when neither works here."""
    bind = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"', str(folder)]
    if shutil.which("unshare"):
        probe = subprocess.run([*bind, "sh", "-c", 'test ! -w "$0" && ! touch "$0/.probe" 2>/dev/null',
                                str(folder)], capture_output=True)
        if probe.returncode == 0:
            return bind
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if shutil.which("setpriv"):
        if subprocess.run([*nobody, sys.executable, "-c", "pass"], capture_output=True).returncode == 0:
            subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
            return nobody
    return None


def test_evaluation_on_read_only_shards_caches_its_judge_in_the_user_cache(tmp_path, tmp_path_factory):
    world = Path(os.environ.get("TMPDIR", "/tmp")) / f"stackgan-ro-{os.getpid()}"  # readable by all users
    shutil.rmtree(world, ignore_errors=True)
    world.mkdir(mode=0o777)
    try:
        # 2 images per species: evaluate trains its judge at the default length (300 steps) on
        # every training image per step, so a small set keeps that short; what is checked here
        # is where the judge goes, not how good it is (tests/test_judge.py checks that)
        shards = write_eval_shards(world / "shards", per_train=2, per_test=2)
        export = _tiny_export(world / "run" / "export" / "generator.pt", ENCODER, DIM)
        for d in (world / "cache", world / "home", world / "run"):
            d.mkdir(exist_ok=True)
            d.chmod(0o777)
        before = sorted(p.name for p in shards.iterdir())
        prefix = _read_only_prefix(shards)
        if prefix is None:
            pytest.skip("cannot make a folder read-only for a subprocess here (no unshare + bind mount, "
                        "no setpriv to an unprivileged user who can run this Python)")
        env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(world / "cache"),
               "HOME": str(world / "home"), "OMP_NUM_THREADS": "1"}
        cmd = [*prefix, sys.executable, "-m", "stackgan.evaluate", "--export", str(export), "--shards",
               str(shards), "--metrics", "judge_consistency", "--judge-samples", "16", "--batch-size", "16",
               "--jsonl", str(world / "run" / "metrics.jsonl")]  # the default device: auto
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=world)
        assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
        meta = load_metadata(shards)
        cached = world / "cache" / "stackgan" / netcache.metadata_fingerprint(meta) / "judge.pt"
        assert cached.is_file(), p.stdout
        assert f"no species judge at {cached}" in p.stdout  # trained there, said where
        assert sorted(x.name for x in shards.iterdir()) == before  # nothing written into the data
        assert "judge_consistency: train" in p.stdout and (world / "run" / "metrics.jsonl").is_file()
        # later runs find it there (the shard folder has no judge), and it is a real species judge
        assert J.choose_judge(shards, "", meta, world / "cache" / "stackgan").path == cached
        assert J.load_judge(cached, attributes=meta.attributes).kind == "species"
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(world)])
        shutil.rmtree(world, ignore_errors=True)


def test_cache_folder_rules(tmp_path, tmp_path_factory, monkeypatch):
    shards = eval_shards(tmp_path_factory)
    meta = load_metadata(shards)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert netcache.user_cache_dir() == tmp_path / "xdg" / "stackgan"
    assert netcache.user_cache_dir(tmp_path / "mine") == tmp_path / "mine"
    # writable shard folder: the file belongs there; an explicit path always wins
    assert netcache.cache_path(meta, "judge.pt") == Path(shards) / "judge.pt"
    assert netcache.cache_path(meta, "judge.pt", tmp_path / "x.pt") == tmp_path / "x.pt"
    # a net already in the cache folder (trained while the shards were read-only) is found there
    fp = netcache.metadata_fingerprint(meta)
    (tmp_path / "xdg" / "stackgan" / fp).mkdir(parents=True)
    (tmp_path / "xdg" / "stackgan" / fp / "judge.pt").write_bytes(b"")
    assert netcache.cache_path(meta, "judge.pt") == tmp_path / "xdg" / "stackgan" / fp / "judge.pt"
    # keyed by the shards: another shard set (other metadata) has another folder
    other = write_eval_shards(tmp_path / "other", per_train=3, per_test=2, seed=1)
    assert netcache.metadata_fingerprint(load_metadata(other)) != fp


class _RunsCode:
    """Loading a pickle of this creates ``marker``: what weights_only must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_measuring_net_files_run_no_code_when_read(tmp_path, tmp_path_factory):
    judge = J.load_judge(trained_judge(tmp_path_factory))
    marker = tmp_path / "ran"
    bad = {"format": J.FORMAT, "kind": "species", "net": judge.net.config(),
           "state_dict": judge.net.state_dict(), "attributes": judge.attributes, "groups": judge.groups,
           "holdout_mod": judge.holdout_mod,
           "prior": judge.prior, "report": None, "trained_on": {"x": _RunsCode(marker)}}
    torch.save(bad, tmp_path / "judge.pt")
    with pytest.raises(J.JudgeError, match="cannot read judge file"):
        J.load_judge(tmp_path / "judge.pt")
    torch.save({"format": D.FORMAT, "payload": _RunsCode(marker)}, tmp_path / "detail.pt")
    with pytest.raises(D.DetailNetError, match="cannot read detail-net file"):
        D.load_detail_net(tmp_path / "detail.pt")
    assert not marker.exists()
    torch.load(tmp_path / "detail.pt", weights_only=False)  # the file does run code when unpickled
    assert marker.exists()


def test_judge_files_written_before_netcache_still_load(tmp_path, tmp_path_factory):
    """The earlier writer pickled numpy scalars in the report (round(np.float64, 4)): still read."""
    new = J.load_judge(trained_judge(tmp_path_factory))
    report = {k: (np.float64(v) if isinstance(v, float) else
                  {g: np.float64(x) for g, x in v.items()} if isinstance(v, dict) else v)
              for k, v in asdict(new.report).items()}
    old = {"format": J.FORMAT, "kind": "species", "net": new.net.config(),
           "state_dict": {k: v.detach().cpu() for k, v in new.net.state_dict().items()},
           "attributes": new.attributes, "groups": new.groups, "holdout_mod": new.holdout_mod,
           "prior": new.prior.cpu(), "report": report, "trained_on": new.trained_on}
    torch.save(old, tmp_path / "judge.pt")
    back = J.load_judge(tmp_path / "judge.pt")
    assert back.report == new.report and back.groups == new.groups
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(back(x)[0], new(x)[0])
    # and a file written now holds no numpy objects: plain torch.load(weights_only=True) reads it
    new.save(tmp_path / "again.pt")
    assert torch.load(tmp_path / "again.pt", weights_only=True)["report"] == asdict(new.report)


def test_detail_net_files_written_before_netcache_still_load(tmp_path):
    torch.manual_seed(0)
    net = D.DetailNet(3, 8)
    old = {"format": D.FORMAT, "state_dict": net.state_dict(), "width": 8, "classes": [4, 9, 17],
           "report": None, "shards": {"root": "/data/shards", "fingerprint": "0123456789abcdef"}}
    torch.save(old, tmp_path / "detail256.pt")  # the earlier writer: no top-level fingerprint
    back = D.load_detail_net(tmp_path / "detail256.pt")
    assert back.classes == [4, 9, 17] and back.trained_on["root"] == "/data/shards"
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    assert torch.equal(back(x).features, net.eval()(x).features)
