"""The CUB + StackGAN layout reader on a replica built here, written the way the real files
are: Python-2 pickles (byte strings, numpy.core arrays), keys without .jpg, float boxes, a
greyscale JPEG, attributes.txt next to the CUB folder as in the official tarball."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stackgan.data import cub

# ----------------------------------------------------------------------------------------
# A writer for Python-2 style pickles (what StackGAN's files contain), independent of ours
# ----------------------------------------------------------------------------------------


def _s(b) -> bytes:
    b = b.encode("latin1") if isinstance(b, str) else b
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _o(o) -> bytes:
    if isinstance(o, str):
        return _s(o)
    if isinstance(o, bool):
        return b"\x88" if o else b"\x89"
    if isinstance(o, int):
        return b"J" + struct.pack("<i", o)
    if o is None:
        return b"N"
    if isinstance(o, tuple):
        return b"(" + b"".join(_o(x) for x in o) + b"t"
    if isinstance(o, list):
        return b"](" + b"".join(_o(x) for x in o) + b"e"
    if isinstance(o, np.ndarray):
        a = np.ascontiguousarray(o)
        dt = (b"cnumpy\ndtype\n" + _o((a.dtype.str[1:], 0, 1)) + b"R"
              + _o((3, "<", None, None, None, -1, -1, 0)) + b"b")
        return (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _o((0,)) + _s("b")
                + b"\x87R"
                + b"(" + _o(1) + _o(tuple(a.shape)) + dt + b"\x89" + _s(a.tobytes()) + b"tb")
    raise TypeError(type(o))


def py2_pickle(obj, path: Path) -> None:
    path.write_bytes(b"\x80\x02" + _o(obj) + b".")


CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross",
           4: "004.Groove_billed_Ani"}
TRAIN_CLASSES, TEST_CLASSES = (1, 2, 4), (3,)
ATTRS = ["has_bill_shape::hooked", "has_wing_color::blue", "has_wing_color::brown", "has_belly_color::white"]


def make_replica(root: Path, per_class: int = 3, dim: int = 16, seed: int = 0) -> dict:
    """A small CUB + StackGAN tree; returns what was written (the truth to compare with)."""
    rng = np.random.default_rng(seed)
    cubd, birds = root / "CUB_200_2011", root / "birds"
    (cubd / "attributes").mkdir(parents=True)
    images, bboxes, labels, split_lines, attr_lines = [], [], [], [], []
    truth: dict = {"images": {}, "splits": {"train": [], "test": []}}
    iid = 0
    for cid, cname in CLASSES.items():
        (cubd / "images" / cname).mkdir(parents=True)
        for j in range(per_class):
            iid += 1
            name = f"{cname.split('.', 1)[1]}_{j + 1:04d}_{1000 + iid}"
            key = f"{cname}/{name}"
            w, h = [(120, 90), (90, 124), (101, 101)][iid % 3]
            low = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            arr = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC))
            img = Image.fromarray(arr)
            if iid == 2:
                img = img.convert("L")  # CUB has a few greyscale JPEGs
            img.save(cubd / "images" / f"{key}.jpg", quality=95)
            if iid == 1:  # a box at the corner: the crop gets clipped
                box = (2.4, 3.7, 50.2, 30.9)
            else:
                bw, bh = rng.uniform(20, w * 0.7), rng.uniform(20, h * 0.7)
                box = (round(rng.uniform(0, w - bw), 1), round(rng.uniform(0, h - bh), 1),
                       round(bw, 1), round(bh, 1))
            images.append(f"{iid} {key}.jpg")
            bboxes.append(f"{iid} " + " ".join(f"{v}" for v in box))
            labels.append(f"{iid} {cid}")
            split_lines.append(f"{iid} {iid % 2}")
            present = rng.integers(0, 2, len(ATTRS)).astype(np.uint8)
            for a, p in enumerate(present):
                extra = " 0.0" if (iid == 3 and a == 0) else ""  # the real file has a few 6-field lines
                attr_lines.append(f"{iid} {a + 1} {p} 3 12.5{extra}")
            caps = [f"caption {k} of {name}: this bird has {'a white belly' if k % 2 else 'blue wings'}"
                    for k in range(10)]
            tdir = birds / "text_c10" / cname
            tdir.mkdir(parents=True, exist_ok=True)
            (tdir / f"{name}.txt").write_text("\n".join(caps) + "\n\n")
            split = "train" if cid in TRAIN_CLASSES else "test"
            truth["images"][key] = {"id": iid, "bbox": box, "cls": cid, "captions": caps, "attr": present,
                                    "path": cubd / "images" / f"{key}.jpg", "split": split}
            truth["splits"][split].append(key)
    for fname, lines in [("images.txt", images), ("bounding_boxes.txt", bboxes),
                         ("image_class_labels.txt", labels),
                         ("train_test_split.txt", split_lines),
                         ("classes.txt", [f"{c} {n}" for c, n in CLASSES.items()])]:
        (cubd / fname).write_text("\n".join(lines) + "\n")
    (root / "attributes.txt").write_text("".join(f"{i + 1} {a}\n" for i, a in enumerate(ATTRS)))
    (cubd / "attributes" / "image_attribute_labels.txt").write_text("\n".join(attr_lines) + "\n")
    truth["emb"] = {}
    for split, keys in truth["splits"].items():
        (birds / split).mkdir(parents=True)
        emb = rng.standard_normal((len(keys), 10, dim)).astype(np.float32)
        truth["emb"][split] = emb
        py2_pickle(keys, birds / split / "filenames.pickle")
        py2_pickle([truth["images"][k]["cls"] for k in keys], birds / split / "class_info.pickle")
        py2_pickle(emb, birds / split / "char-CNN-RNN-embeddings.pickle")
    truth["cub_root"], truth["birds_root"] = cubd, birds
    return truth


def reference_box(bbox, width, height):
    """StackGAN's rule, written out independently: integer box, R = 0.75 max(w, h)."""
    x, y, w, h = np.trunc(np.asarray(bbox, float)).astype(int)
    r = int(np.maximum(w, h) * 0.75)
    cx, cy = (2 * x + w) // 2, (2 * y + h) // 2
    return max(0, cx - r), max(0, cy - r), min(width, cx + r), min(height, cy + r)


@pytest.fixture
def replica(tmp_path):
    return make_replica(tmp_path / "data")


# ----------------------------------------------------------------------------------------
def test_py2_pickles_need_latin1(replica):
    p = replica["birds_root"] / "train" / "char-CNN-RNN-embeddings.pickle"
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(p.read_bytes())  # the default (ASCII) fails, as on the real files
    assert np.array_equal(cub.load_py2_pickle(p), replica["emb"]["train"])


def test_layout_round_trip(replica):
    lay = cub.read_layout(replica["cub_root"])  # birds root found next to it
    assert lay.birds_root == replica["birds_root"]
    assert lay.class_names == CLASSES
    assert lay.encoder == "char-CNN-RNN" and lay.text_dim == 16
    for split in ("train", "test"):
        sd = lay.splits[split]
        assert sd.keys == replica["splits"][split]
        assert sd.class_ids == [replica["images"][k]["cls"] for k in sd.keys]
        assert sd.embeddings.dtype == np.float32 and np.array_equal(sd.embeddings, replica["emb"][split])
    for key, t in replica["images"].items():
        rec = lay.images[key]
        assert (rec.image_id, rec.class_id, rec.path) == (t["id"], t["cls"], t["path"])
        assert rec.bbox == pytest.approx(t["bbox"])
        assert lay.captions(key) == t["captions"]
    assert lay.attribute_names == ATTRS
    ids = [t["id"] for t in replica["images"].values()]
    assert np.array_equal(lay.attributes(ids), np.stack([t["attr"] for t in replica["images"].values()]))
    cub.validate(lay)


def test_crop_box_matches_stackgan_rule():
    rng = np.random.default_rng(1)
    for _ in range(500):
        W, H = int(rng.integers(40, 600)), int(rng.integers(40, 600))
        w, h = rng.uniform(1, W), rng.uniform(1, H)
        box = (rng.uniform(-5, W - 1), rng.uniform(-5, H - 1), w, h)
        assert cub.stackgan_crop_box(box, W, H) == reference_box(box, W, H)
    # one by hand: box 60x40 at (100, 50) in 500x375 -> R 45, centre (130, 70)
    assert cub.stackgan_crop_box((100.0, 50.0, 60.0, 40.0), 500, 375) == (85, 25, 175, 115)


def test_greyscale_becomes_rgb_and_crops_have_the_sizes(replica):
    grey = next(t for t in replica["images"].values() if t["id"] == 2)
    with Image.open(grey["path"]) as im:
        assert im.mode == "L"
    img = cub.load_rgb(grey["path"])
    assert img.mode == "RGB"
    small, big = cub.crop_resize(img, grey["bbox"], (76, 304))
    assert small.size == (76, 76) and big.size == (304, 304)
    x1, y1, x2, y2 = reference_box(grey["bbox"], *img.size)
    ref = np.asarray(img.crop((x1, y1, x2, y2)).resize((76, 76), Image.BILINEAR))
    assert np.array_equal(np.asarray(small), ref)


def test_validation_lists_every_problem(replica):
    keys = list(replica["images"])
    replica["images"][keys[0]]["path"].unlink()  # missing image
    replica["images"][keys[4]]["path"].write_bytes(b"not a jpeg at all")  # unreadable
    cap = replica["birds_root"] / "text_c10" / f"{keys[6]}.txt"
    cap.write_text("only one caption\n")  # short caption file
    lay = cub.read_layout(replica["cub_root"], replica["birds_root"])
    with pytest.raises(cub.DataError) as e:
        cub.validate(lay)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert f"missing image {replica['images'][keys[0]]['path']}" in msg
    assert f"unreadable image {replica['images'][keys[4]]['path']}" in msg
    assert str(cap) in msg and "1 captions, expected 10" in msg


def test_long_problem_lists_are_capped(tmp_path):
    rep = make_replica(tmp_path / "big", per_class=7)
    for t in rep["images"].values():
        t["path"].unlink()
    lay = cub.read_layout(rep["cub_root"], rep["birds_root"])
    with pytest.raises(cub.DataError) as e:
        cub.validate(lay)
    n = len(rep["images"])
    assert n > cub.MAX_LISTED
    assert f"{n} problem(s)" in str(e.value) and f"and {n - cub.MAX_LISTED} more" in str(e.value)
    assert str(e.value).count("missing image") == cub.MAX_LISTED


def test_mismatched_pickle_lengths(replica):
    p = replica["birds_root"] / "train" / "class_info.pickle"
    py2_pickle([1, 1], p)
    with pytest.raises(cub.DataError, match=r"mismatched counts: 9 filenames, 2 class_info, 9 embeddings"):
        cub.read_layout(replica["cub_root"], replica["birds_root"])


def test_missing_pickle_and_unknown_key(replica):
    (replica["birds_root"] / "test" / "filenames.pickle").unlink()
    with pytest.raises(cub.DataError, match="missing .*test/filenames.pickle"):
        cub.read_layout(replica["cub_root"], replica["birds_root"])
    lay = cub.read_layout(replica["cub_root"], replica["birds_root"], splits=["train"])
    lay.splits["train"].keys[0] = "001.Black_footed_Albatross/Nope_0001_1"
    with pytest.raises(cub.DataError, match="Nope_0001_1' is not in .*images.txt"):
        cub.validate(lay)


def test_zero_based_class_info_is_mapped_to_cub_ids(replica, capsys):
    keys = replica["splits"]["train"]
    py2_pickle([replica["images"][k]["cls"] - 1 for k in keys],
               replica["birds_root"] / "train" / "class_info.pickle")
    lay = cub.read_layout(replica["cub_root"], replica["birds_root"])
    assert lay.splits["train"].class_ids == [replica["images"][k]["cls"] for k in keys]
    assert "0-based" in capsys.readouterr().err
    cub.validate(lay)
    py2_pickle([2] * len(keys), replica["birds_root"] / "train" / "class_info.pickle")  # plainly wrong
    lay = cub.read_layout(replica["cub_root"], replica["birds_root"])
    with pytest.raises(cub.DataError, match="class_info says 2, image_class_labels.txt says 1"):
        cub.validate(lay)
