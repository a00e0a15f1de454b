"""The training stream under real torch.distributed (2 processes, gloo on CPU, loader workers).

Each rank runs a collective after every batch, as DDP does, so a rank that ran out of data
would make the other one time out; the ranks' keys are gathered and checked to partition
every epoch and cover the split; a fresh stream started at a saved position must continue
with exactly the batches the uninterrupted run produced.
"""
from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stackgan.data.stream import TrainStream
from tests.test_stream import SIZES, write_shards

WORLD, BATCH, EPOCHS = 2, 3, 4


def _digest(batch: dict) -> str:
    h = hashlib.sha256(batch["img"].contiguous().numpy().tobytes())
    h.update(batch["emb"].numpy().tobytes())
    h.update(json.dumps([batch["key"], batch["caption"]]).encode())
    return h.hexdigest()


def _rank_main(rank: int, root: str, out: str, init: str, local: str, cache: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    kw = dict(batch_size=BATCH, seed=11, rank=rank, world_size=WORLD, shuffle_buffer=5, **cache)
    stream = TrainStream(root, "train", 64, num_workers=2, **kw)
    bpe = stream.batches_per_epoch
    keys, digests = [], []
    it = stream.iterate()
    for _ in range(EPOCHS * bpe):
        b = next(it)
        dist.all_reduce(torch.ones(1))  # one collective per step: unequal counts would hang/time out
        keys.append(b["key"])
        digests.append(_digest(b))
    it.close()
    at = bpe + 1  # restart from a saved position with a fresh stream (other worker count)
    fresh = TrainStream(root, "train", 64, num_workers=0, **kw).iterate(start=at)
    resumed = [_digest(next(fresh)) for _ in range(3)]
    fresh.close()
    kw.pop("cache_dir", None), kw.pop("cache_gb", None)
    plain = TrainStream(local, "train", 64, num_workers=0, **kw).iterate()  # the same rank from the folder
    as_local = [_digest(next(plain)) for _ in digests] == digests
    plain.close()
    gathered: list = [None] * WORLD
    dist.all_gather_object(gathered, {"bpe": bpe, "n": len(keys), "keys": keys, "as_local": as_local,
                                      "restored": resumed == digests[at:at + 3]})
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("where", ["folder", "pipe"])
def test_two_ranks_equal_counts_coverage_and_restore(tmp_path, where):
    """``pipe``: both ranks and their 4 loader workers share one shard cache that holds 2 of the 3
    shards; every rank's batches must be its batches from the folder."""
    root = write_shards(tmp_path / "shards")
    out = tmp_path / "result.json"
    sizes = sorted((root / f"train-{i:06d}.tar").stat().st_size for i in range(len(SIZES)))
    location, cache = str(root), {}
    if where == "pipe":
        location = f"pipe:cat {root}/{{name}}"
        cache = {"cache_dir": str(tmp_path / "cache"), "cache_gb": (sizes[-1] + sizes[-2]) / 1e9}
    mp.spawn(_rank_main, args=(location, str(out), str(tmp_path / "init"), str(root), cache), nprocs=WORLD,
             join=True)
    ranks = json.loads(out.read_text())
    bpe = ranks[0]["bpe"]
    assert bpe == sum(SIZES) // (BATCH * WORLD)
    assert all(r["bpe"] == bpe and r["n"] == EPOCHS * bpe for r in ranks)
    assert all(len(b) == BATCH for r in ranks for b in r["keys"])
    seen: set[str] = set()
    for e in range(EPOCHS):
        union = [k for r in ranks for b in r["keys"][e * bpe:(e + 1) * bpe] for k in b]
        assert len(union) == len(set(union)) == bpe * BATCH * WORLD  # each epoch: a partition
        seen |= set(union)
    assert len(seen) == sum(SIZES)  # over the epochs, every sample is drawn
    assert all(r["restored"] for r in ranks)
    assert all(r["as_local"] for r in ranks)
