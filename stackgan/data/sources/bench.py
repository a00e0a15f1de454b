"""Benchmarks of preparation (numbers and a JSON, not timed tests).

    python -m stackgan.data.sources.bench webdataset --images 2000 --out runs/bench-webdataset.json
    python -m stackgan.data.sources.bench crops --out runs/bench-crops.json [--photos 'dir/*.jpg']

``webdataset``: an img2dataset-style replica (256x256 JPEGs as img2dataset writes by default,
one caption each, every caption distinct) prepared end to end (index, sentence-encoder
embeddings in batches, crops, lossless WebP, shards) with ``--workers`` processes; reports
images/s overall and per phase, and the CPU seconds of all processes (the per-core figure
that stays meaningful on a shared machine).

``crops``: for each stored-crop candidate (JPEG q90 as before, JPEG q95/q100 4:4:4, PNG,
lossless WebP), on square crops of real photos resized to 76 and 304 as the preparation does:
size on disk, encode and decode time per crop, and the mean absolute difference to the source
crop in grey levels and the ratio of the sharpness measure's high-frequency share of the stored
crop to the source crop's (``hf_response``); then the stream's (:class:`stackgan.data.stream.
TrainStream`) samples/s at 64 and 256 px on shards of the embedded bird set written in each
format (those prepare writes). Candidates are timed
in interleaved rounds (median), so machine load hits them alike.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .. import birds
from .. import prepare as prep
from ..meta import load_metadata
from ..stream import TrainStream
from ...metrics.detail import hf_share
from ...text import SentenceEncoder
from . import replicas

CANDIDATES = {  # name -> (image_format, jpeg_quality)
    "jpg-q90 (before)": ("jpg", 90), "jpg-q95-444": ("jpg", 95), "jpg-q100-444": ("jpg", 100),
    "png": ("png", 0), "webp-lossless": ("webp", 0),
}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def bench_webdataset(a) -> dict:
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        tmp = Path(tmp)
        per = min(500, a.images)
        t0 = time.perf_counter()
        replicas.write_webdataset(tmp / "wds", shards=-(-a.images // per), per_shard=per, seed=0,
                                  size=(256, 256), faults=False)
        made = time.perf_counter() - t0
        opts = prep.PrepareOptions(root=str(tmp / "wds"), out=tmp / "shards", workers=a.workers,
                                   shard_size=a.shard_size, progress=False, image_format=a.image_format)
        load0 = os.getloadavg()[0]
        cpu0, t0 = _cpu_s(), time.perf_counter()
        res = prep.prepare(opts)  # the whole command: index, embed captions, crop + encode, shards
        wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        n = sum(res.samples.values())
        caps = sorted({json.loads(ln)["caption"] for ln in _captions(tmp / "wds")})
        t0, c0 = time.perf_counter(), time.process_time()
        prep.embed_distinct(SentenceEncoder(), caps)  # the embedding phase alone, fresh encoder (no cache)
        t_embed, c_embed = time.perf_counter() - t0, time.process_time() - c0
        return {"images": n, "distinct_captions": len(caps), "workers": a.workers,
                "image_format": a.image_format, "cores": len(os.sched_getaffinity(0)),
                "wall_s": round(wall, 2), "images_per_s": round(n / wall, 1),
                "cpu_s (all processes)": round(cpu, 2),
                "images_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
                "embed_alone_wall_s": round(t_embed, 2), "embed_alone_cpu_s": round(c_embed, 2),
                "captions_per_cpu_s": round(len(caps) / c_embed, 1),
                "replica_written_s": round(made, 1),
                "load_avg_1min_before_after": [load0, os.getloadavg()[0]]}


def _captions(root: Path) -> list[str]:
    """The json members of a replica's tars (one per sample)."""
    import tarfile

    out = []
    for t in sorted(root.glob("*.tar")):
        with tarfile.open(t) as tar:
            out += [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".json")]
    return out


def _photo_crops(patterns: list[str], per_photo: int, seed: int) -> dict[int, list[Image.Image]]:
    paths = sorted({p for pat in patterns for p in glob.glob(pat)})
    if not paths:
        raise SystemExit(f"no photos match {patterns}: pass --photos 'DIR/*.jpg'")
    rng = np.random.default_rng(seed)
    crops: dict[int, list[Image.Image]] = {76: [], 304: []}
    for p in paths:
        im = Image.open(p).convert("RGB")
        w, h = im.size
        for _ in range(per_photo):  # squares of 40-100 % of the short side, like bbox crops
            s = int(rng.uniform(0.4, 1.0) * min(w, h))
            x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
            c = im.crop((x, y, x + s, y + s))
            for size in crops:
                crops[size].append(c.resize((size, size), Image.BILINEAR))
    return crops


def _default_photos() -> list[str]:
    """Real photographs that ship with common packages (sklearn, matplotlib), if installed."""
    pats = []
    for mod, sub in (("sklearn", "datasets/images/*.jpg"), ("matplotlib", "mpl-data/sample_data/*.jpg")):
        try:
            pats.append(str(Path(__import__(mod).__file__).parent / sub))
        except ImportError:
            pass
    return pats


def bench_crops(a) -> dict:
    from torchvision.io import ImageReadMode, decode_image

    crops = _photo_crops(a.photos or _default_photos(), a.per_photo, 0)
    report: dict = {"photos": a.photos or _default_photos(), "crops_per_size": len(crops[76]), "formats": {}}
    for size, imgs in crops.items():
        ref = [np.asarray(c, np.float32) for c in imgs]
        times: dict[str, dict[str, list[float]]] = {k: {"enc": [], "dec": []} for k in CANDIDATES}
        blobs: dict[str, list[bytes]] = {}
        for _ in range(a.rounds):
            for name, (fmt, q) in CANDIDATES.items():
                t0 = time.perf_counter()
                blobs[name] = [prep.encode_image(c, fmt, q) for c in imgs]
                times[name]["enc"].append((time.perf_counter() - t0) / len(imgs))
                t0 = time.perf_counter()
                for b in blobs[name]:
                    decode_image(_tensor(b), mode=ImageReadMode.RGB)
                times[name]["dec"].append((time.perf_counter() - t0) / len(imgs))
        for name in CANDIDATES:
            stored = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), np.float32) for b in blobs[name]]
            err = [np.abs(x - r).mean() for x, r in zip(stored, ref)]
            report["formats"].setdefault(name, {})[str(size)] = {
                "kib": round(float(np.mean([len(b) for b in blobs[name]])) / 1024, 1),
                "encode_ms": round(statistics.median(times[name]["enc"]) * 1e3, 2),
                "decode_ms": round(statistics.median(times[name]["dec"]) * 1e3, 2),
                "mean_abs_grey": round(float(np.mean(err)), 3),
                "max_mean_abs_grey": round(float(np.max(err)), 3),
                **hf_response(stored, ref)}
    report["stream"] = _stream_by_format(a)
    report["load_avg_1min"] = os.getloadavg()[0]
    return report


def hf_response(stored: list[np.ndarray], source: list[np.ndarray]) -> dict:
    """The sharpness measure's high-frequency share (:func:`stackgan.metrics.detail.hf_share`) of
    each stored crop over its source crop's: 1 when storing neither adds block edges nor removes
    detail; the mean and the crop farthest from 1."""
    import torch

    def nchw(xs):
        return torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2)

    ratio = (hf_share(nchw(stored)) / hf_share(nchw(source))).numpy()
    return {"hf_share_vs_source": round(float(ratio.mean()), 4),
            "hf_share_vs_source_farthest": round(float(ratio[np.abs(ratio - 1).argmax()]), 4)}


def _tensor(b: bytes):
    import torch

    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def _stream_by_format(a) -> dict:
    """TrainStream samples/s at 64 and 256 px on the embedded set written in each format."""
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        tmp = Path(tmp)
        root = birds.generate(tmp / "birds", a.species, a.per_species, 0, workers=1, quiet=True)
        roots = {}
        for name, (fmt, q) in CANDIDATES.items():
            if fmt not in prep.WRITE_FORMATS:  # measured as a file format above, not offered by prepare
                continue
            out = tmp / name.split()[0]
            prep.prepare(prep.PrepareOptions(cub_root=root / "CUB_200_2011", out=out, workers=1,
                                             progress=False, image_format=fmt, jpeg_quality=q or 90))
            roots[name] = out
        res: dict = {}
        for name, out in roots.items():
            sp = load_metadata(out).splits.values()
            size = sum((out / s.name).stat().st_size for x in sp for s in x.shards)
            res[name] = {"bytes_per_sample": round(size / sum(x.num_samples for x in sp))}
        for size in (64, 256):
            n = a.batches if size == 64 else max(4, a.batches // 2)
            rates: dict[str, list[float]] = {k: [] for k in roots}
            for _ in range(a.rounds):
                for name, out in roots.items():
                    it = TrainStream(str(out), "train", size, 32, seed=0, num_workers=0).iterate()
                    next(it)
                    t0 = time.perf_counter()
                    for _ in range(n):
                        next(it)
                    rates[name].append(n * 32 / (time.perf_counter() - t0))
                    it.close()
            for name in roots:
                res[name][f"stream_{size}px_samples_per_s"] = round(statistics.median(rates[name]), 1)
        return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stackgan.data.sources.bench",
                                 description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    w = sub.add_parser("webdataset", help="preparation images/s of a webdataset source")
    w.add_argument("--images", type=int, default=2000)
    w.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    w.add_argument("--shard-size", type=int, default=500)
    w.add_argument("--image-format", default=prep.DEFAULT_IMAGE_FORMAT)
    c = sub.add_parser("crops", help="stored-crop formats: size, fidelity, decode, stream throughput")
    c.add_argument("--photos", nargs="*", help="globs of real photos (default: sklearn/matplotlib samples)")
    c.add_argument("--per-photo", type=int, default=12)
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--species", type=int, default=8)
    c.add_argument("--per-species", type=int, default=16)
    c.add_argument("--batches", type=int, default=12)
    for p in (w, c):
        p.add_argument("--out", required=True, help="JSON file for the figures")
        p.add_argument("--tmp", default=None, help="scratch folder (default: the system's)")
    a = ap.parse_args(argv)
    report = bench_webdataset(a) if a.what == "webdataset" else bench_crops(a)
    text = json.dumps(report, indent=1)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
