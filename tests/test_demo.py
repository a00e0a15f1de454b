"""The main job's own decisions (stackgan/demo.py): prompts in the set's vocabulary, the words a
prompt uses that no training caption did, and the precision it trains in."""
from __future__ import annotations

import itertools
import json
import tarfile

import numpy as np
import pytest

from stackgan import demo
from stackgan.data import birds


def embedded_vocabulary() -> set[str]:
    """Every word the embedded set's captions can use: captions of every colour, bill shape,
    wing pattern and size, each rendered with many random template choices."""
    words: set[str] = set()
    rng = np.random.default_rng(0)
    colours = list(birds.COLORS)
    for colour, shape, pattern, size in itertools.product(colours, birds.BILL_SHAPES, birds.WING_PATTERNS,
                                                          birds.SIZES):
        a = {"crown": colour, "back": colour, "wing": colour, "belly": colour, "tail": colour,
             "bill_color": birds.BILL_COLORS[len(words) % len(birds.BILL_COLORS)], "bill_shape": shape,
             "bill_length": birds.BILL_LENGTH[shape], "wing_pattern": pattern, "size": size}
        for caption in birds.caption_pool(a, rng, n=12):
            words.update(demo.WORD.findall(caption.lower()))
    return words


def test_the_demo_prompts_speak_the_sets_vocabulary():
    vocab = embedded_vocabulary()
    assert {"crown", "wings", "belly", "hooked", "conical", "striped"} <= vocab
    assert [p for p in demo.prompt_coverage(demo.PROMPTS, vocab) if p["unseen_words"]] == []
    # what the earlier prompts said and no caption does
    old = ["this bird is mostly green with a grey belly and a long tail",
           "a large bird with a white head, brown wings and an orange beak"]
    assert [p["unseen_words"] for p in demo.prompt_coverage(old, vocab)] == [["mostly"], ["head"]]


def test_training_words_are_the_training_captions_words(tiny_shards):
    words = demo.training_words(tiny_shards)
    captions = []
    for shard in sorted(tiny_shards.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".txt.json"):
                    captions += json.loads(tar.extractfile(m).read())
    assert captions and words == {w for c in captions for w in demo.WORD.findall(c.lower())}
    seen = captions[0]
    assert demo.prompt_coverage([seen, seen + " mostly zebra-striped"], words) == [
        {"prompt": seen, "unseen_words": []},
        {"prompt": seen + " mostly zebra-striped", "unseen_words": ["mostly", "zebra-striped"]}]


@pytest.mark.parametrize("asked,cuda,cpu_bf16,expected", [
    ("auto", False, True, "bf16"),  # a CPU with bf16 units: bf16 autocast
    ("auto", False, False, "auto"),  # none: the configs' choice (fp32 on a CPU)
    ("auto", True, True, "auto"),  # a GPU trains: the configs' choice
    ("fp32", False, True, "no"),
    ("bf16", False, False, "bf16"),
])
def test_demo_precision(asked, cuda, cpu_bf16, expected):
    assert demo.demo_precision(asked, cuda, cpu_bf16) == expected


def test_quick_runs_keep_out_of_the_full_jobs_folders():
    """``--quick`` draws a smaller set: in the default folders it would make the full job's next
    run find a set of other parameters (refused), so it uses folders of its own unless told."""
    full, quick = demo.parse_args([]), demo.parse_args(["--quick"])
    assert (full.data, full.shards, full.out) == ("data/birds-embedded", "shards/birds-embedded", "runs/demo")
    assert (full.species, full.images_per_species) == (birds.DEFAULT_SPECIES, birds.DEFAULT_IMAGES)
    assert {quick.data, quick.shards, quick.out}.isdisjoint({full.data, full.shards, full.out})
    assert quick.species < full.species
    mine = demo.parse_args(["--quick", "--data", "d", "--shards", "s", "--out", "o"])
    assert (mine.data, mine.shards, mine.out) == ("d", "s", "o")
