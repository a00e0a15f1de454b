"""Word-level conditioning: the captions' word vectors, G's attention over them, D's
word-region matching loss, and a word-attention generator trained, evaluated and sampled
the way users run them."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from stackgan.config import ConfigError, load_config
from stackgan.losses import word_region_loss
from stackgan.models import DOut, Stage1G, WordAttention
from stackgan.words import MAX_WORDS, WORD_DIM, Words, word_vectors

from .conftest import run_cmd
from .test_train import train_args

YELLOW = "a small yellow bird with black wings and a short bill"
RED = "a small red bird with black wings and a short bill"


def test_word_vectors_are_the_encoders_word_pieces_with_a_padding_mask():
    w = word_vectors([YELLOW, "a red bird", ""])
    n = len(YELLOW.split())
    assert w.vectors.shape == (3, n, WORD_DIM) and w.mask.shape == (3, n)
    assert w.mask[0].all() and w.mask[1].sum() == 3 and w.mask[2].sum() == 1  # "" keeps one zero word
    assert torch.allclose(w.vectors[w.mask].norm(dim=1)[:-1], torch.full((n + 3,), WORD_DIM ** 0.5))
    assert (w.vectors[1, 3:] == 0).all() and (w.vectors[2] == 0).all()
    assert torch.equal(w.vectors[0, 5], word_vectors(["black"]).vectors[0, 0])  # one vector per word piece
    long = word_vectors([" ".join(["bird"] * (MAX_WORDS + 10))])
    assert long.vectors.shape[1] == MAX_WORDS


def test_swapping_one_colour_word_changes_that_word_only():
    """The words are not contextual: "yellow" -> "red" changes the word vectors, and G's
    projected words, at that word's place only, and the attended features change."""
    a, b = word_vectors([YELLOW]), word_vectors([RED])
    differs = (a.vectors != b.vectors).any(-1)[0]
    assert differs.tolist() == [i == 2 for i in range(len(YELLOW.split()))]
    torch.manual_seed(0)
    attend = WordAttention(16)
    torch.nn.init.normal_(attend.out.weight)
    h = torch.randn(1, 16, 8, 8)
    (wa, ea), (wb, eb) = attend.weights(h, a), attend.weights(h, b)
    assert ((ea != eb).any(-1)[0]).tolist() == differs.tolist()
    assert not torch.allclose(wa, wb) and not torch.allclose(attend(h, a), attend(h, b))


def test_attention_weights_sum_to_one_over_the_words_and_padding_gets_none():
    torch.manual_seed(0)
    attend = WordAttention(8)
    w = word_vectors([YELLOW, "a red bird"])
    att, _ = attend.weights(torch.randn(2, 8, 4, 4) * 5, w)
    assert att.shape == (2, 16, w.mask.shape[1])
    assert torch.allclose(att.sum(-1), torch.ones(2, 16))
    assert (att[1, :, 3:] == 0).all() and (att[1, :, :3] > 0).all()
    padded = Words(w.vectors.clone(), w.mask)
    padded.vectors[1, 3:] = 7.0  # whatever sits in padding places is never read
    h = torch.randn(2, 8, 4, 4)
    torch.nn.init.normal_(attend.out.weight)
    assert torch.allclose(attend(h, w), attend(h, padded))


def test_a_word_attention_generator_starts_as_the_one_without_and_needs_words():
    torch.manual_seed(0)
    with_words = Stage1G(12, 8, 8, 8, film=True, word_attn=True)
    plain = Stage1G(12, 8, 8, 8, film=True)
    plain.load_state_dict({k: v for k, v in with_words.state_dict().items() if not k.startswith("attend")})
    emb, z = torch.randn(3, 12), torch.randn(3, 8)
    w = word_vectors([YELLOW, RED, "a bird"])
    torch.manual_seed(1)  # the same CA-Net noise for both
    a = with_words(emb, z, w)[0]
    torch.manual_seed(1)
    assert torch.equal(a, plain(emb, z)[0])  # the read-out starts at zero
    with pytest.raises(ValueError, match="word_attn"):
        with_words(emb, z)


def _codes(n: int, t: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = torch.nn.functional.normalize(torch.randn(n, t, e, generator=g), dim=-1)
    return words, torch.nn.functional.normalize(torch.randn(n, 16, e, generator=g), dim=-1)


def test_word_region_loss_rewards_images_that_show_their_words_and_ignores_padding():
    words, noise = _codes(6, 5, 32, 0)
    shows = noise.clone()
    shows[:, :5] = words  # image i shows caption i's five words in five of its places
    mask = torch.ones(6, 5, dtype=torch.bool)
    matched = word_region_loss(DOut(torch.zeros(6), regions=shows, word_codes=words), mask)
    unrelated = word_region_loss(DOut(torch.zeros(6), regions=noise, word_codes=words), mask)
    assert matched < 0.1 < unrelated
    mask[:, 3:] = False
    other = words.clone()
    other[:, 3:] = torch.nn.functional.normalize(torch.randn(6, 2, 32), dim=-1)
    a = word_region_loss(DOut(torch.zeros(6), regions=shows, word_codes=words), mask)
    b = word_region_loss(DOut(torch.zeros(6), regions=shows, word_codes=other), mask)
    assert torch.allclose(a, b)
    same = torch.tensor([0, 0, 1, 1, 2, 2])  # a caption of the image's own class is no negative
    assert word_region_loss(DOut(torch.zeros(6), regions=noise, word_codes=words), mask, same) < unrelated
    with pytest.raises(ValueError, match="word_coef"):
        word_region_loss(DOut(torch.zeros(6)), mask)


WORDS = ["model.word_attn=true", "loss.word_coef=1"]


@pytest.mark.parametrize("overrides,key", [
    (["model.stage=2", *WORDS], "model.word_attn"),
    (["model.family=tf", "model.d_cond=text", "model.ca_act=leaky", *WORDS], "model.word_attn"),
    ([*WORDS, "data.emb_k=4"], "data.emb_k"),
    (["loss.word_coef=-1"], "loss.word_coef"),
    (["model.word_attn=true"], "go together"),
    (["loss.word_coef=3"], "go together"),
])
def test_word_options_refuse_what_they_cannot_do(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_a_word_attention_run_trains_resumes_evaluates_and_samples(tiny_shards, tmp_path):
    """The way users run it: train (loader workers and the trainer's own snapshot metrics on),
    resume, evaluate the export with the judge metrics, train stage II on it, sample both
    stages from new text."""
    run = tmp_path / "words"
    words = ["model.word_attn=true", "loss.word_coef=1", "data.num_workers=1", "train.log_every=1"]
    p = run_cmd(train_args(tiny_shards, run, "train.steps=2", "train.ckpt_every=2", *words))
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cmd(train_args(tiny_shards, run, "train.steps=3", "train.ckpt_every=2",
                           "train.metrics=judge_consistency,diversity", "train.metrics_samples=8", *words))
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    losses = [r for r in recs if "loss_word_fake" in r]
    assert [r["step"] for r in losses] == [1, 2, 3] and all(0 < r["loss_word_real"] < 10 for r in losses)
    snaps = {r["metric"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert snaps["judge_consistency"]["step"] == 3 and 0 <= snaps["judge_consistency"]["train"] <= 1
    export = run / "export" / "generator.safetensors"
    p = run_cmd([sys.executable, "-m", "stackgan.evaluate", "--export", str(export), "--shards", str(tiny_shards),
                 "--judge-samples", "8", "--metrics", "judge_consistency,judge_fd,diversity", "--device", "cpu"])
    assert p.returncode == 0, p.stderr[-3000:]
    s2 = tmp_path / "stage2"  # stage II refines the word-reading stage I: the words reach it
    p = run_cmd(train_args(tiny_shards, s2, "train.steps=1", f"model.stage1_export={export}",
                           config="configs/birds_stage2.yaml"))
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "samples"
    p = run_cmd([sys.executable, "-m", "stackgan.sample", "--export", str(s2 / "export" / "generator.safetensors"),
                 "--out", str(out), "--prompt", YELLOW, "--prompt", RED, "--n", "2", "--stages"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "grid.png").is_file() and (out / "stages.png").is_file()
