"""Captioned images in webdataset tar shards, as img2dataset writes them::

    <dir>/00000.tar: 000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...
    [<dir>/train/*.tar, <dir>/test/*.tar]        splits of their own, when present

The input is a folder (its ``*.tar``, searched recursively, in natural order), one tar, a
brace pattern (``shards/{00000..00099}.tar``), or URLs (``https://``, ``pipe:CMD``, any
form webdataset's ``gopen`` opens), fetched once into the preparation cache. A sample's
image is its ``jpg``/``jpeg``/``png``/``webp`` field; its caption the ``txt`` field, else
the ``caption`` key of its ``json`` (``caption_field`` picks another: ``txt``, or
``json:KEY``). Samples with no image field or an empty caption are counted and skipped
(undecodable images are found, counted and skipped while the shards are written). Without
split folders, a stable 5 % of the keys (by hash) is the test split. Captions are embedded
with the sentence encoder; the image is centre-cropped (or padded) to a square. Lacks
classes (wrong pairs: any other image), attributes and char-CNN-RNN embeddings.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import braceexpand

from ..cub import DataError
from . import DEFAULT_TEST_FRACTION, Item, SourceSet, count, natural_key, split_by_hash

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def looks_like(root: str) -> bool:
    if is_url(root) or "{" in root or root.endswith(".tar"):
        return True
    p = Path(root)
    return p.is_dir() and any(p.glob("*.tar")) or any(p.glob("train/*.tar"))


def _expand(spec: str) -> list[str]:
    return [u for part in spec.split("::") for u in braceexpand.braceexpand(part)]


def shard_list(root: str) -> dict[str, list[str]]:
    """Tar files (or URLs) per split: ``{"all": [...]}`` or ``{"train": [...], "test": [...]}``."""
    p = Path(root)
    if not is_url(root) and p.is_dir():
        if (p / "train").is_dir():
            return {s: sorted(map(str, (p / s).rglob("*.tar")), key=natural_key)
                    for s in ("train", "test") if (p / s).is_dir()}
        return {"all": sorted(map(str, p.rglob("*.tar")), key=natural_key)}
    return {"all": _expand(root)}


def fetch(url: str, cache: Path) -> Path:
    """A URL's bytes in ``cache`` (atomic: a partial download never has the final name)."""
    from webdataset import gopen

    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}.tar"
    if dst.is_file():
        return dst
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with gopen(url, "rb") as src, open(tmp, "wb") as f:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                f.write(chunk)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"webdataset source: cannot read {url} ({type(e).__name__}: {e})") from e
    os.replace(tmp, dst)
    return dst


def _caption(fields: dict[str, bytes], caption_field: str | None) -> str:
    if caption_field and caption_field.startswith("json:"):
        d = json.loads(fields.get("json", b"{}") or b"{}")
        return str(d.get(caption_field[5:]) or "")
    if caption_field:
        return fields.get(caption_field, b"").decode("utf-8", "replace")
    if "txt" in fields:
        return fields["txt"].decode("utf-8", "replace")
    if "json" in fields:
        return str(json.loads(fields["json"] or b"{}").get("caption") or "")
    return ""


def read_tar(path: Path, name: str, caption_field: str | None, skipped: dict[str, int]) -> list[Item]:
    """Index one tar: an Item per sample (image by offset, caption read now)."""
    groups: dict[str, dict] = {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                d, _, base = m.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                g = groups.setdefault(f"{d}/{stem}" if d else stem, {"img": None, "fields": {}})
                ext = ext.lower()
                if ext in IMAGE_FIELDS:
                    g["img"] = g["img"] or (m.offset_data, m.size)
                elif ext in ("txt", "json") or ext == (caption_field or ""):
                    g["fields"][ext] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"webdataset source: {path} is not a readable tar ({e})") from e
    items = []
    for key, g in groups.items():
        if g["img"] is None:
            count(skipped, "no_image")
            continue
        try:
            cap = " ".join(_caption(g["fields"], caption_field).split())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            cap = ""
        if not cap:
            count(skipped, "empty_caption")
            continue
        items.append(Item(f"{name}/{key}", str(path), [cap], member=g["img"]))
    return items


def read(root: str, splits: list[str], cache: Path, caption_field: str | None = None,
         fit: str = "center") -> SourceSet:
    lists = shard_list(str(root))
    if not any(lists.values()):
        raise DataError(f"webdataset source {root}: no .tar shards found")
    skipped: dict[str, int] = {}
    by_split: dict[str, list[Item]] = {}
    for split, urls in lists.items():
        items = []
        for u in urls:
            local = fetch(u, cache) if is_url(u) else Path(u)
            if not local.is_file():
                raise DataError(f"webdataset source: missing shard {u}")
            items += read_tar(local, Path(u.split("?")[0]).stem, caption_field, skipped)
        by_split[split] = items
    if "all" in by_split:
        by_split = split_by_hash(by_split["all"], DEFAULT_TEST_FRACTION)
    out = {s: by_split.get(s, []) for s in splits}
    info = {"shards": sum(len(v) for v in lists.values()),
            "caption_field": caption_field or "txt|json:caption"}
    return SourceSet("webdataset", str(root), out, fit, None, 0, {}, skipped, info)
