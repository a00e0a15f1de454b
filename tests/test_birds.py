"""The embedded bird set: deterministic, in the real layout, and truthful (captions and
attribute labels say what was drawn)."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from stackgan.data import birds, cub
from stackgan.text import SENTENCE_ENCODER, SentenceEncoder

SPECIES, IMAGES, SEED = 4, 3, 3


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("birds")
    a = birds.generate(root / "a", SPECIES, IMAGES, SEED, workers=2, quiet=True)
    b = birds.generate(root / "b", SPECIES, IMAGES, SEED, workers=1, quiet=True)
    return root, a, b


def test_deterministic_for_a_seed(made):
    root, a, b = made
    assert birds.tree_digest(a) == birds.tree_digest(b)  # same bytes, whatever the worker count
    c = birds.generate(root / "c", SPECIES, IMAGES, SEED + 1, workers=1, quiet=True)
    assert birds.tree_digest(c) != birds.tree_digest(a)


def test_reuse_and_refuse(made, capsys):
    root, a, _ = made
    before = birds.tree_digest(a)
    assert birds.main(["--out", str(a), "--species", str(SPECIES), "--images-per-species", str(IMAGES),
                       "--seed", str(SEED)]) == 0
    assert "reusing" in capsys.readouterr().err and birds.tree_digest(a) == before
    assert birds.main(["--out", str(a), "--species", "5", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err


def test_layout_is_readable_by_the_cub_reader(made):
    _, a, _ = made
    lay = cub.read_layout(a / "CUB_200_2011")
    cub.validate(lay)
    assert len(lay.images) == SPECIES * IMAGES and len(lay.class_names) == SPECIES
    train, test = lay.splits["train"], lay.splits["test"]
    assert len(train.keys) + len(test.keys) == SPECIES * IMAGES
    assert set(train.class_ids).isdisjoint(test.class_ids) and test.class_ids  # class-disjoint, non-empty
    assert all(not k.endswith(".jpg") for k in train.keys)
    assert lay.encoder == SENTENCE_ENCODER and lay.text_dim == 384
    assert train.embeddings.shape == (len(train.keys), 10, 384)
    assert np.allclose(np.linalg.norm(train.embeddings, axis=-1), 1, atol=1e-4)
    # the stored vectors are the sentence encoder's for those very captions (a fresh model)
    key = train.keys[0]
    fresh = SentenceEncoder().encode(lay.captions(key))
    assert np.allclose(train.embeddings[0], fresh, atol=1e-5)
    for rec in lay.images.values():
        with Image.open(rec.path) as im:
            W, H = im.size
            assert im.format == "JPEG" and 300 <= max(W, H) <= 600
        x, y, w, h = rec.bbox
        assert 0 <= x and 0 <= y and x + w <= W and y + h <= H and w > 20 and h > 20
    assert len(lay.attribute_names) == len(birds.ATTRIBUTE_NAMES)


# an independent reading of the captions: colour words per clause, other attribute words
_COLORS = set(birds.COLORS)
_PART = {"crown": "has_crown_color", "wings": "has_wing_color", "belly": "has_belly_color",
         "back": "has_back_color", "tail": "has_upper_tail_color", "bill": "has_bill_color",
         "beak": "has_bill_color"}
_SHAPE = {"conical": "cone", "cone-shaped": "cone", "dagger-like": "dagger", "dagger-shaped": "dagger",
          "hooked": "hooked", "hook-shaped": "hooked", "needle-like": "needle", "needle-shaped": "needle"}
_SIZE = {"small": "small", "little": "small", "medium-sized": "medium", "medium": "medium",
         "large": "large", "big": "large"}
_PATTERN = {"striped": "striped", "spotted": "spotted", "plain": "solid", "solid": "solid"}
_LENGTH = {"short": "shorter_than_head", "long": "longer_than_head"}


def _claims(caption: str) -> set[str]:
    """Attribute names a caption asserts, read without the generator's templates."""
    out = set()
    for clause in re.split(r",|\band\b|\bwith\b|\bhas\b|\bthat\b", caption.rstrip(".")):
        words = clause.split()
        parts = [w for w in words if w in _PART]
        colors = [w for w in words if w in _COLORS]
        if colors:
            assert len(parts) == 1, f"colour without exactly one part in {clause!r} of {caption!r}"
            out |= {f"{_PART[parts[0]]}::{c}" for c in colors}
        for w in words:
            if w in _SHAPE:
                out.add(f"has_bill_shape::{_SHAPE[w]}")
            if w in _SIZE:
                out.add("has_size::" + birds.SIZES[_SIZE[w]])
            if w in _PATTERN:
                out.add(f"has_wing_pattern::{_PATTERN[w]}")
            if w in _LENGTH:
                out.add(f"has_bill_length::{_LENGTH[w]}")
    return out


def test_captions_are_truthful(made):
    _, a, _ = made
    lay = cub.read_layout(a / "CUB_200_2011")
    recs = list(lay.images.values())
    labels = lay.attributes([r.image_id for r in recs])
    names = np.array(lay.attribute_names)
    claimed_any = set()
    for rec, lab in zip(recs, labels):
        true = set(names[lab.astype(bool)])
        # one value per attribute group (colours of parts, shape, size, ...)
        groups = [n.split("::")[0] for n in true]
        assert len(groups) == len(set(groups)) == 10
        caps = lay.captions(rec.key)
        assert len(set(caps)) == 10
        for c in caps:
            claims = _claims(c)
            assert claims, c
            assert claims <= true, f"{rec.key}: {c!r} claims {sorted(claims - true)}"
            claimed_any |= claims
    assert any(n.startswith("has_crown_color") for n in claimed_any)


def test_named_colours_are_drawn(made):
    """Every part colour in the labels covers a visible patch inside the bird's box."""
    _, a, _ = made
    lay = cub.read_layout(a / "CUB_200_2011")
    recs = list(lay.images.values())
    labels = lay.attributes([r.image_id for r in recs])
    names = lay.attribute_names
    for rec, lab in zip(recs, labels):
        x, y, w, h = (int(v) for v in rec.bbox)
        arr = np.asarray(cub.load_rgb(rec.path), np.int32)[y:y + h, x:x + w]
        for i in np.flatnonzero(lab):
            group, value = names[i].split("::")
            if group not in ("has_crown_color", "has_wing_color", "has_belly_color", "has_back_color"):
                continue
            dist = np.abs(arr - np.array(birds.COLORS[value])).sum(-1)
            share = (dist < 60).mean()
            assert share > 0.003, f"{rec.key}: {names[i]} covers only {share:.4f} of the box"


def test_scale_parameters_are_checked(tmp_path):
    with pytest.raises(ValueError, match="species"):
        birds.generate(tmp_path / "x", 0, 3, quiet=True)
