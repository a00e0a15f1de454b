"""Shard-set metadata: the one file that describes a prepared shard folder.

Layout of a prepared folder (written by ``shards/prepare.py``)::

    <dir>/metadata.json
    <dir>/train-000000.tar, train-000001.tar, ...
    <dir>/test-000000.tar, ...

One sample in a shard (webdataset convention: files sharing a ``__key__``):

    ``__key__``   ``s0000123`` (running index, unique within the split)
    ``name.txt``  the StackGAN key, e.g. ``002.Laysan_Albatross/Laysan_Albatross_0002_1027``
    ``76.jpg``    crop resized to 76x76 (stage I random-crops 64 from it); the extension is
                  ``metadata.json``'s ``image_format`` (``jpg`` by default, ``webp`` for lossless
                  crops; absent in folders made before it: ``jpg``): read the name from
                  :meth:`ShardMeta.image_field`
    ``304.jpg``   crop resized to 304x304 (stage II random-crops 256)
    ``emb.npy``   float32 (C, text_dim) caption embeddings (C = captions_per_image, 10 for CUB)
    ``txt.json``  list of the C captions
    ``cls``       class id (CUB's 1-based id, ASCII); a source without classes (``"classes"``
                  in ``lacks``) stores a per-image id instead, unique across splits, so that a
                  wrong pair "of another class" is any other image
    ``attr.npy``  uint8 (num_attributes,) attribute labels, when the source has them

``lacks`` lists what the source does not have (``classes``, ``attributes``,
``char-CNN-RNN`` embeddings) so that what needs them refuses; ``skipped`` counts the source
samples left out (undecodable image, empty caption, ...).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_json
from .storage import ShardError, parse  # ShardError lives with the opener and is re-exported here

FORMAT = "stackgan-shards/1"
IMAGE_FORMATS = ("webp", "png", "jpg")  # image field extensions a shard folder may use
LACKABLE = ("classes", "attributes", "char-CNN-RNN")


@dataclass
class ShardInfo:
    name: str  # file name relative to the shard folder
    num_samples: int
    sha256: str


@dataclass
class SplitInfo:
    num_samples: int
    classes: list[int]  # class ids present in this split
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class ShardMeta:
    root: Path | str  # local folder (a Path), or the URL / pipe: location of a remote set (a str)
    encoder: str  # text encoder the embeddings come from, e.g. "char-CNN-RNN"
    text_dim: int
    image_sizes: list[int]  # e.g. [76, 304]
    captions_per_image: int
    splits: dict[str, SplitInfo]
    class_names: dict[int, str]
    attributes: list[str]  # attribute names (CUB attributes.txt order), may be empty
    source: dict = field(default_factory=dict)  # where the data came from (free form)
    image_format: str = "jpg"  # extension of the image fields (one of IMAGE_FORMATS)
    lacks: list[str] = field(default_factory=list)  # of LACKABLE: what the source does not have
    skipped: dict[str, int] = field(default_factory=dict)  # source samples left out, by reason

    def image_field(self, size: int) -> str:
        """The member name of a sample's image at ``size`` px, e.g. ``76.webp``."""
        return f"{size}.{self.image_format}"

    def urls(self, split: str) -> list[str]:
        """Where a split's shards are, in order: local paths, or URLs / commands of a remote set."""
        if split not in self.splits:
            raise ShardError(f"{self.root}/metadata.json has no split {split!r} (has {sorted(self.splits)})")
        store = parse(self.root)
        return [store.where(s.name) for s in self.splits[split].shards]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "encoder": {"name": self.encoder, "dim": self.text_dim},
            "image_sizes": self.image_sizes,
            "captions_per_image": self.captions_per_image,
            "splits": {
                k: {
                    "num_samples": v.num_samples,
                    "classes": v.classes,
                    "shards": [s.__dict__ for s in v.shards],
                }
                for k, v in self.splits.items()
            },
            "class_names": {str(k): v for k, v in self.class_names.items()},
            "attributes": self.attributes,
            "source": self.source,
            "image_format": self.image_format,
            "lacks": self.lacks,
            "skipped": self.skipped,
        }


def load_metadata(root: str | Path) -> ShardMeta:
    """Read ``<root>/metadata.json`` from a folder or a URL (:func:`stackgan.data.storage.parse`);
    a clear error if the location is not a shard set."""
    store = parse(root)
    root = store.location if store.remote else Path(store.base)
    path = store.where("metadata.json")
    if not store.remote and not Path(path).is_file():
        raise ShardError(
            f"{path} not found: {root} is not a prepared shard folder "
            "(run `python shards/prepare.py --help`)"
        )
    try:
        d = json.loads(store.read_bytes("metadata.json"))
    except ShardError as e:
        raise ShardError(f"{e} (is {root} a prepared shard set? see `python shards/prepare.py --help`)") \
            from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    if d.get("format") != FORMAT:
        raise ShardError(f"{path}: format {d.get('format')!r}, expected {FORMAT!r}")
    try:
        splits = {
            k: SplitInfo(
                num_samples=int(v["num_samples"]),
                classes=[int(c) for c in v["classes"]],
                shards=[ShardInfo(**s) for s in v["shards"]],
            )
            for k, v in d["splits"].items()
        }
        return ShardMeta(
            root=root,
            encoder=d["encoder"]["name"],
            text_dim=int(d["encoder"]["dim"]),
            image_sizes=[int(s) for s in d["image_sizes"]],
            captions_per_image=int(d["captions_per_image"]),
            splits=splits,
            class_names={int(k): v for k, v in d["class_names"].items()},
            attributes=list(d.get("attributes") or []),
            source=dict(d.get("source") or {}),
            image_format=str(d.get("image_format") or "jpg"),  # folders written before it: JPEG
            lacks=[str(x) for x in d.get("lacks") or []],
            skipped={str(k): int(v) for k, v in (d.get("skipped") or {}).items()},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: missing or malformed field ({e!r})") from e


def write_metadata(meta: ShardMeta) -> Path:
    """Write metadata.json atomically (temp file + rename)."""
    return atomic_json(Path(meta.root) / "metadata.json", meta.to_json())
