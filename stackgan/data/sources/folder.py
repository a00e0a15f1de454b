"""Captioned images in a plain folder, in one of two forms::

    <root>/**/name.jpg + <root>/**/name.txt     one caption a line (several lines: several captions)
    <root>/<table>.csv | <root>/<table>.jsonl   rows with "image" (path relative to the table's
                                                folder) and "caption"; several rows of one image:
                                                several captions

Images: ``.jpg``/``.jpeg``/``.png``/``.webp``. ``train/`` and ``test/`` subfolders (or a
``split`` column) give the split, else a stable 5 % of the keys (by hash) is the test split.
An image without a caption file, or whose captions are all empty, is counted and skipped; a
table row naming a missing image is an error (the table promised it). Captions are embedded
with the sentence encoder; each image is centre-cropped (or padded) to a square. Lacks
classes (wrong pairs: any other image), attributes and char-CNN-RNN embeddings.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..cub import DataError, problems_error
from . import (DEFAULT_TEST_FRACTION, IMAGE_EXTS, Item, SourceSet, caption_lines, count, natural_key,
               split_by_hash)

TABLE_EXTS = (".csv", ".jsonl")


def tables(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.suffix.lower() in TABLE_EXTS) if root.is_dir() else []


def looks_like(root: Path) -> bool:
    return root.is_dir() and (bool(tables(root))
                              or any(p.suffix.lower() in IMAGE_EXTS for p in root.rglob("*")))


def _rows(table: Path) -> list[dict]:
    try:
        if table.suffix.lower() == ".csv":
            with open(table, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(ln) for ln in table.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{table}: cannot read the table ({type(e).__name__}: {e})") from None
    if rows and not {"image", "caption"} <= set(rows[0]):
        raise DataError(f"{table}: needs columns 'image' and 'caption', has {sorted(rows[0])}")
    return rows


def _from_table(table: Path, skipped: dict[str, int]) -> tuple[list[Item], dict[str, str]]:
    caps: dict[str, list[str]] = {}
    split_of: dict[str, str] = {}
    missing = []
    for row in _rows(table):
        rel = str(row["image"]).strip()
        path = table.parent / rel
        if rel not in caps:
            caps[rel] = []
            if not path.is_file():
                missing.append(f"missing image {path} (named in {table})")
        cap = " ".join(str(row.get("caption") or "").split())
        if cap:
            caps[rel].append(cap)
        if row.get("split"):
            split_of[rel] = str(row["split"]).strip()
    if missing:
        raise problems_error(f"folder source table {table}", missing)
    items = []
    for rel, c in caps.items():
        if not c:
            count(skipped, "empty_caption")
            continue
        items.append(Item(Path(rel).with_suffix("").as_posix(), str(table.parent / rel), c))
    return items, {Path(k).with_suffix("").as_posix(): v for k, v in split_of.items()}


def _from_files(root: Path, skipped: dict[str, int]) -> list[Item]:
    items = []
    for img in sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                      key=lambda p: natural_key(str(p))):
        txt = img.with_suffix(".txt")
        caps = caption_lines(txt.read_text(encoding="utf-8", errors="replace")) if txt.is_file() else []
        if not caps:
            count(skipped, "empty_caption" if txt.is_file() else "no_caption_file")
            continue
        items.append(Item(img.relative_to(root).with_suffix("").as_posix(), str(img), caps))
    return items


def read(root: Path, splits: list[str], fit: str = "center") -> SourceSet:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder source {root} is not a folder")
    skipped: dict[str, int] = {}
    found = tables(root)
    if len(found) > 1:
        raise DataError(f"folder source {root}: {len(found)} tables ({[p.name for p in found]}); keep one")
    if found:
        items, split_of = _from_table(found[0], skipped)
        form = f"table {found[0].name}"
    else:
        items, split_of, form = _from_files(root, skipped), {}, "name.txt per image"
    if not items:
        raise DataError(f"folder source {root}: no captioned images found ({skipped or 'no images'})")
    if split_of:
        by = {"train": [it for it in items if split_of.get(it.key, "train") == "train"],
              "test": [it for it in items if split_of.get(it.key) == "test"]}
    elif not found and (root / "train").is_dir():
        by = {s: [it for it in items if it.key.startswith(f"{s}/")] for s in ("train", "test")}
    else:
        by = split_by_hash(items, DEFAULT_TEST_FRACTION)
    out = {s: by.get(s, []) for s in splits}
    return SourceSet("folder", str(root.resolve()), out, fit, None, 0, {}, skipped, {"form": form})
