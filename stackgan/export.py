"""Generator exports: the weights sampling and stage II need, without the training state.

An export is one ``torch.save`` file (``<run_dir>/export/generator.pt``)::

    {"format": "stackgan-export/1", "stage": 1|2, "state_dict": G weights (EMA when on),
     "model": ModelConfig as dict, "stage1_model": stage-I ModelConfig (stage 2 only),
     "text_encoder": "all-MiniLM-L6-v2" | "char-CNN-RNN" | ..., "text_dim": int,
     "image_size": 64|256, "step": int, "config": full resolved config}

A stage-II export carries its frozen stage-I weights inside ``state_dict`` (``stage1.*``), so
it rebuilds on its own. Weights are stored on the host in fp32, whatever device and precision
the generator trained in (DeepSpeed fp16 holds G in fp16), so an export samples anywhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, ModelConfig, apply_updates, drop_removed, image_size
from .errors import StackGANError
from .files import atomic_path

FORMAT = "stackgan-export/1"


class ExportError(StackGANError, RuntimeError):
    """An export file that is missing, of another format, or does not fit."""


@dataclass
class ExportInfo:
    stage: int
    text_encoder: str
    text_dim: int
    z_dim: int
    image_size: int
    step: int
    config: dict
    path: str = ""


def _model_cfg(d: dict) -> ModelConfig:
    """The model section of an export, also of one written before options were removed."""
    m = ModelConfig()
    apply_updates(m, drop_removed(d, "model"), "model.")
    return m


def save_export(path: str | Path, generator: nn.Module, mcfg: ModelConfig, *, text_encoder: str,
                text_dim: int, step: int, config: dict, stage1_model: ModelConfig | None = None) -> Path:
    """Write an export atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: _host_fp32(v) for k, v in generator.state_dict().items()}
    payload = {
        "format": FORMAT,
        "stage": int(mcfg.stage),
        "state_dict": state,
        "model": dataclasses.asdict(mcfg),
        "stage1_model": dataclasses.asdict(stage1_model) if stage1_model is not None else None,
        "text_encoder": text_encoder,
        "text_dim": int(text_dim),
        "image_size": image_size(mcfg.stage),
        "step": int(step),
        "config": config,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _host_fp32(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``; floating point in fp32 (integer buffers keep their dtype)."""
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)


def read_export(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"generator export not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise ExportError(f"{path}: cannot read generator export ({e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} file")
    return payload


def export_info(payload: dict, path: str | Path = "") -> ExportInfo:
    return ExportInfo(
        stage=int(payload["stage"]),
        text_encoder=str(payload["text_encoder"]),
        text_dim=int(payload["text_dim"]),
        z_dim=int(payload["model"]["z_dim"]),
        image_size=int(payload["image_size"]),
        step=int(payload["step"]),
        config=payload["config"],
        path=str(path),
    )


def build_from_export(payload: dict) -> nn.Module:
    """Rebuild the generator module from an export payload and load its weights."""
    from .models import build_generator

    try:
        mcfg = _model_cfg(payload["model"])
        stage1 = None
        if mcfg.stage == 2:
            s1cfg = _model_cfg(payload["stage1_model"])
            stage1 = build_generator(s1cfg, payload["text_dim"])
        g = build_generator(mcfg, payload["text_dim"], stage1=stage1)
    except (ConfigError, KeyError, TypeError) as e:
        raise ExportError(f"export does not describe a buildable generator: {e}") from e
    missing, unexpected = g.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ExportError(f"export weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return g


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ExportInfo]:
    """Load an export as an eval-mode generator on ``device`` (no gradients)."""
    payload = read_export(path)
    g = build_from_export(payload).to(device).eval()
    g.requires_grad_(False)
    return g, export_info(payload, path)


def load_stage1_for_stage2(path: str | Path, text_dim: int, encoder: str) -> tuple[nn.Module, ModelConfig]:
    """Stage II: the frozen stage-I generator from its export, checked against the shards."""
    payload = read_export(path)
    if int(payload["stage"]) != 1:
        raise ExportError(f"{path}: model.stage1_export must be a stage-I export, this one is stage {payload['stage']}")
    if int(payload["text_dim"]) != int(text_dim):
        raise ExportError(
            f"{path}: stage-I generator was trained on text_dim {payload['text_dim']}, the shards have {text_dim}"
        )
    if payload["text_encoder"] != encoder:
        raise ExportError(
            f"{path}: stage-I generator was trained with text encoder {payload['text_encoder']!r}, "
            f"the shards hold {encoder!r} embeddings"
        )
    g = build_from_export(payload).eval()
    g.requires_grad_(False)
    return g, _model_cfg(payload["model"])
