"""Reader for CUB-200-2011 plus StackGAN's text files, and StackGAN's bounding-box crop.

Expected layout (the real data set, and the generated one in :mod:`stackgan.data.birds`)::

    CUB_200_2011/images.txt                 "<image_id> <class_dir>/<name>.jpg"
    CUB_200_2011/bounding_boxes.txt         "<image_id> <x> <y> <w> <h>" (floats)
    CUB_200_2011/classes.txt                "<class_id> <class_dir>"
    CUB_200_2011/image_class_labels.txt     "<image_id> <class_id>"
    CUB_200_2011/train_test_split.txt       "<image_id> <0|1>" (CUB's own split, unused)
    CUB_200_2011/images/<class_dir>/<name>.jpg
    [attributes.txt]                        "<attr_id> has_wing_color::blue" (optional; in
                                            the CUB root or next to it, as in the tarball)
    [CUB_200_2011/attributes/image_attribute_labels.txt]
                                            "<image_id> <attr_id> <is_present> <certainty> <time>"
    birds/{train,test}/filenames.pickle     keys "002.Laysan_Albatross/Laysan_Albatross_0002_1027"
    birds/{train,test}/class_info.pickle    class id per key
    birds/{train,test}/char-CNN-RNN-embeddings.pickle   (N, 10, D) float
    birds/text_c10/<class_dir>/<name>.txt   10 captions, one per line
    [birds/encoder.json]                    {"name": ..., "dim": ...} when not char-CNN-RNN

The pickles were written by Python 2 and are read with ``encoding="latin1"``, through an
unpickler that admits only numpy arrays and plain containers: the files come from third-party
mirrors, and a plain ``pickle.load`` runs whatever function a file names. The train/test split
is StackGAN's (class-disjoint 150/50), taken from the pickles.
"""
from __future__ import annotations

import json
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import StackGANError
from ..images import STORED_SIZES
from ..text import CHAR_CNN_RNN

SPLITS = ("train", "test")
MAX_LISTED = 20  # problems listed in one error message; the rest are counted


class DataError(StackGANError, ValueError):
    """Source data that cannot be used; the message lists every problem found."""


def problems_error(what: str, problems: list[str]) -> DataError:
    """One error for many problems: the first ``MAX_LISTED`` listed, the total counted."""
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return DataError(f"{what}: {len(problems)} problem(s):\n  {shown}{more}")


# --------------------------------------------------------------------------------------
# Small readers
# --------------------------------------------------------------------------------------
def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2, limited to that use."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not how bytes are pickled")
    return text.encode("latin1")


def _data_globals() -> dict[tuple[str, str], object]:
    """The only callables a data pickle may name: numpy's array, scalar and dtype
    reconstructors (under numpy 1.x and 2.x module names, taken from numpy's own reducers)."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _DataUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, str, bytes, numbers and numpy arrays; any other class or
    function named by the file is refused when its name is read, so it never runs."""

    def __init__(self, f, path: Path):
        super().__init__(f, encoding="latin1")
        self.path, self.allowed = path, _data_globals()

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.path}: refused to unpickle {module}.{name}: StackGAN's data pickles hold only numpy "
                f"arrays and plain lists/dicts/strings/numbers, so this file is not one of them (a tampered "
                f"download?); nothing from it was run") from None


def load_py2_pickle(path: Path):
    """Load a pickle written by Python 2 (StackGAN's): byte strings decoded as latin1, and
    only numpy arrays and plain containers admitted (:class:`_DataUnpickler`)."""
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, Path(path)).load()
    except (FileNotFoundError, DataError):
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read pickle ({type(e).__name__}: {e})") from e


def _read_table(path: Path, ncols: int) -> list[list[str]]:
    """Whitespace-separated table; the first ``ncols`` fields of each non-empty line."""
    if not path.is_file():
        raise DataError(f"{path} not found (is this the CUB_200_2011 folder?)")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < ncols:
            raise DataError(f"{path}:{lineno}: expected {ncols} fields, got {line!r}")
        rows.append(parts[:ncols])
    return rows


def _split_first(path: Path) -> dict[int, str]:
    """'<id> <rest of line>' tables (classes.txt, images.txt, attributes.txt)."""
    if not path.is_file():
        raise DataError(f"{path} not found")
    out = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        head, _, rest = line.partition(" ")
        try:
            out[int(head)] = rest.strip()
        except ValueError:
            raise DataError(f"{path}:{lineno}: expected '<id> <name>', got {line!r}") from None
    return out


def read_captions(path: Path, count: int) -> list[str]:
    """The first ``count`` non-empty lines of a text_c10 file."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    caps = [ln for ln in lines if ln]
    if len(caps) < count:
        raise DataError(f"{path}: {len(caps)} captions, expected {count}")
    return caps[:count]


# --------------------------------------------------------------------------------------
# StackGAN's crop
# --------------------------------------------------------------------------------------
def stackgan_crop_box(bbox, width: int, height: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of StackGAN's crop: a square of side 1.5 x max(w, h) around the
    box centre, clipped to the image. Like the official code, the box is first truncated
    to integers (it reads bounding_boxes.txt with pandas ``.astype(int)``)."""
    x, y, w, h = (int(float(v)) for v in bbox)
    r = int(max(w, h) * 0.75)
    cx = int((2 * x + w) / 2)
    cy = int((2 * y + h) / 2)
    return max(0, cx - r), max(0, cy - r), min(width, cx + r), min(height, cy + r)


def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully as RGB (CUB has a few greyscale JPEGs)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


def crop_resize(img: Image.Image, bbox, sizes=STORED_SIZES) -> list[Image.Image]:
    """StackGAN's bbox crop, then one bilinear resize per size (76: stage I, 304: stage II)."""
    box = stackgan_crop_box(bbox, *img.size)
    crop = img.crop(box)
    return [crop.resize((s, s), Image.BILINEAR) for s in sizes]


# --------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    key: str  # "<class_dir>/<name>" without .jpg (StackGAN's filenames.pickle key)
    path: Path
    bbox: tuple[float, float, float, float]  # x, y, w, h
    class_id: int


@dataclass
class SplitData:
    name: str
    keys: list[str]
    class_ids: list[int]
    embeddings: np.ndarray  # (N, captions_per_image, D) float32


@dataclass
class CubLayout:
    cub_root: Path
    birds_root: Path
    images: dict[str, ImageRecord]  # by key
    class_names: dict[int, str]  # class id -> class dir, e.g. "002.Laysan_Albatross"
    splits: dict[str, SplitData]
    encoder: str  # text encoder of the pickled embeddings
    text_dim: int
    attribute_names: list[str] = field(default_factory=list)
    attribute_labels_path: Path | None = None
    _attr: np.ndarray | None = field(default=None, repr=False)
    _attr_row: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def text_dir(self) -> Path:
        for name in ("text_c10", "text"):
            if (self.birds_root / name).is_dir():
                return self.birds_root / name
        return self.birds_root / "text_c10"

    def caption_path(self, key: str) -> Path:
        return self.text_dir / f"{key}.txt"

    def captions(self, key: str, count: int = 10) -> list[str]:
        return read_captions(self.caption_path(key), count)

    def attributes(self, image_ids: list[int]) -> np.ndarray | None:
        """(N, num_attributes) uint8 is_present labels, or None if the source has none."""
        if not self.attribute_names or self.attribute_labels_path is None:
            return None
        if self._attr is None:
            self._attr, self._attr_row = _read_attribute_labels(
                self.attribute_labels_path, len(self.attribute_names)
            )
        out = np.zeros((len(image_ids), len(self.attribute_names)), np.uint8)
        for i, iid in enumerate(image_ids):
            row = self._attr_row.get(iid)
            if row is not None:
                out[i] = self._attr[row]
        return out


def _read_attribute_labels(path: Path, num_attr: int) -> tuple[np.ndarray, dict[int, int]]:
    """image_attribute_labels.txt -> (rows x num_attr) uint8, row index per image id.
    Only the first three fields are used (a few lines in the real file carry extra ones)."""
    try:
        t = np.loadtxt(path, dtype=np.int64, usecols=(0, 1, 2), ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: expected lines '<image_id> <attr_id> <is_present> ...' ({e})") from None
    bad = (t[:, 1] < 1) | (t[:, 1] > num_attr)
    if bad.any():
        raise DataError(f"{path}: attribute id {int(t[bad][0, 1])} outside 1..{num_attr} (attributes.txt)")
    ids, row_of = np.unique(t[:, 0], return_inverse=True)
    table = np.zeros((len(ids), num_attr), np.uint8)
    table[row_of, t[:, 1] - 1] = t[:, 2].astype(np.uint8)
    return table, {int(i): r for r, i in enumerate(ids)}


def find_birds_root(cub_root: Path) -> Path:
    """StackGAN's ``birds`` folder for a CUB root: ``<parent>/birds`` (generated layout)
    or the parent itself (StackGAN's ``Data/birds/CUB_200_2011``)."""
    for cand in (cub_root.parent / "birds", cub_root.parent, cub_root / "birds"):
        if (cand / "train" / "filenames.pickle").is_file() or (cand / "test" / "filenames.pickle").is_file():
            return cand
    raise DataError(
        f"no StackGAN birds folder found next to {cub_root} (looked for train/filenames.pickle in "
        f"{cub_root.parent / 'birds'} and {cub_root.parent}); pass --birds-root"
    )


def _find_attributes_txt(cub_root: Path) -> Path | None:
    for cand in (cub_root / "attributes.txt", cub_root / "attributes" / "attributes.txt",
                 cub_root.parent / "attributes.txt"):
        if cand.is_file():
            return cand
    return None


def _read_split(birds_root: Path, name: str) -> SplitData:
    d = birds_root / name
    files = {f: d / f"{f}.pickle" for f in ("filenames", "class_info", "char-CNN-RNN-embeddings")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise problems_error(f"StackGAN split {name!r} in {d}", [f"missing {m}" for m in missing])
    raw_keys = load_py2_pickle(files["filenames"])
    keys = [k.decode("latin1") if isinstance(k, bytes) else str(k) for k in raw_keys]
    keys = [k[:-4] if k.endswith(".jpg") else k for k in keys]
    class_ids = [int(c) for c in load_py2_pickle(files["class_info"])]
    emb = np.asarray(load_py2_pickle(files["char-CNN-RNN-embeddings"]), dtype=np.float32)
    problems = []
    if emb.ndim == 2:  # a single embedding per image: treat as one caption
        emb = emb[:, None, :]
    if emb.ndim != 3:
        problems.append(f"{files['char-CNN-RNN-embeddings']}: shape {emb.shape}, expected (N, captions, dim)")
    if not (len(keys) == len(class_ids) == len(emb)):
        problems.append(
            f"mismatched counts: {len(keys)} filenames, {len(class_ids)} class_info, {len(emb)} embeddings"
        )
    if len(set(keys)) != len(keys):
        problems.append(f"{files['filenames']}: {len(keys) - len(set(keys))} duplicate keys")
    if problems:
        raise problems_error(f"StackGAN split {name!r} in {d}", problems)
    return SplitData(name, keys, class_ids, emb)


def read_layout(cub_root: str | Path, birds_root: str | Path | None = None,
                splits: tuple[str, ...] | list[str] = SPLITS) -> CubLayout:
    """Read the tables and pickles (no image is opened: see :func:`validate`)."""
    cub_root = Path(cub_root)
    if not cub_root.is_dir():
        raise DataError(f"CUB root {cub_root} is not a folder")
    birds_root = Path(birds_root) if birds_root else find_birds_root(cub_root)
    if not birds_root.is_dir():
        raise DataError(f"birds root {birds_root} is not a folder")

    paths = _split_first(cub_root / "images.txt")
    bboxes = {int(r[0]): tuple(float(v) for v in r[1:5])
              for r in _read_table(cub_root / "bounding_boxes.txt", 5)}
    labels = {int(r[0]): int(r[1]) for r in _read_table(cub_root / "image_class_labels.txt", 2)}
    class_names = _split_first(cub_root / "classes.txt")
    problems = []
    images: dict[str, ImageRecord] = {}
    for iid, rel in paths.items():
        key = rel[:-4] if rel.lower().endswith(".jpg") else rel
        if iid not in bboxes:
            problems.append(f"image {iid} ({rel}): no line in bounding_boxes.txt")
            continue
        if iid not in labels:
            problems.append(f"image {iid} ({rel}): no line in image_class_labels.txt")
            continue
        images[key] = ImageRecord(iid, key, cub_root / "images" / rel, bboxes[iid], labels[iid])
    if problems:
        raise problems_error(f"CUB tables in {cub_root}", problems)

    split_data = {s: _read_split(birds_root, s) for s in splits}
    for sd in split_data.values():  # a 0-based class_info (some re-exports) is mapped to CUB's ids
        labels = [images[k].class_id if k in images else None for k in sd.keys]
        if sd.keys and None not in labels and labels != sd.class_ids and \
                all(c == lab - 1 for c, lab in zip(sd.class_ids, labels)):
            print(f"note: {birds_root / sd.name / 'class_info.pickle'} is 0-based; using CUB's class ids",
                  file=sys.stderr)
            sd.class_ids = labels
    dims = {s: d.embeddings.shape[2] for s, d in split_data.items()}
    if len(set(dims.values())) > 1:
        raise DataError(f"embedding dims differ between splits: {dims}")
    text_dim = next(iter(dims.values())) if dims else 0
    encoder = CHAR_CNN_RNN
    enc_file = birds_root / "encoder.json"
    if enc_file.is_file():
        info = json.loads(enc_file.read_text())
        encoder = str(info["name"])
        if dims and int(info.get("dim", text_dim)) != text_dim:
            raise DataError(f"{enc_file} says dim {info.get('dim')}, the embeddings have {text_dim}")

    attr_names: list[str] = []
    attr_labels = None
    attr_txt = _find_attributes_txt(cub_root)
    lab = cub_root / "attributes" / "image_attribute_labels.txt"
    if attr_txt is not None and lab.is_file():
        named = _split_first(attr_txt)
        if sorted(named) != list(range(1, len(named) + 1)):
            raise DataError(f"{attr_txt}: attribute ids are not 1..{len(named)}")
        attr_names = [named[i] for i in range(1, len(named) + 1)]
        attr_labels = lab
    return CubLayout(cub_root, birds_root, images, class_names, split_data, encoder, text_dim,
                     attr_names, attr_labels)


def validate(layout: CubLayout, keys_by_split: dict[str, list[str]] | None = None,
             check_images: bool = True, check_captions: bool = True,
             captions: dict[str, list[str]] | None = None) -> None:
    """Check everything the selected samples need, before any work; one error lists all
    problems (missing images, keys unknown to images.txt, class mismatches, missing or
    short caption files, unreadable images). Captions read on the way go into ``captions``."""
    problems: list[str] = []
    for name, split in layout.splits.items():
        wanted = set(keys_by_split[name]) if keys_by_split is not None else None
        ncap = split.embeddings.shape[1]
        for key, cls in zip(split.keys, split.class_ids):
            if wanted is not None and key not in wanted:
                continue
            rec = layout.images.get(key)
            if rec is None:
                problems.append(f"{name}: key {key!r} is not in {layout.cub_root / 'images.txt'}")
                continue
            if rec.class_id != cls:
                problems.append(
                    f"{name}: {key}: class_info says {cls}, image_class_labels.txt says {rec.class_id}")
            if cls not in layout.class_names:
                problems.append(f"{name}: {key}: class {cls} not in classes.txt")
            if check_captions:
                cp = layout.caption_path(key)
                if not cp.is_file():
                    problems.append(f"missing caption file {cp}")
                else:
                    try:
                        caps = read_captions(cp, ncap)
                        if captions is not None:
                            captions[key] = caps
                    except (DataError, UnicodeDecodeError) as e:
                        problems.append(str(e) if isinstance(e, DataError) else f"{cp}: {e}")
            if not rec.path.is_file():
                problems.append(f"missing image {rec.path}")
            elif check_images:
                try:
                    with Image.open(rec.path) as im:
                        w, h = im.size
                    if w < 1 or h < 1:
                        raise ValueError("empty image")
                except Exception as e:
                    problems.append(f"unreadable image {rec.path} ({type(e).__name__}: {e})")
                    continue
                x, y, bw, bh = rec.bbox
                if bw <= 0 or bh <= 0 or x >= w or y >= h:
                    problems.append(f"{rec.path}: bounding box {rec.bbox} outside the {w}x{h} image")
    if problems:
        raise problems_error(f"source data ({layout.cub_root}, {layout.birds_root})", problems)
