"""Shards on object storage: a real local HTTP server and ``pipe:`` commands, through the bounded cache.

The remote stream must give exactly the local folder's batches with a cache smaller than the
data set (so shards are evicted and fetched again), never hold more than its bound (polled
while it runs), refuse a shard whose bytes do not match metadata.json's sha256 (naming it,
leaving no partial file), and a training run over HTTP killed with SIGKILL must resume onto
an uninterrupted run's per-step record.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stackgan.cluster.jobs import check_train_config
from stackgan.config import load_config
from stackgan.data.meta import ShardError, load_metadata
from stackgan.data.shardcache import ShardCache, ShardFiles
from stackgan.data.storage import parse
from stackgan.data.stream import TrainStream, load_fixed_samples
from stackgan.metrics.evalset import load_split
from stackgan.run import check_inputs

from .conftest import ROOT, run_cmd
from .test_stream import SIZES, same, take, write_shards
from .test_train import assert_same_state, final_state, kill_at_checkpoint, log_records, train_args


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder served by ``python -m http.server`` on 127.0.0.1 (a free port chosen by the server)."""
    root = tmp_path_factory.mktemp("served")
    cmd = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    m = re.search(r"port (\d+)", line)
    assert m, f"http.server said {line!r}"
    yield root, f"http://127.0.0.1:{m.group(1)}"
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="module")
def remote_set(served):
    """The test_stream shard set, as a folder and behind the server."""
    root, url = served
    return write_shards(root / "set"), f"{url}/set"


def shard_bytes(folder: Path, split: str = "train") -> list[int]:
    return [(folder / s.name).stat().st_size for s in load_metadata(folder).splits[split].shards]


class Peak:
    """Polls a cache folder's size (through the cache lock) while a run goes on; the highest seen."""

    def __init__(self, folder: Path, bound: int):
        self.cache, self.peak, self.samples = ShardCache(folder, bound), 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.cache.usage())
            self.samples += 1
            time.sleep(0.002)

    def __enter__(self) -> "Peak":
        self._t.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._t.join()


def no_partial_files(folder: Path) -> bool:
    """No temp file of a download is left (a new cache user would remove those of dead writers,
    so none is left to be removed either)."""
    return not [p for p in folder.iterdir() if p.name.startswith(".part-")]


# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("form,workers", [("http", 0), ("http", 2), ("pipe", 0)])
def test_remote_batches_equal_local_with_a_small_cache(remote_set, tmp_path, form, workers):
    folder, url = remote_set
    location = url if form == "http" else f"pipe:cat {folder}/{{name}}"
    sizes = shard_bytes(folder)
    bound = max(sizes) + min(sizes)  # one shard in use + one more: less than the data set
    assert bound < sum(sizes)
    cache = tmp_path / "cache"
    kw = dict(batch_size=4, seed=3, shuffle_buffer=6)
    local = TrainStream(str(folder), "train", 64, **kw)
    n = 3 * local.batches_per_epoch  # three epochs: every shard is needed again after its eviction
    with Peak(cache, bound) as peak:
        remote = TrainStream(location, "train", 64, num_workers=workers, cache_dir=str(cache),
                             cache_gb=bound / 1e9, **kw)
        got = take(remote, n)
    want = take(local, n)
    assert all(same(a, b) for a, b in zip(want, got))
    assert take(remote, 2, start=n - 2)[1]["key"] == want[-1]["key"]  # restart at a batch: the same batch
    assert peak.samples > 10 and 0 < peak.peak <= bound, (peak.peak, bound)
    assert no_partial_files(cache)
    fixed = load_fixed_samples(location, "train", 5, 64, cache_dir=str(cache), cache_gb=bound / 1e9)
    assert fixed["key"] == load_fixed_samples(str(folder), "train", 5, 64)["key"]


def test_corrupt_shard_over_http_is_named_and_leaves_no_partial_file(served, tmp_path):
    root, url = served
    bad = write_shards(root / "corrupt")
    shard = bad / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a JPEG: the tar itself still reads
    shard.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    kw = dict(batch_size=4, seed=3, cache_dir=str(cache), cache_gb=0.01)
    stream = TrainStream(f"{url}/corrupt", "train", 64, **kw)
    with pytest.raises(ShardError, match=r"corrupt/train-000001\.tar: sha256 .* does not match metadata"):
        take(stream, stream.batches_per_epoch)
    assert no_partial_files(cache)
    assert not [p for p in cache.iterdir() if p.name.endswith("train-000001.tar")]
    # skip mode: that shard's samples are replaced, the others still come through the cache
    skip = TrainStream(f"{url}/corrupt", "train", 64, on_corrupt="skip", **kw)
    keys = {k for b in take(skip, skip.batches_per_epoch) for k in b["key"]}
    assert skip.skipped > 0 and keys and not any(int(k.rsplit("_", 1)[1]) in range(7, 12) for k in keys)
    assert no_partial_files(cache)


def test_cache_evicts_least_recently_used_never_one_in_use(remote_set, tmp_path):
    folder, url = remote_set
    meta = load_metadata(url)
    shards = [(s.name, s.sha256) for s in meta.splits["train"].shards]
    sizes = shard_bytes(folder)
    assert sizes[1] < sizes[2]
    files = ShardFiles(parse(url), tmp_path / "c", (sizes[0] + sizes[2] + 10) / 1e9)  # 0+1 or 0+2, not all
    pin0 = files.open(*shards[0])
    files.open(*shards[1]).close()
    (tmp_path / "c" / ".part-999999-1-dead").write_bytes(b"x" * 100)  # a writer killed mid-download
    pin2 = files.open(*shards[2])  # needs room: 1 (not in use) goes, 0 (in use) stays
    assert files.cached(*shards[0]) and not files.cached(*shards[1]) and files.cached(*shards[2])
    assert no_partial_files(tmp_path / "c")
    assert os.pread(pin0.fd, 512, 0)[:1] != b"" and files.cache.usage() <= files.cache.bound
    pin0.close()
    pin2.close()
    with pytest.raises(ShardError, match="more than the whole shard cache"):
        ShardFiles(parse(url), tmp_path / "tiny", 1000 / 1e9).open(*shards[0])


def test_url_forms_for_metadata_trainer_launcher_and_evaluation(remote_set, tmp_path, monkeypatch):
    folder, url = remote_set
    for loc in (url, url + "/", f"file://{folder}", f"pipe:cat {folder}/{{name}}"):
        assert load_metadata(loc).splits["train"].num_samples == sum(SIZES)
    with pytest.raises(ShardError, match=r"nothere/metadata\.json not found"):
        load_metadata(url.replace("/set", "/nothere"))
    with pytest.raises(ShardError, match="unsupported scheme 's3'"):
        load_metadata("s3://bucket/set")
    with pytest.raises(ShardError, match="cat: .*metadata.json"):
        load_metadata(f"pipe:cat {tmp_path}/{{name}}")
    config = str(ROOT / "configs/birds_stage1.yaml")
    over = [f"data.shards={url}", f"data.cache_dir={tmp_path / 'c'}", "data.cache_gb=0.01"]
    refused = r"attr_coef=\S+ needs attribute labels: http://.*/set/metadata\.json"
    with pytest.raises(ShardError, match=refused):
        check_inputs(load_config(config, over))  # the config's attribute head on a set without labels
    over.append("loss.attr_coef=0")
    assert check_inputs(load_config(config, over)).splits["train"].num_samples == sum(SIZES)
    assert check_train_config(config, over).data.shards == url
    monkeypatch.setenv("STACKGAN_SHARD_CACHE", str(tmp_path / "eval-cache"))  # evaluation's cache folder
    remote = load_split(load_metadata(url), "train", image=76)
    local = load_split(load_metadata(folder), "train", image=76)
    assert remote.keys == local.keys and (remote.img == local.img).all() and (remote.emb == local.emb).all()
    assert len([p for p in (tmp_path / "eval-cache").iterdir() if p.name.endswith(".tar")]) == len(SIZES)


def test_training_over_http_resumes_exactly_after_sigkill(tiny_shards, served, tmp_path):
    """``python -m stackgan.train`` with data.shards=http://..., a cache smaller than the train split,
    killed with SIGKILL after its first checkpoint and resumed: the per-step record and the final
    state are an uninterrupted local-folder run's."""
    root, url = served
    shutil.copytree(tiny_shards, root / "tiny")
    sizes = shard_bytes(tiny_shards)
    bound = 2 * max(sizes) + 4096
    assert bound < sum(sizes), "the cache must be smaller than the data set"
    n = 8
    common = [f"train.steps={2 * n}", f"train.ckpt_every={n}", "data.shuffle_buffer=8"]
    ref = tmp_path / "ref"
    p = run_cmd(train_args(tiny_shards, ref, *common))
    assert p.returncode == 0, p.stderr[-3000:]

    cache, run = tmp_path / "cache", tmp_path / "killed"
    args = [*common, f"data.cache_dir={cache}", f"data.cache_gb={bound / 1e9}", "data.num_workers=2"]
    with Peak(cache, bound) as peak:
        kill_at_checkpoint(train_args(f"{url}/tiny", run, *args), run, n)
        p = run_cmd(train_args(f"{url}/tiny", run, *args, "--resume", "auto"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    assert 0 < peak.peak <= bound and no_partial_files(cache)
    keep = lambda r: {k: v for k, v in r.items() if k not in ("time", "img_per_s", "mem_mb")}  # noqa: E731
    want = [keep(r) for r in log_records(ref) if "loss_d" in r]
    got = list({r["step"]: keep(r) for r in log_records(run) if "loss_d" in r}.values())  # resumed run's last
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    assert_same_state(final_state(ref), final_state(run))
