"""Training stream: contents, augmentation, determinism, exact restore, rank balance, bad shards.

The fixture writes real tar shards in the format of ``stackgan/data/meta.py`` whose contents
can be checked from a batch: each image is a gradient (red = x, green = y) so the crop
offset and the flip can be read back, its blue level encodes the sample id, and embedding
row ``c`` is one-hot in dimension ``c`` with the sample id in dimension 10.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from stackgan.data.captions import caption_groups, stated_mask
from stackgan.data.meta import ShardError, ShardInfo, ShardMeta, SplitInfo, load_metadata, write_metadata
from stackgan.data.tario import index_tar, read_fields
from stackgan.data.stream import TrainStream, load_fixed_samples, to_unit_range

TEXT_DIM = 12
SIZES = (7, 5, 9)  # unequal shard sizes on purpose; N = 21


def blue(g: int) -> int:
    return 20 + (g * 37) % 200


def sample_id(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


def gradient(size: int, g: int) -> np.ndarray:
    ramp = np.arange(size) * (225.0 / (size - 1))
    arr = np.empty((size, size, 3), np.uint8)
    arr[..., 0] = np.round(ramp)[None, :]
    arr[..., 1] = np.round(ramp)[:, None]
    arr[..., 2] = blue(g)
    return arr


def _jpeg(size: int, g: int, fmt: str = "jpg") -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(gradient(size, g)).save(buf, "PNG")
    else:
        Image.fromarray(gradient(size, g)).save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue()


ATTRIBUTES = ["has_crown_color::red", "has_crown_color::blue", "has_wing_color::red", "has_wing_color::blue"]


def attr_of(g: int) -> list[int]:
    """Sample g's labels: crown red when g is odd, wings red when 3 divides g (else blue)."""
    return [g % 2, 1 - g % 2, int(g % 3 == 0), int(g % 3 != 0)]


def caption_of(c: int, key: str, g: int) -> str:
    """Caption c of sample g in an attribute set: states the crown (c % 3 == 0), the wings (1),
    nothing (2)."""
    crown, wing = ("red" if g % 2 else "blue"), ("red" if g % 3 == 0 else "blue")
    said = (f"a bird with a {crown} crown", f"it has {wing} wings", "a small bird")[c % 3]
    return f"caption {c} of {key}: {said}"


def write_shards(root: Path, sizes=SIZES, split: str = "train", key_prefix: str = "",
                 fmt: str = "jpg", attributes: bool = False) -> Path:
    """Shards + metadata.json exactly as meta.py describes them; ``attributes``: with
    ``attr.npy`` labels (:func:`attr_of`) and captions that state some of them (:func:`caption_of`)."""
    root.mkdir(parents=True, exist_ok=True)
    infos, g, classes = [], 0, set()
    for s, n in enumerate(sizes):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for _ in range(n):
                cls = 1 + g % 5
                classes.add(cls)
                key = f"{cls:03d}.Bird_{cls}/Bird_{g:04d}"
                emb = np.zeros((10, TEXT_DIM), np.float32)
                emb[np.arange(10), np.arange(10)] = 1.0
                emb[:, 10], emb[:, 11] = g, cls
                npy = io.BytesIO()
                np.save(npy, emb)
                sample = {
                    "__key__": f"{key_prefix}s{g:07d}",
                    "name.txt": key.encode(),
                    f"76.{fmt}": _jpeg(76, g, fmt),
                    f"304.{fmt}": _jpeg(304, g, fmt),
                    "emb.npy": npy.getvalue(),
                    "txt.json": json.dumps([f"caption {c} of {key}" for c in range(10)]).encode(),
                    "cls": str(cls).encode(),
                }
                if attributes:
                    at = io.BytesIO()
                    np.save(at, np.array(attr_of(g), np.uint8))
                    sample["attr.npy"] = at.getvalue()
                    sample["txt.json"] = json.dumps([caption_of(c, key, g) for c in range(10)]).encode()
                w.write(sample)
                g += 1
        sha = hashlib.sha256((root / name).read_bytes()).hexdigest()
        infos.append(ShardInfo(name=name, num_samples=n, sha256=sha))
    write_metadata(ShardMeta(
        root=root, encoder="test-onehot", text_dim=TEXT_DIM, image_sizes=[76, 304], captions_per_image=10,
        splits={split: SplitInfo(num_samples=sum(sizes), classes=sorted(classes), shards=infos)},
        class_names={c: f"{c:03d}.Bird_{c}" for c in classes}, attributes=ATTRIBUTES if attributes else [],
    ))
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"))


def take(stream: TrainStream, n: int, start: int = 0) -> list[dict]:
    it = stream.iterate(start)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def same(a: dict, b: dict) -> bool:
    return (a["key"] == b["key"] and a["caption"] == b["caption"] and torch.equal(a["img"], b["img"])
            and torch.equal(a["emb"], b["emb"]) and torch.equal(a["cls"], b["cls"]))


def crop_of(img: torch.Tensor, src: int) -> tuple[float, float, bool]:
    """Crop origin (x, y) and flip read back from the gradient image."""
    scale = 225.0 / (src - 1)
    r, gr = (img[0] + 1) * 127.5, (img[1] + 1) * 127.5
    cols = torch.arange(img.shape[-1], dtype=torch.float32)
    row = r.mean(0)
    flipped = bool(row[-1] < row[0])
    if flipped:
        row = row.flip(0)
    x = float((row / scale - cols).mean())
    y = float((gr.mean(1) / scale - cols).mean())
    return x, y, flipped


# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,src", [(64, 76), (256, 304)])
def test_batch_contents_crop_and_flip(shards, size, src):
    stream = TrainStream(str(shards), "train", size, batch_size=4, seed=1)
    origins, flips = set(), []
    for b in take(stream, 5 if size == 64 else 2):
        assert b["img"].shape == (4, 3, size, size) and b["img"].dtype == torch.float32
        assert b["img"].min() >= -1 and b["img"].max() <= 1
        assert b["emb"].shape == (4, TEXT_DIM) and b["emb"].dtype == torch.float32
        assert b["cls"].dtype == torch.int64 and len(b["key"]) == len(b["caption"]) == 4
        for i, key in enumerate(b["key"]):
            g = sample_id(key)
            x, y, flip = crop_of(b["img"][i], src)
            tol = 0.3 if size == 64 else 1.0
            assert -tol <= x <= src - size + tol and -tol <= y <= src - size + tol, (x, y)
            assert abs(x - round(x)) < tol and abs(y - round(y)) < tol, (x, y)
            origins.add((round(x), round(y)))
            flips.append(flip)
            assert abs(float((b["img"][i, 2].mean() + 1) * 127.5) - blue(g)) < 4  # image belongs to key
            emb = b["emb"][i]
            assert emb[10] == g and emb[11] == b["cls"][i] == 1 + g % 5
            c = int(emb[:10].argmax())
            assert emb[:10].sum() == 1 and b["caption"][i] == f"caption {c} of {key}"
    assert any(flips) and not all(flips)
    assert len(origins) > 3


def test_mean_of_k_embeddings(shards):
    stream = TrainStream(str(shards), "train", 64, batch_size=8, seed=2, emb_mode="mean", emb_k=4)
    for b in take(stream, 2):
        for i, key in enumerate(b["key"]):
            e = b["emb"][i, :10]
            chosen = torch.nonzero(e).flatten().tolist()
            assert len(chosen) == 4 and torch.allclose(e[chosen], torch.full((4,), 0.25))
            assert b["emb"][i, 10] == sample_id(key)
            first = int(b["caption"][i].split()[1])
            assert first in chosen
    one = take(TrainStream(str(shards), "train", 64, batch_size=8, seed=2), 1)[0]
    assert (one["emb"][:, :10] == 1).sum() == 8


def test_attribute_labels_and_the_groups_each_caption_states(shards, tmp_path):
    """``attributes=True``: each row's attr.npy labels, and the groups its chosen caption states
    (with the mean of k embeddings, what any of the k captions states); the same batches
    otherwise. Shards without attributes are refused before anything is read."""
    root = write_shards(tmp_path / "attr", attributes=True)
    groups = caption_groups(ATTRIBUTES)
    patterns = set()
    for mode, k in (("one", 1), ("mean", 4)):
        stream = TrainStream(str(root), "train", 64, batch_size=6, seed=3, emb_mode=mode, emb_k=k,
                             attributes=True)
        plain = take(TrainStream(str(root), "train", 64, batch_size=6, seed=3, emb_mode=mode, emb_k=k), 3)
        for b, p in zip(take(stream, 3), plain):
            assert same(b, p) and "attr" not in p
            assert b["attr"].dtype == torch.uint8 and b["stated"].dtype == torch.bool
            assert b["attr"].shape == b["stated"].shape == (6, len(ATTRIBUTES))
            for i, key in enumerate(b["key"]):
                g = int(b["emb"][i, 10])
                assert b["attr"][i].tolist() == attr_of(g)
                chosen = torch.nonzero(b["emb"][i, :10]).flatten().tolist()
                assert len(chosen) == k
                want = np.logical_or.reduce([stated_mask(caption_of(c, key, g), groups, len(ATTRIBUTES))
                                             for c in chosen])
                assert b["stated"][i].tolist() == want.tolist()
                if mode == "one":
                    patterns.add(tuple(want.tolist()))
    assert patterns == {(True, True, False, False), (False, False, True, True), (False, False, False, False)}
    with pytest.raises(ShardError, match="no attributes"):
        TrainStream(str(shards), "train", 64, batch_size=4, seed=0, attributes=True)


@pytest.mark.parametrize("workers", [0, 2])
def test_determinism_and_exact_restore(shards, workers):
    kw = dict(batch_size=4, seed=3, shuffle_buffer=6)
    ref = take(TrainStream(str(shards), "train", 64, **kw), 12)  # bpe = 5: crosses two epochs
    stream = TrainStream(str(shards), "train", 64, num_workers=workers, **kw)
    assert stream.batches_per_epoch == 5
    rng = torch.get_rng_state()
    got = take(stream, 12)
    assert torch.equal(rng, torch.get_rng_state())  # the trainer's RNG is left alone
    assert all(same(a, b) for a, b in zip(ref, got))  # also: independent of num_workers
    for k in (1, 4, 5, 9):  # mid-epoch, last of an epoch, first of the next
        resumed = take(stream, 3, start=k)
        assert all(same(a, b) for a, b in zip(ref[k:k + 3], resumed)), k
    other = take(TrainStream(str(shards), "train", 64, batch_size=4, seed=4, shuffle_buffer=6), 3)
    assert not all(same(a, b) for a, b in zip(ref, other))


def test_uint8_images_normalise_to_the_same_batches(shards):
    kw = dict(batch_size=4, seed=8)
    ref = take(TrainStream(str(shards), "train", 256, **kw), 2)
    raw = take(TrainStream(str(shards), "train", 256, num_workers=2, img_dtype="uint8", **kw), 2)
    for a, b in zip(ref, raw):
        assert b["img"].dtype == torch.uint8 and a["key"] == b["key"]
        assert torch.equal(to_unit_range(b["img"]), a["img"])


def test_position_and_signature(shards):
    stream = TrainStream(str(shards), "train", 64, batch_size=4, seed=0, num_workers=0)
    it = stream.iterate(start=7)
    next(it), next(it)
    assert stream.position == 9
    sig = TrainStream(str(shards), "train", 64, batch_size=4, seed=0, num_workers=2).signature()
    assert sig == stream.signature()
    assert sig != TrainStream(str(shards), "train", 64, batch_size=4, seed=0, world_size=2).signature()


@pytest.mark.parametrize("world,batch", [(3, 2), (3, 7), (2, 3)])
def test_ranks_equal_and_partition_each_epoch(shards, world, batch):
    n = sum(SIZES)
    streams = [TrainStream(str(shards), "train", 64, batch_size=batch, seed=5, rank=r, world_size=world,
                           shuffle_buffer=4) for r in range(world)]
    bpe = streams[0].batches_per_epoch
    assert bpe == n // (batch * world) and all(s.batches_per_epoch == bpe for s in streams)
    epochs = 4
    keys = [[k for b in take(s, epochs * bpe) for k in b["key"]] for s in streams]
    seen, per_rank_sets = set(), []
    for e in range(epochs):
        chunk = [ks[e * bpe * batch:(e + 1) * bpe * batch] for ks in keys]
        union = [k for c in chunk for k in c]
        assert len(union) == len(set(union)) == bpe * batch * world  # a partition, no repeats
        seen |= set(union)
        per_rank_sets.append(frozenset(chunk[0]))
    assert len(seen) == n  # the dropped remainder differs between epochs
    assert len(set(per_rank_sets)) > 1  # a rank does not keep the same samples every epoch


def test_shuffle_window(shards):
    n = sum(SIZES)
    full = take(TrainStream(str(shards), "train", 64, batch_size=3, seed=10, shuffle_buffer=0), 7)
    same_n = take(TrainStream(str(shards), "train", 64, batch_size=3, seed=10, shuffle_buffer=n), 7)
    assert all(same(a, b) for a, b in zip(full, same_n))  # 0 = the whole split
    ids = [sample_id(k) for b in take(TrainStream(str(shards), "train", 64, batch_size=3, seed=10,
                                                  shuffle_buffer=1), 7) for k in b["key"]]
    runs = [[ids[0]]]  # no shuffling: whole shards in the epoch's shard order
    for g in ids[1:]:
        if g == runs[-1][-1] + 1:
            runs[-1].append(g)
        else:
            runs.append([g])
    assert sorted(len(r) for r in runs) == sorted(SIZES) and len(ids) == n
    assert [r[0] for r in runs] != [0, 7, 12]  # the shard order itself is shuffled (seed 10)


def test_split_smaller_than_global_batch(shards):
    stream = TrainStream(str(shards), "train", 64, batch_size=16, seed=6, rank=1, world_size=2)
    assert stream.batches_per_epoch == 1
    b0, b1 = take(stream, 2)
    assert len(b0["key"]) == 16 and len(b1["key"]) == 16
    other = take(TrainStream(str(shards), "train", 64, batch_size=16, seed=6, rank=0, world_size=2), 1)[0]
    assert len(set(b0["key"]) | set(other["key"])) == sum(SIZES)  # 32 draws cover all 21


def test_fixed_samples(shards):
    a = load_fixed_samples(str(shards), "train", 9, 64)
    total = sum(SIZES)
    assert [sample_id(k) for k in a["key"]] == [i * total // 9 for i in range(9)]  # spread evenly
    for i in range(9):
        x, y, flip = crop_of(a["img"][i], 76)
        assert abs(x - 6) < 0.3 and abs(y - 6) < 0.3 and not flip
        assert a["caption"][i] == f"caption 0 of {a['key'][i]}" and a["emb"][i, 0] == 1
    b = load_fixed_samples(str(shards), "train", 9, 64)
    assert torch.equal(a["img"], b["img"])
    assert len(load_fixed_samples(str(shards), "train", 100, 256)["key"]) == sum(SIZES)


def test_bad_arguments(shards):
    with pytest.raises(ValueError, match="image_size"):
        TrainStream(str(shards), "train", 128, batch_size=4, seed=0)
    with pytest.raises(ShardError, match="no split 'val'"):
        TrainStream(str(shards), "val", 64, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="emb_k"):
        TrainStream(str(shards), "train", 64, batch_size=4, seed=0, emb_mode="mean", emb_k=11)
    with pytest.raises(ValueError, match="rank"):
        TrainStream(str(shards), "train", 64, batch_size=4, seed=0, rank=2, world_size=2)
    with pytest.raises(ShardError, match="metadata.json"):
        TrainStream(str(shards / "nope"), "train", 64, batch_size=4, seed=0)


def test_long_member_names_pax_headers(shards, tmp_path):
    """Names over 100 characters need pax headers: read through the tarfile fallback."""
    root = write_shards(tmp_path / "long", key_prefix="k" * 120)
    long = take(TrainStream(str(root), "train", 64, batch_size=4, seed=9), 3)
    short = take(TrainStream(str(shards), "train", 64, batch_size=4, seed=9), 3)
    assert all(same(a, b) for a, b in zip(short, long))


def test_png_images_found_by_their_size(shards, tmp_path):
    """Shards with ``76.png`` / ``304.png``: the stream and the evaluation set both take the image
    of the size they need, decoded losslessly (exactly the drawn gradient)."""
    from stackgan.metrics.evalset import load_split

    root = write_shards(tmp_path / "png", fmt="png")
    fixed = load_fixed_samples(str(root), "train", 4, 64)
    for img, key in zip(fixed["img"], fixed["key"]):
        want = gradient(76, sample_id(key))[6:70, 6:70].transpose(2, 0, 1)
        assert torch.equal(((img + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(want))
    png = take(TrainStream(str(root), "train", 256, batch_size=4, seed=2), 2)
    jpg = take(TrainStream(str(shards), "train", 256, batch_size=4, seed=2), 2)
    assert [b["key"] for b in png] == [b["key"] for b in jpg]
    data = load_split(load_metadata(root), "train", image=304, crop=False)
    assert all((img == gradient(304, int(k[1:]))).all() for img, k in zip(data.img, data.keys))  # s0000123
    both = tmp_path / "both"  # a sample holding two 76px images is refused, naming both
    both.mkdir()
    with wds.TarWriter(str(both / "x.tar")) as w:
        w.write({"__key__": "s0", "76.jpg": _jpeg(76, 0), "76.png": _jpeg(76, 0, "png")})
    fd = os.open(both / "x.tar", os.O_RDONLY)
    try:
        with pytest.raises(ShardError, match=r"x\.tar: sample 's0': several 76px images \(76\.jpg, 76\.png"):
            read_fields(fd, index_tar(fd, str(both / "x.tar")), 0, ("76.jpg",))
    finally:
        os.close(fd)


def test_pipe_location_needs_name(shards):
    """The old ``pipe:cat DIR`` form (file name appended) is refused with the form to use."""
    with pytest.raises(ShardError, match=r"needs \{name\}"):
        TrainStream(f"pipe:cat {shards}", "train", 64, batch_size=4, seed=7)


# ------------------------------------------------------------------------------------
# Corrupt input
# ------------------------------------------------------------------------------------
@pytest.fixture()
def truncated(tmp_path) -> tuple[Path, Path]:
    root = write_shards(tmp_path / "bad")
    bad = root / "train-000002.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: int(len(data) * 0.55)])
    return root, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_raises_naming_it(truncated, workers):
    root, bad = truncated
    stream = TrainStream(str(root), "train", 64, batch_size=4, seed=0, num_workers=workers)
    with pytest.raises(ShardError, match="train-000002.tar"):
        take(stream, 2 * stream.batches_per_epoch)


def test_missing_shard_raises_before_training(tmp_path):
    root = write_shards(tmp_path / "m")
    (root / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match="train-000001.tar"):
        TrainStream(str(root), "train", 64, batch_size=4, seed=0)


def test_corrupt_jpeg_names_shard_and_sample(tmp_path):
    root = write_shards(tmp_path / "j", sizes=(3,))
    path = root / "train-000000.tar"
    with tarfile.open(path) as tf:
        at = tf.getmember("s0000000.76.jpg").offset_data
    data = bytearray(path.read_bytes())
    data[at:at + 600] = b"\x00" * 600  # wipe the JPEG header of the first sample's 76.jpg
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000000.tar: sample 's0000000'"):
        take(TrainStream(str(root), "train", 64, batch_size=3, seed=0), 1)
    stream = TrainStream(str(root), "train", 64, batch_size=3, seed=0, on_corrupt="skip")
    b = take(stream, 1)[0]
    assert stream.skipped == 1 and len(b["key"]) == 3 and "000.Bird_0" not in " ".join(b["key"])


def readable_ids(path: Path) -> set[int]:
    """Ids of the samples whose needed members can be read in full from a damaged tar."""
    members: dict[str, set[str]] = {}
    with tarfile.open(path, "r|") as tf:
        try:
            for ti in tf:
                key, ext = ti.name.split(".", 1)
                data = tf.extractfile(ti).read()
                if len(data) == ti.size:
                    members.setdefault(key, set()).add(ext)
        except tarfile.ReadError:
            pass
    need = {"name.txt", "76.jpg", "emb.npy", "txt.json", "cls"}
    return {int(k[1:]) for k, exts in members.items() if need <= exts}


def test_skip_mode_counts_and_keeps_batches_equal(truncated, shards, caplog):
    root, bad = truncated
    kw = dict(batch_size=4, seed=0, on_corrupt="skip", shuffle_buffer=8)
    caplog.set_level(logging.WARNING, logger="stackgan.data.stream")
    stream = TrainStream(str(root), "train", 64, **kw)
    n = 3 * stream.batches_per_epoch
    batches = take(stream, n)
    assert all(len(b["key"]) == 4 and b["img"].shape[0] == 4 for b in batches)
    ok = readable_ids(bad)
    lost = set(range(12, 21)) - ok  # shard 2 holds ids 12..20
    assert 0 < len(ok) < 9 and lost
    drawn = [sample_id(k) for b in batches for k in b["key"]]
    assert not lost & set(drawn)  # holes are filled with readable samples
    intact = [sample_id(k) for b in take(TrainStream(str(shards), "train", 64, **kw), n) for k in b["key"]]
    assert stream.skipped == sum(g in lost for g in intact) > 0  # every planned lost sample counted
    assert "train-000002.tar" in caplog.text
    # the same stream with loader workers: same batches, same count
    par = TrainStream(str(root), "train", 64, num_workers=2, **kw)
    pb = take(par, len(batches))
    assert all(same(a, b) for a, b in zip(batches, pb)) and par.skipped == stream.skipped


def test_bench_data_runs_every_loader(shards, tmp_path):
    """The benchmark script end to end on tiny inputs, remote mode included (speeds are not checked,
    only produced; the cache's measured peak must respect its bound, and shards must have been
    downloaded)."""
    from stackgan.bench import data as bench_data

    cub = tmp_path / "CUB_200_2011"
    (cub / "images" / "001.A").mkdir(parents=True)
    lines, boxes = [], []
    for i in range(1, 5):
        Image.fromarray(np.full((90, 120, 3), 40 * i, np.uint8)).save(cub / "images" / "001.A" / f"A_{i}.jpg")
        lines.append(f"{i} 001.A/A_{i}.jpg")
        boxes.append(f"{i} 10.0 12.5 60.0 50.0")
    (cub / "images.txt").write_text("\n".join(lines) + "\n")
    (cub / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    out = tmp_path / "bench.json"
    shards = write_shards(tmp_path / "eight", sizes=(3,) * 8)  # a quarter of the set holds two shards
    assert bench_data.main(["--shards", str(shards), "--cub-root", str(cub), "--out", str(out), "--sizes", "64",
                            "--workers", "0", "--batch-size", "2", "--batches", "2", "--remote"]) == 0
    report = json.loads(out.read_text())
    assert {r["loader"] for r in report["results"]} == {"stream", "stream-u8", "folder", "stream-http"}
    assert all(r["samples"] == 4 and r["samples_per_s"] > 0 for r in report["results"])
    http = next(r for r in report["results"] if r["loader"] == "stream-http")
    assert http["cache_bound"] == http["data_bytes"] // 4 and 0 < http["cache_peak"] <= http["cache_bound"]
    assert http["shard_gets"] >= 1
    img, _ = bench_data.FolderDataset(cub, 64)[0]
    assert img.shape == (3, 64, 64) and -1 <= img.min() <= img.max() <= 1


def test_bench_data_old_name_still_runs():
    p = subprocess.run([sys.executable, "-m", "stackgan.bench_data", "--help"], capture_output=True,
                       text=True, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0 and "--remote" in p.stdout and "stackgan.bench.data" in p.stderr
