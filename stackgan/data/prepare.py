"""Pack a data set (CUB, the embedded bird set, or another source) into webdataset tar shards, once.

Why: StackGAN's original loader decodes and crops every JPEG from a folder on every step;
on a cluster that is slow and hard on shared filesystems. Here the StackGAN bbox crop (or,
for sources without boxes, the whole image made square: :mod:`stackgan.data.sources`) is
done once, resized to 76 and 304, stored as JPEG q100 without chroma subsampling (within half
a grey level of the crop; lossless WebP with ``--image-format webp``) and packed
with the caption embeddings, the captions and the class id into tar shards (format:
:mod:`stackgan.data.meta`).

Guarantees: all inputs are validated before any work (one error lists every problem);
each shard is written to a temp name and renamed, so a shard under its final name is
always complete; a per-shard record (``<out>/.prepare/<shard>.json``: fingerprint of its
inputs, sample count, sha256) lets an interrupted run resume without redoing finished
shards, and a rerun with the same inputs does nothing. ``metadata.json`` is written last
(and removed first when the folder is about to change).

    python shards/prepare.py                                   # embedded default set
    python shards/prepare.py --cub-root Data/birds/CUB_200_2011 --birds-root Data/birds \\
        --out shards/cub --workers 8
    python shards/prepare.py --source flowers --root Data/flowers --out shards/flowers
    python shards/prepare.py --root /data/laion-subset --out shards/laion   # source auto-detected
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import StackGANError, report
from ..files import atomic_json, atomic_path
from ..images import STORED_SIZES
from ..text import CHAR_CNN_RNN, PrecomputedEncoder, get_encoder
from . import birds, cub, sources
from .concurrency import folder_lock, parallel_map
from .cub import DataError
from .meta import FORMAT, IMAGE_FORMATS, LACKABLE, ShardInfo, ShardMeta, SplitInfo, load_metadata, write_metadata
from .sources import coco as coco_src
from .sources import flowers as flowers_src
from .sources import folder as folder_src
from .sources import webdataset as wds_src

PREP_VERSION = 1  # bump when the bytes written for the same inputs change
DEFAULT_IMAGE_FORMAT = "jpg"  # at quality 100, 4:4:4; why, with the measurements: docs/data.md "Crop format"
WRITE_FORMATS = ("jpg", "webp")  # PNG is readable but not written: lossless WebP beat it on every measure
DEFAULT_CUB_OUT = Path("shards/cub")
DEFAULT_EMBEDDED_OUT = Path("shards/birds-embedded")
STATE_DIR = ".prepare"


@dataclass
class PrepareOptions:
    cub_root: Path | None = None  # None: the embedded set (generated or reused)
    birds_root: Path | None = None  # None: found next to the CUB root
    out: Path | None = None  # None: shards/cub or shards/birds-embedded
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    classes: list[str] | None = None  # ["40"] = first 40 of each split; or ids / class names
    shard_size: int = 500  # at most this many samples per shard (sizes balanced within a split)
    workers: int = 1  # processes writing shards (<= 1: in this process)
    sizes: tuple[int, ...] = STORED_SIZES
    jpeg_quality: int = 100  # with image_format="jpg" (>= 95: 4:4:4 chroma, no subsampling)
    image_format: str = DEFAULT_IMAGE_FORMAT  # one of IMAGE_FORMATS
    source: str | None = None  # one of sources.SOURCES; None: auto-detected from root / cub_root
    root: str | None = None  # the source's root (folder, tar, pattern or URL) for non-CUB sources
    fit: str = "center"  # webdataset / folder: "center" crop or "pad" to a square
    caption_field: str | None = None  # webdataset: "txt" or "json:KEY" (None: txt, else json caption)
    reembed: bool = False  # replace the pickled embeddings by sentence-encoder ones
    encoder: str = "all-MiniLM-L6-v2"  # used with reembed
    allow_class_overlap: bool = False  # accept a train/test split that shares classes
    progress: bool = True
    embedded_dir: Path = Path("data/birds-embedded")
    embedded_species: int | None = None
    embedded_images: int | None = None
    embedded_seed: int = 0


@dataclass
class PrepareResult:
    out: Path
    shards_total: int
    shards_written: int
    shards_reused: int
    samples: dict[str, int]
    samples_written: int
    seconds: float
    up_to_date: bool


@dataclass
class _Sample:
    key: str  # StackGAN key
    path: str
    bbox: tuple[float, float, float, float] | None  # None: the whole image, made square by ``fit``
    class_id: int
    captions: list[str]
    emb: np.ndarray  # (C, D) float32
    attr: np.ndarray | None
    fit: str = "bbox"
    member: tuple[int, int] | None = None  # (offset, size) of the image inside the tar ``path``


@dataclass
class _ShardTask:
    split: str
    name: str
    first_index: int  # running index of its first sample within the split
    samples: list[_Sample]
    fingerprint: str = ""
    skip_bad: bool = False  # an undecodable image is counted and left out (else: an error)


def _log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Class selection
# --------------------------------------------------------------------------------------
def select_classes(layout: cub.CubLayout, splits: list[str], spec: list[str] | None) -> dict[str, list[int]]:
    """Class ids kept per split. ``["N"]``: the first N classes (by id) of each split;
    otherwise ids or class names (``017.Cardinal`` or ``Cardinal``), comma or space separated;
    each split keeps the listed classes it has (a sample never changes split)."""
    have = {s: sorted(set(layout.splits[s].class_ids)) for s in splits}
    if not spec:
        return have
    items = [x.strip() for s in spec for x in str(s).split(",") if x.strip()]
    if len(items) == 1 and items[0].isdigit() and "," not in "".join(spec):
        n = int(items[0])
        if n < 1:
            raise DataError(f"--classes {n}: need at least one class")
        out = {}
        for s in splits:
            if n > len(have[s]):
                _log(f"note: --classes {n}: split {s!r} has only {len(have[s])} classes; taking all")
            out[s] = have[s][:n]
        return out
    by_name = {}
    for cid, name in layout.class_names.items():
        by_name[name.lower()] = cid
        by_name[name.split(".", 1)[-1].lower()] = cid
    wanted, unknown = set(), []
    for it in items:
        if it.isdigit():
            cid = int(it)
            (wanted.add(cid) if cid in layout.class_names else unknown.append(it))
        elif it.lower() in by_name:
            wanted.add(by_name[it.lower()])
        else:
            unknown.append(it)
    if unknown:
        raise DataError(f"--classes: unknown class(es) {unknown} (not in {layout.cub_root / 'classes.txt'})")
    out = {s: [c for c in have[s] if c in wanted] for s in splits}
    nowhere = sorted(wanted - {c for cs in out.values() for c in cs})
    if nowhere:
        raise DataError(f"--classes: class(es) {nowhere} are in none of the splits {splits}")
    empty = [s for s in splits if not out[s]]
    if empty:
        raise DataError(f"--classes: split(s) {empty} have none of the listed classes "
                        f"(StackGAN's split is class-disjoint); prepare only the others, e.g. --splits "
                        + " ".join(s for s in splits if s not in empty))
    return out


def _check_disjoint(layout: cub.CubLayout) -> None:
    """Test classes must never reach train shards: refuse a source whose split shares classes."""
    ids = {}
    for s in cub.SPLITS:
        if s in layout.splits:
            ids[s] = set(layout.splits[s].class_ids)
        elif (layout.birds_root / s / "class_info.pickle").is_file():
            ids[s] = {int(c) for c in cub.load_py2_pickle(layout.birds_root / s / "class_info.pickle")}
    if len(ids) == 2:
        both = sorted(ids["train"] & ids["test"])
        if both:
            raise DataError(
                f"{layout.birds_root}: classes {both[:20]}{' ...' if len(both) > 20 else ''} appear in both "
                "the "
                "train and the test pickles; StackGAN's split is class-disjoint. Pass --allow-class-overlap "
                "if this split is intended.")


# --------------------------------------------------------------------------------------
# One shard
# --------------------------------------------------------------------------------------
def encode_image(img, fmt: str, quality: int = 90) -> bytes:
    """A crop's stored bytes: JPEG, lossless WebP (fastest effort) or PNG (fast zlib level; benchmarks)."""
    buf = io.BytesIO()
    if fmt == "webp":
        img.save(buf, "WEBP", lossless=True, quality=0, method=0)
    elif fmt == "png":
        img.save(buf, "PNG", compress_level=1)
    elif fmt == "jpg":
        img.save(buf, "JPEG", quality=quality, **({"subsampling": 0} if quality >= 95 else {}))
    else:
        raise DataError(f"image format must be one of {IMAGE_FORMATS}, got {fmt!r}")
    return buf.getvalue()


def jpeg_bytes(img, quality: int) -> bytes:
    """JPEG bytes as shards store them (stackgan.metrics.redraw draws birds through this)."""
    return encode_image(img, "jpg", quality)


def _source_image(s: _Sample):
    """The sample's source image, decoded, RGB."""
    from PIL import Image

    if s.member is None:
        return cub.load_rgb(Path(s.path))
    off, size = s.member
    with open(s.path, "rb") as f:
        data = os.pread(f.fileno(), size, off)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def sample_crops(s: _Sample, sizes) -> list:
    """The stored crops of one sample: StackGAN's bbox crop, or the whole image made square."""
    from PIL import Image

    img = _source_image(s)
    if s.bbox is not None:
        return cub.crop_resize(img, s.bbox, sizes)
    sq = sources.fit_square(img, s.fit)
    return [sq.resize((n, n), Image.BILINEAR) for n in sizes]


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: same inputs, same bytes
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
    tar.addfile(info, io.BytesIO(data))


def sample_key(index: int) -> str:
    return f"s{index:07d}"


def _shard_bytes(task: _ShardTask, sizes, quality, fmt: str = "jpg") -> tuple[bytes, int]:
    """The shard's bytes and how many samples were left out (undecodable, with ``skip_bad``)."""
    buf = io.BytesIO()
    bad = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, s in enumerate(task.samples):
            try:
                crops = sample_crops(s, sizes)
            except Exception as e:
                if task.skip_bad:
                    bad += 1
                    continue
                where = s.path if s.member is None else f"{s.path} (sample {s.key})"
                raise DataError(f"cannot decode image {where} ({type(e).__name__}: {e})") from e
            k = sample_key(task.first_index + i)
            _add(tar, f"{k}.name.txt", s.key.encode())
            for size, crop in zip(sizes, crops):
                _add(tar, f"{k}.{size}.{fmt}", encode_image(crop, fmt, quality))
            _add(tar, f"{k}.emb.npy", _npy(s.emb.astype(np.float32)))
            _add(tar, f"{k}.txt.json", json.dumps(s.captions).encode())
            _add(tar, f"{k}.cls", str(s.class_id).encode())
            if s.attr is not None:
                _add(tar, f"{k}.attr.npy", _npy(s.attr.astype(np.uint8)))
    return buf.getvalue(), bad


def _write_shard(job) -> dict:
    """Build one shard in memory, write it under a temp name, fsync, rename, record it."""
    task, out, sizes, quality, fmt, hook = job
    out = Path(out)
    data, bad = _shard_bytes(task, sizes, quality, fmt)
    digest = hashlib.sha256(data).hexdigest()
    final = out / task.name
    tmp = out / f".{task.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if hook:
        hook("tmp-written", task.name)
    # the record goes first: a shard under its final name always has one (a record whose shard
    # never got renamed is harmless: _finished checks the file's sha256 against it)
    record = {"fingerprint": task.fingerprint, "num_samples": len(task.samples) - bad, "sha256": digest,
              "bytes": len(data), "planned": len(task.samples), "undecodable": bad}
    atomic_json(out / STATE_DIR / f"{task.name}.json", record)
    os.replace(tmp, final)
    return {"name": task.name, **record}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _finished(out: Path, task: _ShardTask) -> dict | None:
    """The shard's record if it is on disk, complete and made from these very inputs."""
    rec_path = out / STATE_DIR / f"{task.name}.json"
    tar = out / task.name
    if not (rec_path.is_file() and tar.is_file()):
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except json.JSONDecodeError:
        return None
    planned = rec.get("planned", rec.get("num_samples"))  # records written before skipping existed
    if rec.get("fingerprint") != task.fingerprint or planned != len(task.samples):
        return None
    if tar.stat().st_size != rec.get("bytes") or file_sha256(tar) != rec.get("sha256"):
        return None
    return {"name": task.name, **rec}


# --------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------
def _fingerprint(task: _ShardTask, opts: PrepareOptions, encoder: str) -> str:
    h = hashlib.sha256()
    head = {"format": FORMAT, "version": PREP_VERSION, "sizes": list(opts.sizes),
            "quality": opts.jpeg_quality, "encoder": encoder, "split": task.split, "first": task.first_index}
    if opts.image_format != "jpg":  # (folders written before formats existed stay up to date)
        head["image_format"] = opts.image_format
    h.update(json.dumps(head, sort_keys=True).encode())
    for s in task.samples:
        st = os.stat(s.path)
        where = list(s.bbox) if s.bbox is not None else [s.fit, s.member]
        h.update(json.dumps([s.key, os.path.abspath(s.path), st.st_size, st.st_mtime_ns, where,
                             s.class_id, s.captions]).encode())
        h.update(np.ascontiguousarray(s.emb, np.float32).tobytes())
        if s.attr is not None:
            h.update(s.attr.tobytes())
    return h.hexdigest()


def balanced_sizes(n: int, max_size: int) -> list[int]:
    """Shard sizes for n samples: as few shards as ``max_size`` allows, sizes differing by at
    most one (so that ranks streaming whole shards see nearly equal amounts)."""
    k = -(-n // max_size)
    if k == 0:
        return []
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


def embed_distinct(enc, distinct: list[str]) -> dict[str, np.ndarray]:
    """caption -> embedding, in batches of similar length: padding to a batch's longest caption
    is most of the encoder's cost on web captions (1.57x less CPU than alphabetical batches on
    4-40-word captions; the same vectors to 2e-7)."""
    by_len, step, vec = sorted(distinct, key=lambda c: (len(c), c)), getattr(enc, "batch_size", 64), {}
    for i in range(0, len(by_len), step):
        vec.update(zip(by_len[i:i + step], enc.encode(by_len[i:i + step])))
    return vec


def _reembed(captions: list[list[str]], encoder_name: str, cache_dir: Path,
             progress: bool) -> tuple[np.ndarray, str, int]:
    """Sentence-encoder embeddings for every caption, cached on disk for resumed runs."""
    enc = get_encoder(encoder_name)
    h = hashlib.sha256(json.dumps([enc.name, captions]).encode()).hexdigest()[:20]
    cache = cache_dir / f"reembed-{h}.npy"
    if cache.is_file():
        return np.load(cache), enc.name, enc.dim
    flat = [c for caps in captions for c in caps]
    distinct = sorted(set(flat))
    if progress:
        _log(f"re-embedding {len(distinct)} distinct captions with {enc.name} ...")
    t0 = time.time()
    vec = embed_distinct(enc, distinct)  # raises for precomputed-only encoders
    if progress:
        _log(f"  done in {time.time() - t0:.1f}s")
    arr = np.stack([np.stack([vec[c] for c in caps]) for caps in captions]).astype(np.float32)
    with atomic_path(cache, suffix=".npy") as tmp:
        np.save(tmp, arr)
    return arr, enc.name, enc.dim


def _resolve_source(opts: PrepareOptions) -> tuple[Path, Path | None, Path, dict]:
    """(cub_root, birds_root, out, source info); generates the embedded set when asked."""
    if opts.cub_root is None:
        species = opts.embedded_species or birds.DEFAULT_SPECIES
        images = opts.embedded_images or birds.DEFAULT_IMAGES
        root = birds.generate(opts.embedded_dir, species, images, opts.embedded_seed,
                              workers=max(1, opts.workers), quiet=not opts.progress)
        return root / "CUB_200_2011", root / "birds", opts.out or DEFAULT_EMBEDDED_OUT, {"kind": "embedded"}
    cub_root = Path(opts.cub_root)
    kind = "embedded" if (cub_root.parent / "birds" / "generator.json").is_file() else "cub"
    return cub_root, opts.birds_root, opts.out or DEFAULT_CUB_OUT, {"kind": kind}


def plan(opts: PrepareOptions):
    """Read + validate the source and cut it into shard tasks (no image is decoded)."""
    if opts.shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {opts.shard_size}")
    if not 1 <= opts.jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality must be in 1..100, got {opts.jpeg_quality}")
    bad = [s for s in opts.splits if s not in cub.SPLITS]
    if bad or not opts.splits:
        raise DataError(f"--splits: {bad or 'none given'}; choose from {list(cub.SPLITS)}")
    if not opts.sizes or any(not 8 <= int(s) <= 4096 for s in opts.sizes):
        raise DataError(f"--sizes: {list(opts.sizes)}; each must be in 8..4096")
    if opts.image_format not in WRITE_FORMATS:
        raise DataError(f"--image-format must be one of {list(WRITE_FORMATS)}, got {opts.image_format!r}")
    if opts.fit not in ("center", "pad"):
        raise DataError(f"--fit must be 'center' or 'pad', got {opts.fit!r}")
    kind = detect_source(opts)
    if kind != "cub":
        return _plan_source(opts, kind)
    if opts.cub_root is None and opts.root is not None:
        opts = replace(opts, cub_root=Path(opts.root))
    if opts.reembed:
        enc = get_encoder(opts.encoder)  # unknown names fail here, before any work
        if isinstance(enc, PrecomputedEncoder):
            enc.encode([])  # raises: a precomputed encoder cannot re-embed captions
    cub_root, birds_root, out, source = _resolve_source(opts)
    layout = cub.read_layout(cub_root, birds_root, list(dict.fromkeys(opts.splits)))
    if not opts.allow_class_overlap:
        _check_disjoint(layout)
    splits = list(layout.splits)
    keep = select_classes(layout, splits, opts.classes)
    keep_sets = {s: set(keep[s]) for s in splits}
    rows = {s: [i for i, c in enumerate(layout.splits[s].class_ids) if c in keep_sets[s]] for s in splits}
    keys = {s: [layout.splits[s].keys[i] for i in rows[s]] for s in splits}
    ncap = {s: layout.splits[s].embeddings.shape[1] for s in splits}
    read: dict[str, list[str]] = {}
    cub.validate(layout, keys, captions=read)  # everything checked before any work
    captions = {s: [read[k] for k in keys[s]] for s in splits}
    encoder, dim = layout.encoder, layout.text_dim
    emb = {s: layout.splits[s].embeddings[rows[s]] for s in splits}
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_DIR).mkdir(exist_ok=True)
    if opts.reembed:
        for s in splits:
            emb[s], encoder, dim = _reembed(captions[s], opts.encoder, out / STATE_DIR, opts.progress)

    tasks: list[_ShardTask] = []
    for s in splits:
        recs = [layout.images[k] for k in keys[s]]
        attrs = layout.attributes([r.image_id for r in recs])
        samples = [_Sample(k, str(r.path), r.bbox, r.class_id, caps, e, None if attrs is None else attrs[i])
                   for i, (k, r, caps, e) in enumerate(zip(keys[s], recs, captions[s], emb[s]))]
        start = 0
        for j, n in enumerate(balanced_sizes(len(samples), opts.shard_size)):
            t = _ShardTask(s, f"{s}-{j:06d}.tar", start, samples[start:start + n])
            t.fingerprint = _fingerprint(t, opts, encoder)
            tasks.append(t)
            start += n
    gen = (cub_root.parent / "birds" / "generator.json")
    source.update({
        "cub_root": str(cub_root.resolve()), "birds_root": str(layout.birds_root.resolve()),
        "classes": opts.classes or "all", "source_encoder": layout.encoder, "reembedded": bool(opts.reembed),
        "jpeg_quality": opts.jpeg_quality, "shard_size": opts.shard_size,
        **({"generator": json.loads(gen.read_text())} if gen.is_file() else {}),
    })
    class_names = {c: layout.class_names[c] for s in splits for c in keep[s]}
    described = json.dumps([sorted(class_names.items()), layout.attribute_names, encoder, dim])
    source["plan"] = hashlib.sha256(("".join(t.fingerprint for t in tasks) + described).encode()).hexdigest()
    meta = ShardMeta(
        root=out, encoder=encoder, text_dim=dim, image_sizes=list(opts.sizes),
        captions_per_image=max(ncap.values()) if ncap else 10,
        splits={s: SplitInfo(len(keys[s]), list(keep[s])) for s in splits},
        class_names=class_names,
        attributes=list(layout.attribute_names), source=source, image_format=opts.image_format,
        lacks=[x for x, has in zip(LACKABLE, (True, bool(layout.attribute_names), encoder == CHAR_CNN_RNN))
               if not has])
    return out, tasks, meta


# --------------------------------------------------------------------------------------
# Other sources (stackgan.data.sources)
# --------------------------------------------------------------------------------------
def detect_source(opts: PrepareOptions) -> str:
    """The source kind: ``--source``, else CUB for ``--cub-root`` (or nothing: the embedded
    set), else told from the layout under ``--root``."""
    if opts.source is not None:
        if opts.source not in sources.SOURCES:
            raise DataError(f"--source must be one of {list(sources.SOURCES)}, got {opts.source!r}")
        if opts.source != "cub" and opts.root is None:
            raise DataError(f"--source {opts.source} needs --root (the data set's folder, tar or URL)")
        return opts.source
    if opts.cub_root is not None or opts.root is None:
        return "cub"
    root = str(opts.root)
    if wds_src.is_url(root) or "{" in root or root.endswith(".tar"):
        return "webdataset"
    p = Path(root)
    if not p.exists():
        raise DataError(f"--root {root}: no such file or folder")
    if (p / "images.txt").is_file() and (p / "bounding_boxes.txt").is_file():
        return "cub"
    for kind, looks in (("flowers", flowers_src.looks_like), ("coco", coco_src.looks_like),
                        ("webdataset", wds_src.looks_like), ("folder", folder_src.looks_like)):
        if looks(p if kind != "webdataset" else root):
            return kind
    raise DataError(f"--root {root}: not a layout of any source {list(sources.SOURCES)} "
                    "(see docs/data.md); pass --source")


def _read_source(opts: PrepareOptions, kind: str, splits: list[str], state: Path) -> sources.SourceSet:
    root = str(opts.root)
    if kind == "flowers":
        return flowers_src.read(Path(root), splits)
    if kind == "coco":
        return coco_src.read(Path(root), splits)
    if kind == "webdataset":
        return wds_src.read(root, splits, state / "sources", opts.caption_field, opts.fit)
    return folder_src.read(Path(root), splits, opts.fit)


def _plan_source(opts: PrepareOptions, kind: str):
    """Like the CUB plan, for a :mod:`stackgan.data.sources` reader."""
    if opts.classes:
        raise DataError(f"--classes selects CUB species; the {kind} source does not take it")
    if opts.caption_field and kind != "webdataset":
        raise DataError(f"--caption-field is for the webdataset source, not {kind}")
    splits = list(dict.fromkeys(opts.splits))
    out = Path(opts.out or f"shards/{kind}")
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    src = _read_source(opts, kind, splits, out / STATE_DIR)
    for s in [s for s in splits if not src.splits.get(s)]:
        _log(f"note: the {kind} source has no samples for split {s!r}; it is left out")
        src.splits.pop(s, None)
    if not src.splits:
        raise DataError(f"{kind} source {opts.root}: no usable samples ({src.skipped or 'none found'})")
    splits = list(src.splits)
    classes = src.has_classes
    if classes and not opts.allow_class_overlap and len(splits) == 2:
        both = sorted({it.cls for it in src.splits["train"]} & {it.cls for it in src.splits["test"]})
        if both:
            raise DataError(f"{kind} source {opts.root}: classes {both[:20]} are in both splits; pass "
                            "--allow-class-overlap if this split is intended")
    if src.encoder is not None and not opts.reembed:
        ncap = src.splits[splits[0]][0].emb.shape[0]
        captions = {s: [sources.fixed_captions(it.captions, ncap) for it in src.splits[s]] for s in splits}
        emb = {s: np.stack([it.emb for it in src.splits[s]]) for s in splits}
        encoder, dim = src.encoder, src.text_dim
    else:
        ncap = min(10, max(len(it.captions) for items in src.splits.values() for it in items))
        captions = {s: [sources.fixed_captions(it.captions, ncap) for it in src.splits[s]] for s in splits}
        emb = {}
        for s in splits:
            emb[s], encoder, dim = _reembed(captions[s], opts.encoder, out / STATE_DIR, opts.progress)
    tasks: list[_ShardTask] = []
    next_id = 1  # classless sources: a per-image id, unique across splits (wrong pair = any other image)
    for s in splits:
        samples = []
        for it, caps, e in zip(src.splits[s], captions[s], emb[s]):
            cid = it.cls if classes else next_id
            next_id += 1
            samples.append(_Sample(it.key, it.path, None, cid, caps, e, None, src.fit, it.member))
        start = 0
        for j, n in enumerate(balanced_sizes(len(samples), opts.shard_size)):
            t = _ShardTask(s, f"{s}-{j:06d}.tar", start, samples[start:start + n], skip_bad=True)
            t.fingerprint = _fingerprint(t, opts, encoder)
            tasks.append(t)
            start += n
    source = {"kind": kind, "root": src.root, **src.info, "fit": src.fit, "source_encoder": src.encoder,
              "reembedded": src.encoder is None or bool(opts.reembed), "shard_size": opts.shard_size,
              **({"jpeg_quality": opts.jpeg_quality} if opts.image_format == "jpg" else {})}
    class_names = dict(src.class_names) if classes else {}
    described = json.dumps([sorted(class_names.items()), encoder, dim, src.skipped])
    source["plan"] = hashlib.sha256(("".join(t.fingerprint for t in tasks) + described).encode()).hexdigest()
    meta = ShardMeta(
        root=out, encoder=encoder, text_dim=dim, image_sizes=list(opts.sizes), captions_per_image=ncap,
        splits={s: SplitInfo(len(src.splits[s]), sorted({it.cls for it in src.splits[s]}) if classes else [])
                for s in splits},
        class_names=class_names, attributes=[], source=source, image_format=opts.image_format,
        lacks=[x for x, has in zip(LACKABLE, (classes, False, encoder == CHAR_CNN_RNN)) if not has],
        skipped=dict(src.skipped))
    return out, tasks, meta


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def prepare(opts: PrepareOptions, hook: Callable[[str, str], None] | None = None) -> PrepareResult:
    """Validate, then write every shard not already finished, then ``metadata.json``.

    ``hook(event, shard_name)`` is for tests: "tmp-written" (only with workers <= 1, between
    the temp write and the rename) and "done" (in this process, after each new shard)."""
    t0 = time.time()
    out, tasks, meta = plan(opts)
    with folder_lock(out / STATE_DIR / "lock"):
        return _run(opts, out, tasks, meta, hook, t0)


def _run(opts: PrepareOptions, out: Path, tasks: list[_ShardTask], meta: ShardMeta, hook,
         t0: float) -> PrepareResult:
    samples = {s: v.num_samples for s, v in meta.splits.items()}
    meta_path = out / "metadata.json"

    done: dict[str, dict] = {}
    for t in tasks:
        rec = _finished(out, t)
        if rec is not None:
            done[t.name] = rec
    if meta_path.is_file() and len(done) == len(tasks):
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("source", {}).get("plan") == meta.source["plan"]:
            if opts.progress:
                _log(f"{out}: up to date ({len(tasks)} shards, {sum(samples.values())} samples); "
                     "nothing to do")
            return PrepareResult(out, len(tasks), 0, len(tasks), samples, 0, time.time() - t0, True)

    # the folder is about to change: it must not be described by a stale metadata.json
    meta_path.unlink(missing_ok=True)
    planned = {t.name for t in tasks}
    for p in list(out.glob(".*.tmp")) + list(out.glob(f"{STATE_DIR}/.*.tmp*")):
        p.unlink(missing_ok=True)  # leftovers of an interrupted run
    for rec in (out / STATE_DIR).glob("*.tar.json"):  # our own shards no longer in the plan
        name = rec.name[:-5]
        if name not in planned:
            (out / name).unlink(missing_ok=True)
            rec.unlink()

    todo = [t for t in tasks if t.name not in done]
    n_todo = sum(len(t.samples) for t in todo)
    if opts.progress and done:
        _log(f"{out}: {len(done)} of {len(tasks)} shards already up to date (kept); writing the rest")
    from tqdm import tqdm

    bar = tqdm(total=n_todo, desc=f"prepare {out}", unit="img", disable=not opts.progress or not todo)
    t_work = time.time()
    try:
        if opts.workers <= 1 or len(todo) <= 1:
            for t in todo:
                rec = _write_shard((t, str(out), tuple(opts.sizes), opts.jpeg_quality, opts.image_format,
                                    hook))
                done[t.name] = rec
                bar.update(rec["num_samples"])
                if hook:
                    hook("done", t.name)
        else:
            jobs = [(t, str(out), tuple(opts.sizes), opts.jpeg_quality, opts.image_format, None)
                    for t in todo]
            for rec in parallel_map(_write_shard, jobs, opts.workers):
                done[rec["name"]] = rec
                bar.update(rec["num_samples"])
                if hook:
                    hook("done", rec["name"])
    finally:
        bar.close()
    work_s = time.time() - t_work

    for s, info in meta.splits.items():  # (a shard whose every image was undecodable is not listed)
        info.shards = [ShardInfo(t.name, done[t.name]["num_samples"], done[t.name]["sha256"])
                       for t in tasks if t.split == s and done[t.name]["num_samples"] > 0]
        info.num_samples = sum(sh.num_samples for sh in info.shards)
    bad = sum(done[t.name].get("undecodable", 0) for t in tasks)
    if bad:
        meta.skipped["undecodable"] = bad
    write_metadata(meta)  # last: its presence means the folder is complete
    if opts.progress:
        rate = f", {n_todo / work_s:.1f} images/s" if n_todo and work_s > 0 else ""
        _log(f"{out}: wrote {len(todo)} shards ({n_todo} samples{rate}), kept {len(tasks) - len(todo)}; "
             f"splits {samples}; encoder {meta.encoder} ({meta.text_dim}-d)")
    samples = {s: v.num_samples for s, v in meta.splits.items()}  # less what proved undecodable
    return PrepareResult(out, len(tasks), len(todo), len(tasks) - len(todo), samples, n_todo,
                         time.time() - t0, False)


# --------------------------------------------------------------------------------------
# Inspecting a shard folder
# --------------------------------------------------------------------------------------
def inspect(root: str | Path, split: str | None = None) -> str:
    """A human-readable summary of a shard folder and of its first sample."""
    from PIL import Image

    meta = load_metadata(root)
    lines = [f"{meta.root}: encoder {meta.encoder} ({meta.text_dim}-d), image sizes {meta.image_sizes}, "
             f"{len(meta.class_names)} classes, {len(meta.attributes)} attributes, "
             f"source {meta.source.get('kind')}, crops {meta.image_format}, lacks {meta.lacks or 'nothing'}"
             + (f", skipped {meta.skipped}" if meta.skipped else "")]
    for s, info in meta.splits.items():
        lines.append(f"  {s}: {info.num_samples} samples in {len(info.shards)} shards, "
                     f"classes {info.classes[:10]}"
                     f"{' ...' if len(info.classes) > 10 else ''}")
    split = split or next(iter(meta.splits))
    urls = meta.urls(split)
    if urls:
        with tarfile.open(urls[0]) as tar:
            members = tar.getmembers()
            first = members[0].name.split(".", 1)[0]
            lines.append(f"  first sample of {Path(urls[0]).name} ({len(members)} files):")
            for m in members:
                if m.name.split(".", 1)[0] != first:
                    break
                data = tar.extractfile(m).read()
                ext = m.name.split(".", 1)[1]
                if ext.rsplit(".", 1)[-1] in IMAGE_FORMATS:
                    with Image.open(io.BytesIO(data)) as im:
                        desc = f"{im.format} {im.size[0]}x{im.size[1]} {im.mode}"
                elif ext.endswith(".npy"):
                    a = np.load(io.BytesIO(data))
                    desc = f"{a.dtype} {tuple(a.shape)}"
                elif ext == "txt.json":
                    caps = json.loads(data)
                    desc = f"{len(caps)} captions, e.g. {caps[0]!r}"
                else:
                    desc = repr(data.decode())
                lines.append(f"    {m.name:<24} {len(data):>7} B  {desc}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def _default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python shards/prepare.py",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("source")
    src.add_argument("--source", choices=list(sources.SOURCES),
                     help="the data set's layout (default: --cub-root means cub; --root is looked at; "
                          "neither: the embedded bird set); layouts: docs/data.md")
    src.add_argument("--root", help="the source's folder (flowers, coco, folder, cub), or for webdataset a "
                                    "folder, .tar, brace pattern or URL (https://, pipe:CMD)")
    src.add_argument("--fit", choices=["center", "pad"], default="center",
                     help="webdataset/folder: centre-crop or pad each image to a square "
                          "(default %(default)s)")
    src.add_argument("--caption-field", help="webdataset: 'txt' or 'json:KEY' (default: txt, else the "
                                             "json's caption)")
    src.add_argument("--cub-root", type=Path, help="the CUB_200_2011 folder (omit: the embedded bird set)")
    src.add_argument("--birds-root", type=Path,
                     help="StackGAN's birds folder with train/, test/, text_c10/ "
                          "(default: found next to --cub-root)")
    src.add_argument("--embedded", action="store_true",
                     help="use the embedded bird set (the default when --cub-root is not given)")
    src.add_argument("--embedded-dir", type=Path, default=Path("data/birds-embedded"),
                     help="where the embedded set is generated or reused (default %(default)s)")
    src.add_argument("--species", type=int, default=None,
                     help=f"embedded set: species (default {birds.DEFAULT_SPECIES})")
    src.add_argument("--images-per-species", type=int, default=None,
                     help=f"embedded set: images per species (default {birds.DEFAULT_IMAGES})")
    src.add_argument("--seed", type=int, default=0, help="embedded set: seed (default 0)")
    o = ap.add_argument_group("output")
    o.add_argument("--out", type=Path, help="shard folder (default shards/birds-embedded or shards/cub)")
    o.add_argument("--splits", nargs="+", default=["train", "test"], choices=list(cub.SPLITS))
    o.add_argument("--classes", nargs="+", metavar="C",
                   help="species subset: one number N = the first N classes of each split; or class ids / "
                        "names (e.g. 1 5 9, or 017.Cardinal); a single id needs a trailing comma (17,)")
    o.add_argument("--shard-size", type=int, default=500,
                   help="at most this many samples per shard; a split's shards are balanced "
                        "(default %(default)s)")
    o.add_argument("--sizes", type=int, nargs="+", default=list(STORED_SIZES),
                   help=f"crop sizes (default {' '.join(map(str, STORED_SIZES))})")
    o.add_argument("--image-format", choices=list(WRITE_FORMATS), default=DEFAULT_IMAGE_FORMAT,
                   help="stored crops: jpg (see --jpeg-quality) or webp (lossless) "
                        "(default %(default)s; why: docs/data.md)")
    o.add_argument("--jpeg-quality", type=int, default=100,
                   help="with --image-format jpg; >= 95 keeps full chroma (default %(default)s: within "
                        "half a grey level of the crop; 90 = shards made before)")
    o.add_argument("--reembed", action="store_true",
                   help="re-embed the captions with the sentence encoder (so the model can take free text)")
    o.add_argument("--encoder", default="all-MiniLM-L6-v2",
                   help="encoder for --reembed (default %(default)s)")
    o.add_argument("--allow-class-overlap", action="store_true",
                   help="accept train/test pickles that share classes (StackGAN's split does not)")
    run = ap.add_argument_group("run")
    run.add_argument("--workers", type=int, default=_default_workers(),
                     help="processes writing shards (default: usable cores, at most 8; 1 = in-process)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    run.add_argument("--inspect", type=Path, metavar="SHARD_DIR",
                     help="print a summary of a prepared folder and exit")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.inspect:
        try:
            print(inspect(a.inspect))
        except StackGANError as e:
            return report(e, "stackgan.prepare")
        return 0
    if a.embedded and (a.cub_root or a.root or a.source):
        print("error: --embedded excludes --cub-root, --root and --source", file=sys.stderr)
        return 2
    if a.cub_root and a.root:
        print("error: --cub-root and --root exclude each other (--root with --source cub is the same)",
              file=sys.stderr)
        return 2
    opts = PrepareOptions(
        cub_root=a.cub_root, birds_root=a.birds_root, out=a.out, splits=a.splits, classes=a.classes,
        shard_size=a.shard_size, workers=a.workers, sizes=tuple(a.sizes), jpeg_quality=a.jpeg_quality,
        reembed=a.reembed, encoder=a.encoder, allow_class_overlap=a.allow_class_overlap, progress=not a.quiet,
        embedded_dir=a.embedded_dir, embedded_species=a.species, embedded_images=a.images_per_species,
        embedded_seed=a.seed, image_format=a.image_format, source=a.source, root=a.root, fit=a.fit,
        caption_field=a.caption_field)
    try:
        prepare(opts)
    except StackGANError as e:
        return report(e, "stackgan.prepare")
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
