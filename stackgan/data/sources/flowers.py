"""Oxford-102 flowers in StackGAN's layout (the one its TensorFlow code trains on)::

    <root>/jpg/image_NNNNN.jpg
    <root>/text_c10/class_CCCCC/image_NNNNN.txt          10 captions, one a line
    <root>/{train,test}/filenames.pickle                  keys "jpg/image_NNNNN"
    <root>/{train,test}/class_info.pickle                 class id (1..102) per key
    <root>/{train,test}/char-CNN-RNN-embeddings.pickle    (N, 10, 1024) float

No bounding boxes: the whole image is resized (StackGAN's ``preprocess_flowers.py`` resizes
it to 304 without cropping, aspect not kept). The split is the pickles' (class-disjoint
82/20). Has classes; lacks attributes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import cub
from ..cub import DataError, problems_error
from ...text import CHAR_CNN_RNN
from . import Item, SourceSet

PICKLES = ("filenames", "class_info", "char-CNN-RNN-embeddings")


def looks_like(root: Path) -> bool:
    return (root / "jpg").is_dir() and (root / "text_c10").is_dir()


def caption_path(root: Path, key: str, cls: int) -> Path:
    """StackGAN's rule: "jpg/" in the key becomes "class_%05d/" under text_c10."""
    return root / "text_c10" / (key.replace("jpg/", f"class_{cls:05d}/", 1) + ".txt")


def read(root: Path, splits: list[str]) -> SourceSet:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"flowers root {root} is not a folder")
    problems: list[str] = []
    out: dict[str, list[Item]] = {}
    dims = set()
    for split in splits:
        files = {f: root / split / f"{f}.pickle" for f in PICKLES}
        missing = [f"missing {p}" for p in files.values() if not p.is_file()]
        if missing:
            problems += missing
            continue
        keys = [k.decode("latin1") if isinstance(k, bytes) else str(k)
                for k in cub.load_py2_pickle(files["filenames"])]
        classes = [int(c) for c in cub.load_py2_pickle(files["class_info"])]
        emb = np.asarray(cub.load_py2_pickle(files["char-CNN-RNN-embeddings"]), np.float32)
        if emb.ndim != 3 or not len(keys) == len(classes) == len(emb):
            problems.append(f"{root / split}: {len(keys)} filenames, {len(classes)} class ids, embeddings "
                            f"{emb.shape} (expected (N, captions, dim) with N equal)")
            continue
        dims.add(emb.shape[2])
        items = []
        for i, (key, c) in enumerate(zip(keys, classes)):
            key = key[:-4] if key.endswith(".jpg") else key
            img, cap = root / f"{key}.jpg", caption_path(root, key, c)
            if not img.is_file():
                problems.append(f"missing image {img}")
            if not cap.is_file():
                problems.append(f"missing caption file {cap}")
                continue
            try:
                caps = cub.read_captions(cap, emb.shape[1])
            except DataError as e:
                problems.append(str(e))
                continue
            items.append(Item(key, str(img), caps, c, emb[i]))
        out[split] = items
    if len(dims) > 1:
        problems.append(f"embedding dims differ between splits: {sorted(dims)}")
    if problems:
        raise problems_error(f"flowers source {root}", problems)
    names = {c: f"class_{c:05d}" for items in out.values() for c in sorted({it.cls for it in items})}
    return SourceSet("flowers", str(root.resolve()), out, "squash", CHAR_CNN_RNN,
                     dims.pop() if dims else 0, names)
