"""Data benchmark: the shard stream against the original StackGAN folder loader, and over HTTP.

    python -m stackgan.bench.data --shards shards/birds-cub-scale \\
        --cub-root data/birds-cub-scale/CUB_200_2011 --out bench-data.json
    python -m stackgan.bench.data --shards shards/birds-embedded --remote --out bench-remote.json

(``python -m stackgan.bench_data`` is the old name of the same command.)

For 64 and 256 crops and 0 / 2 loader workers it measures, in one run and on the same
machine, (a) :class:`stackgan.data.stream.TrainStream` and (b) a folder loader that does
per sample what StackGAN-Pytorch's ``TextDataset`` does on every step: open the JPEG in
``CUB_200_2011/images``, crop the square of ``1.5 * max(w, h)`` around the bounding box
centre (clipped), bilinear resize to 76 / 304, random crop 64 / 256, random flip,
``ToTensor`` + ``Normalize(0.5, 0.5)``, and pick one of the 10 embeddings (held in memory,
as the original does), batched by a shuffling ``DataLoader``.

Figures: samples/s (wall clock) and samples per CPU-second of all processes involved
(main + loader workers, read from /proc at both ends of the timed stretch), which is the
per-core throughput and stays meaningful on a shared, busy machine. ``stream-u8`` is the
stream with ``img_dtype="uint8"`` (images normalised later, on the GPU).

``--remote``: the same stream from shards served by ``python -m http.server`` on 127.0.0.1
(``stream-http``), through a shard cache bounded to a quarter of the split's bytes (so shards
are evicted and fetched again), cold at the start of each measurement. Next to samples/s it
records the cache's peak size (polled through the cache lock every 5 ms while it runs), its
bound, and the number of shard downloads the server answered.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.cub import load_py2_pickle
from ..data.meta import load_metadata
from ..data.shardcache import ShardCache
from ..data.stream import SOURCE_SIZE, TrainStream
from ..files import atomic_json


# --------------------------------------------------------------------------------------
# The original per-step folder loader
# --------------------------------------------------------------------------------------
def _table(path: Path) -> dict[int, list[str]]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            parts = line.split()
            rows[int(parts[0])] = parts[1:]
    return rows


def _birds_dir(cub_root: Path) -> Path | None:
    for cand in (cub_root.parent / "birds", cub_root.parent, cub_root / "birds"):
        if (cand / "train" / "filenames.pickle").is_file():
            return cand
    return None


class FolderDataset(torch.utils.data.Dataset):
    """StackGAN-Pytorch's per-step image pipeline over the CUB folder layout."""

    def __init__(self, cub_root: Path, image_size: int, split: str = "train", limit: int = 0):
        import torchvision.transforms as T

        images = {i: r[0] for i, r in _table(cub_root / "images.txt").items()}
        boxes = {i: [float(v) for v in r] for i, r in _table(cub_root / "bounding_boxes.txt").items()}
        self.bbox = {images[i][:-4]: boxes[i] for i in images}  # key = path without ".jpg"
        birds = _birds_dir(cub_root)
        if birds is not None and (birds / split / "filenames.pickle").is_file():
            self.keys = list(load_py2_pickle(birds / split / "filenames.pickle"))
            emb = load_py2_pickle(birds / split / "char-CNN-RNN-embeddings.pickle")
            self.embeddings = np.asarray(emb, dtype=np.float32)
        else:  # no StackGAN text files: every image, stand-in embeddings (cost is the same)
            self.keys = sorted(self.bbox)
            self.embeddings = np.zeros((len(self.keys), 10, 1024), np.float32)
        if limit:
            self.keys, self.embeddings = self.keys[:limit], self.embeddings[:limit]
        self.root = cub_root / "images"
        self.load_size = int(image_size * 76 / 64)
        self.transform = T.Compose([
            T.RandomCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    def __len__(self) -> int:
        return len(self.keys)

    def get_img(self, path: Path, bbox: list[float]) -> Image.Image:
        img = Image.open(path).convert("RGB")
        width, height = img.size
        r = int(max(bbox[2], bbox[3]) * 0.75)
        cx, cy = int((2 * bbox[0] + bbox[2]) / 2), int((2 * bbox[1] + bbox[3]) / 2)
        y1, y2 = max(0, cy - r), min(height, cy + r)
        x1, x2 = max(0, cx - r), min(width, cx + r)
        img = img.crop((x1, y1, x2, y2))
        return img.resize((self.load_size, self.load_size), Image.BILINEAR)

    def __getitem__(self, i: int):
        key = self.keys[i]
        img = self.transform(self.get_img(self.root / f"{key}.jpg", self.bbox[key]))
        emb = self.embeddings[i][random.randint(0, self.embeddings.shape[1] - 1)]
        return img, emb


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------
def _cpu() -> float:
    """CPU seconds of this process and its live children (the loader workers), from /proc:
    read while the loader runs, so that the batches prefetched at both ends cancel out."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    total = me.ru_utime + me.ru_stime
    if not os.path.isdir("/proc/self"):  # not Linux: children only count once reaped
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return total + ch.ru_utime + ch.ru_stime
    pid, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm)"
            if int(fields[1]) == pid:  # ppid
                total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def _measure(batches, n_batches: int, batch_size: int) -> dict:
    """Time n batches in steady state: after one warm-up batch (worker start-up), with the
    CPU of main process + workers sampled at both ends of the timed stretch."""
    next(batches)
    cpu0, t0 = _cpu(), time.perf_counter()
    for _ in range(n_batches):
        next(batches)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    batches.close()
    n = n_batches * batch_size
    return {"batches": n_batches, "samples": n, "wall_s": round(wall, 3), "samples_per_s": round(n / wall, 1),
            "cpu_s": round(cpu, 3), "samples_per_cpu_s": round(n / cpu, 1) if cpu > 0.05 else None}


def _stream_batches(a, size: int, workers: int, img_dtype: str = "float32"):
    s = TrainStream(a.shards, a.split, size, a.batch_size, seed=0, num_workers=workers,
                    shuffle_buffer=a.shuffle_buffer, img_dtype=img_dtype)
    return s.iterate()


def _stream_u8_batches(a, size: int, workers: int):
    return _stream_batches(a, size, workers, "uint8")


# --------------------------------------------------------------------------------------
# Remote mode: the stream from a local HTTP server through a quarter-size cache
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def http_server(folder: Path):
    """``python -m http.server`` on 127.0.0.1 serving ``folder`` (a free port picked by the server):
    yields its base URL and the file its request log goes to."""
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as requests:
        cmd = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
               "--directory", str(folder)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=requests, text=True)
        try:
            m = re.search(r"port (\d+)", proc.stdout.readline())
            if not m:
                raise RuntimeError("python -m http.server did not say which port it serves")
            yield f"http://127.0.0.1:{m.group(1)}", Path(requests.name)
        finally:
            proc.terminate()
            proc.wait()


class _PeakCache:
    """The highest cache size seen, polled through the cache lock every 5 ms."""

    def __init__(self, folder: Path, bound: int):
        self.cache, self.peak = ShardCache(folder, bound), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.cache.usage())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _remote(a, size: int, workers: int, url: str, requests: Path, data_bytes: int) -> dict:
    bound = data_bytes // 4
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache:
        peak = _PeakCache(Path(cache), bound)
        gets0 = requests.read_text().count(".tar HTTP")
        try:
            stream = TrainStream(url, a.split, size, a.batch_size, seed=0, num_workers=workers,
                                 shuffle_buffer=a.shuffle_buffer, cache_dir=cache, cache_gb=bound / 1e9)
            r = _measure(stream.iterate(), a.batches if size == 64 else max(4, a.batches // 2), a.batch_size)
        finally:
            top = peak.stop()
        r.update(cache_bound=bound, cache_peak=top, data_bytes=data_bytes,
                 shard_gets=requests.read_text().count(".tar HTTP") - gets0)
    return r


def _folder_batches(a, size: int, workers: int):
    ds = FolderDataset(Path(a.cub_root), size, a.split)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)

    def forever():
        while True:
            yield from loader
    return forever()


def run(a) -> dict:
    torch.set_num_threads(1)  # per-core figures: one thread in the main process too
    load0, results = os.getloadavg(), []
    shards = Path(a.shards).resolve()
    meta = load_metadata(shards)
    data_bytes = sum((shards / s.name).stat().st_size for s in meta.splits[a.split].shards)
    with contextlib.ExitStack() as stack:
        if a.remote:
            base, requests = stack.enter_context(http_server(shards.parent))
            url = f"{base}/{shards.name}"
        for size in a.sizes:
            for workers in a.workers:
                n = a.batches if size == 64 else max(4, a.batches // 2)
                loaders = [("stream", _stream_batches), ("stream-u8", _stream_u8_batches)]
                if a.cub_root:
                    loaders.append(("folder", _folder_batches))
                if a.remote:
                    loaders.append(("stream-http", None))
                for name, make in loaders:
                    if make is None:
                        r = _remote(a, size, workers, url, requests, data_bytes)
                    else:
                        r = _measure(make(a, size, workers), n, a.batch_size)
                    r.update(loader=name, size=size, workers=workers)
                    results.append(r)
                    extra = (f", cache peak {r['cache_peak'] / 1e6:.1f} MB of {r['cache_bound'] / 1e6:.1f} "
                             f"MB, {r['shard_gets']} shard downloads" if "cache_peak" in r else "")
                    print(f"  {name:11s} {size:3d}px workers={workers}: {r['samples_per_s']:8.1f} samples/s, "
                          f"{_fmt(r['samples_per_cpu_s'])} samples/CPU-s{extra}", flush=True)
    speedup = {}
    for size in a.sizes:
        for workers in a.workers:
            pick = {r["loader"]: r for r in results if r["size"] == size and r["workers"] == workers}
            if "folder" in pick and pick["folder"]["samples_per_cpu_s"]:
                for name in ("stream", "stream-u8"):
                    if not pick[name]["samples_per_cpu_s"]:
                        continue
                    speedup[f"{name}/{size}px/{workers}w"] = round(
                        pick[name]["samples_per_cpu_s"] / pick["folder"]["samples_per_cpu_s"], 2)
    return {
        "command": "python -m stackgan.bench.data " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                    "torch": torch.__version__},
        "config": {"shards": a.shards, "cub_root": a.cub_root, "split": a.split, "batch_size": a.batch_size,
                   "shuffle_buffer": a.shuffle_buffer, "remote": a.remote, "split_bytes": data_bytes},
        "results": results,
        "speedup_per_core": speedup,
    }


def _fmt(x: float | None) -> str:
    return "n/a (too short)" if x is None else f"{x:8.1f}"


def table(report: dict) -> str:
    head = (f"{'loader':11s} {'size':>5s} {'workers':>7s} {'samples/s':>10s} {'samples/CPU-s':>14s} "
            f"{'cache peak/bound MB':>20s} {'downloads':>9s}")
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        cache = (f"{r['cache_peak'] / 1e6:.1f}/{r['cache_bound'] / 1e6:.1f}", str(r["shard_gets"])) \
            if "cache_peak" in r else ("", "")
        lines.append(f"{r['loader']:11s} {r['size']:5d} {r['workers']:7d} {r['samples_per_s']:10.1f} "
                     f"{_fmt(r['samples_per_cpu_s']):>14s} {cache[0]:>20s} {cache[1]:>9s}")
    for k, v in report["speedup_per_core"].items():
        name, size, workers = k.split("/")
        lines.append(f"{name} / folder per CPU-second, {size} {workers}: {v:.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stackgan.bench.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="prepared shard folder (metadata.json)")
    ap.add_argument("--cub-root", default="", help="the CUB_200_2011 folder the shards were made from "
                    "(omit: stream only)")
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--split", default="train")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256], choices=sorted(SOURCE_SIZE))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=48, help="timed batches at 64px (half at 256px)")
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--remote", action="store_true", help="also stream from a local HTTP server through a "
                    "shard cache of a quarter of the split (stream-http)")
    a = ap.parse_args(argv)
    if a.cub_root and not (Path(a.cub_root) / "images.txt").is_file():
        ap.error(f"--cub-root {a.cub_root}: no images.txt there (give the CUB_200_2011 folder)")
    report = run(a)
    print(table(report))
    out = Path(a.out)
    atomic_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
