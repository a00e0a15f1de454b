"""Small data sets written in each source's real layout, for tests and benchmarks (no download).

Why: every reader must be exercised on the files as the real data sets lay them out. Each
writer returns the truth it wrote (keys, captions, classes, embeddings, image paths), so a
test can check shards against it without trusting the reader. Images are smooth random
colour fields (upsampled noise) of varied, non-square sizes: any wrong crop or resize shows.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..birds import write_py2_pickle

FLOWER_CLASSES = {1: "train", 2: "train", 3: "test", 4: "train"}  # class -> StackGAN split


def random_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)))


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return [(120, 90), (90, 124), (101, 101), (160, 96)][int(rng.integers(0, 4))]


def write_flowers(root: Path, per_class: int = 3, dim: int = 16, seed: int = 0) -> dict:
    """Oxford-102 as StackGAN ships it: jpg/, text_c10/class_NNNNN/, {train,test}/*.pickle."""
    rng = np.random.default_rng(seed)
    (root / "jpg").mkdir(parents=True)
    truth: dict = {"root": root, "items": {}, "splits": {"train": [], "test": []}, "emb": {}}
    n = 0
    for cls, split in FLOWER_CLASSES.items():
        for _ in range(per_class):
            n += 1
            name = f"image_{n * 7:05d}"
            key = f"jpg/{name}"
            img = random_image(rng, *_size(rng))
            img.save(root / f"{key}.jpg", quality=95)
            caps = [f"flower {n} caption {k}: this flower has {'pink' if k % 2 else 'white'} petals"
                    for k in range(10)]
            tdir = root / "text_c10" / f"class_{cls:05d}"
            tdir.mkdir(parents=True, exist_ok=True)
            (tdir / f"{name}.txt").write_text("\n".join(caps) + "\n")
            truth["items"][key] = {"cls": cls, "captions": caps, "path": root / f"{key}.jpg"}
            truth["splits"][split].append(key)
    for split, keys in truth["splits"].items():
        (root / split).mkdir()
        emb = rng.standard_normal((len(keys), 10, dim)).astype(np.float32)
        truth["emb"][split] = emb
        write_py2_pickle(keys, root / split / "filenames.pickle")
        write_py2_pickle([truth["items"][k]["cls"] for k in keys], root / split / "class_info.pickle")
        write_py2_pickle(emb, root / split / "char-CNN-RNN-embeddings.pickle")
    return truth


def write_coco(root: Path, per_split: int = 4, pickles: bool = False, dim: int = 16, seed: int = 0) -> dict:
    """COCO 2014: {train,val}2014/COCO_*_NNNNNNNNNNNN.jpg + annotations/captions_*.json
    (5-6 captions an image, annotation ids out of image order); optionally StackGAN-Pytorch's
    {train,test}/{filenames,char-CNN-RNN-embeddings}.pickle (keys in its own order)."""
    rng = np.random.default_rng(seed)
    truth: dict = {"root": root, "items": {}, "splits": {}, "emb": {}}
    (root / "annotations").mkdir(parents=True)
    ann_id = 1000
    for split, year in (("train", "train2014"), ("test", "val2014")):
        (root / year).mkdir()
        images, anns, keys = [], [], []
        for i in range(per_split):
            iid = int(rng.integers(1, 10**6)) * 10 + i
            key = f"COCO_{year}_{iid:012d}"
            random_image(rng, *_size(rng)).save(root / year / f"{key}.jpg", quality=95)
            images.append({"id": iid, "file_name": f"{key}.jpg", "width": 0, "height": 0})
            caps = []
            for k in range(5 + i % 2):
                ann_id += int(rng.integers(1, 50))
                cap = f"a photo {i} of {split} with caption  {k}\n"
                anns.append({"id": ann_id, "image_id": iid, "caption": cap})
                caps.append(" ".join(cap.split()))
            truth["items"][key] = {"captions": caps[:5], "path": root / year / f"{key}.jpg"}
            keys.append(key)
        rng.shuffle(anns)
        (root / "annotations" / f"captions_{year}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "info": {}, "licenses": []}))
        truth["splits"][split] = sorted(keys)
        if pickles:
            order = [keys[j] for j in rng.permutation(len(keys))]
            emb = rng.standard_normal((len(order), 5, dim)).astype(np.float32)
            (root / split).mkdir()
            write_py2_pickle(order, root / split / "filenames.pickle")
            write_py2_pickle(emb, root / split / "char-CNN-RNN-embeddings.pickle")
            truth["splits"][split], truth["emb"][split] = order, emb
    return truth


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def webdataset_caption(rng: np.random.Generator, i: int) -> str:
    colours = ["red", "green", "blue", "yellow", "black", "white", "grey", "orange"]
    things = ["car", "dog", "house", "tree", "boat", "cat", "chair", "bird", "flower", "lamp"]
    a, b, c = (colours[int(rng.integers(0, 8))], things[int(rng.integers(0, 10))],
               colours[int(rng.integers(0, 8))])
    tail = ["", " on a sunny day", " with people walking by and a few parked bicycles",
            ", seen from above in the late afternoon light with long shadows on the ground"]
    return f"a {a} {b} in front of a {c} wall{tail[int(rng.integers(0, 4))]}, photo number {i % 997}"


def write_webdataset(root: Path, shards: int = 2, per_shard: int = 5, seed: int = 0,
                     size: tuple[int, int] | None = None, faults: bool = True) -> dict:
    """img2dataset's output: NNNNN.tar holding NNNNNNNNN.{jpg,txt,json} per sample (json: caption,
    url, key, status, ...), plus NNNNN_stats.json/.parquet-like side files next to the tars. With
    ``faults``: one PNG sample, one caption only in the json, one undecodable image, one empty
    caption. ``truth["items"]`` holds the samples that must come through, with their image bytes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    truth: dict = {"root": root, "items": {}, "bad_image": [], "empty_caption": []}
    n = 0
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for _ in range(per_shard):
                key = f"{n:09d}"
                w, h = size or _size(rng)
                img = random_image(rng, w, h)
                buf = io.BytesIO()
                ext = "png" if faults and n == 1 else "jpg"
                img.save(buf, "PNG" if ext == "png" else "JPEG", quality=95)
                data = buf.getvalue()
                cap = webdataset_caption(rng, n)
                meta = {"caption": cap, "url": f"https://example.com/{key}.jpg", "key": key,
                        "status": "success", "width": w, "height": h}
                if faults and n == 3:
                    data = b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(100)
                    truth["bad_image"].append(key)
                _tar_add(tar, f"{key}.{ext}", data)
                if faults and n == 4:
                    _tar_add(tar, f"{key}.txt", b"  \n")
                    meta["caption"] = ""
                    truth["empty_caption"].append(key)
                elif not (faults and n == 2):  # n == 2: the caption is only in the json
                    _tar_add(tar, f"{key}.txt", cap.encode())
                _tar_add(tar, f"{key}.json", json.dumps(meta).encode())
                if key not in truth["bad_image"] + truth["empty_caption"]:
                    truth["items"][f"{s:05d}/{key}"] = {"caption": cap, "image": data}
                n += 1
        (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard}))
    return truth


def write_folder(root: Path, n: int = 8, table: str | None = None, seed: int = 0) -> dict:
    """An image folder: a/b/name.jpg + name.txt (one caption a line), or with ``table`` ("csv"
    or "jsonl") one table of image,caption rows (two rows for image 0: two captions). One
    image has an empty caption file (or empty rows), one none at all."""
    rng = np.random.default_rng(seed)
    (root / "imgs" / "sub").mkdir(parents=True)
    truth: dict = {"root": root, "items": {}, "empty": []}
    rows = []
    for i in range(n):
        rel = f"imgs/{'sub/' if i % 3 == 0 else ''}photo_{i}.{'png' if i == 5 else 'jpg'}"
        random_image(rng, *_size(rng)).save(root / rel, quality=95)
        caps = [f"picture {i}: a {['small', 'large'][i % 2]} thing"] + ([f"another view of picture {i}"]
                                                                         if i == 0 else [])
        key = rel.rsplit(".", 1)[0]
        if i == 6:
            caps = []
            truth["empty"].append(key)
        if i == 7 and table is None:  # no caption file at all
            truth["empty"].append(key)
        else:
            if table is None:
                (root / rel).with_suffix(".txt").write_text("\n".join(caps) + "\n\n")
            rows += [{"image": rel, "caption": c} for c in caps or [""]]
        if key not in truth["empty"]:
            truth["items"][key] = {"captions": caps, "path": root / rel}
    if table == "csv":
        import csv

        with open(root / "captions.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["image", "caption"])
            w.writeheader()
            w.writerows(rows)
    elif table == "jsonl":
        (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return truth
