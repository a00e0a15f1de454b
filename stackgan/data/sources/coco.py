"""MS-COCO 2014 with its captions (the set StackGAN-Pytorch trains on)::

    <root>/train2014/COCO_train2014_NNNNNNNNNNNN.jpg     (or <root>/images/<key>.jpg, as
    <root>/val2014/COCO_val2014_NNNNNNNNNNNN.jpg          StackGAN-Pytorch's loader reads them)
    <root>/annotations/captions_{train,val}2014.json     5 or more captions an image
    [<root>/{train,test}/filenames.pickle]               StackGAN-Pytorch's keys
    [<root>/{train,test}/char-CNN-RNN-embeddings.pickle] (N, 5, 1024) float

Splits: train = train2014, test = val2014 (StackGAN-Pytorch trains on the first and
evaluates on the second). With the pickles, their keys, order and embeddings are used;
without them every captioned image is taken and its captions are embedded with the
sentence encoder at preparation time. Captions: the first 5 of each image in annotation-id
order. The whole image is resized (StackGAN-Pytorch's loader resizes it to 76/304 without a
crop, aspect not kept). Lacks classes (wrong pairs: any other image) and attributes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import cub
from ..cub import DataError, problems_error
from ...text import CHAR_CNN_RNN
from . import Item, SourceSet, count

CAPTIONS = 5
YEAR_SPLIT = {"train": "train2014", "test": "val2014"}


def looks_like(root: Path) -> bool:
    return any((root / "annotations" / f"captions_{y}.json").is_file() for y in YEAR_SPLIT.values())


def _captions(path: Path) -> dict[str, list[str]]:
    """file stem -> captions (annotation-id order) from a COCO captions json."""
    if not path.is_file():
        raise DataError(f"COCO source: missing {path}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        names = {int(im["id"]): Path(im["file_name"]).stem for im in d["images"]}
        anns = sorted(d["annotations"], key=lambda a: int(a["id"]))
        caps: dict[str, list[str]] = {n: [] for n in names.values()}
        for a in anns:
            caps[names[int(a["image_id"])]].append(" ".join(str(a["caption"]).split()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    return caps


def _image(root: Path, year: str, key: str) -> Path:
    for cand in (root / year / f"{key}.jpg", root / "images" / f"{key}.jpg"):
        if cand.is_file():
            return cand
    return root / year / f"{key}.jpg"


def read(root: Path, splits: list[str]) -> SourceSet:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"COCO root {root} is not a folder")
    problems: list[str] = []
    skipped: dict[str, int] = {}
    out: dict[str, list[Item]] = {}
    pickled = {s: (root / s / "filenames.pickle", root / s / "char-CNN-RNN-embeddings.pickle")
               for s in splits}
    use_pickles = any(f.is_file() for pair in pickled.values() for f in pair)
    dims = set()
    for split in splits:
        year = YEAR_SPLIT[split]
        caps = _captions(root / "annotations" / f"captions_{year}.json")
        if use_pickles:
            missing = [f"missing {p}" for p in pickled[split] if not p.is_file()]
            if missing:
                problems += missing
                continue
            keys = [Path(k.decode("latin1") if isinstance(k, bytes) else str(k)).stem
                    for k in cub.load_py2_pickle(pickled[split][0])]
            emb = np.asarray(cub.load_py2_pickle(pickled[split][1]), np.float32)
            if emb.ndim != 3 or len(emb) != len(keys):
                problems.append(f"{pickled[split][1]}: shape {emb.shape}, "
                                f"expected ({len(keys)}, captions, dim)")
                continue
            dims.add(emb.shape[2])
        else:
            keys, emb = sorted(caps), None
        items = []
        for i, key in enumerate(keys):
            c = caps.get(key)
            if c is None:
                problems.append(f"{key}: no captions in {root / 'annotations' / f'captions_{year}.json'}")
                continue
            n = emb.shape[1] if emb is not None else CAPTIONS
            if len(c) < n:
                count(skipped, f"fewer_than_{n}_captions")
                continue
            img = _image(root, year, key)
            if not img.is_file():
                problems.append(f"missing image {img}")
                continue
            items.append(Item(key, str(img), c[:n], None, None if emb is None else emb[i]))
        out[split] = items
    if problems:
        raise problems_error(f"COCO source {root}", problems)
    return SourceSet("coco", str(root.resolve()), out, "squash", CHAR_CNN_RNN if use_pickles else None,
                     dims.pop() if dims else 0, {}, skipped, {"pickles": use_pickles})
