"""Generator exports: the weights sampling and stage II need, without the training state.

An export is two files that load without pickle (nothing in them can run code)::

    <run_dir>/export/generator.safetensors   G's weights (EMA when on), fp32 on the host
    <run_dir>/export/generator.json          {"format": "stackgan-export/2", "stage": 1|2,
        "model": ModelConfig as dict, "stage1_model": stage-I ModelConfig (stage 2 only),
        "text_encoder": "all-MiniLM-L6-v2" | "char-CNN-RNN" | ..., "text_dim": int,
        "image_size": 64|256, "step": int, "config": full resolved training config}

The safetensors header repeats the format and step, so weights and JSON from two different
exports are refused. A stage-II export carries its frozen stage-I weights (``stage1.*``), so it
rebuilds on its own. Weights are stored in fp32 whatever the training precision (DeepSpeed fp16
holds G in fp16), so an export samples anywhere.

Every reader takes the path users already pass: ``.../generator.pt`` resolves to its
``.safetensors`` sibling when there is one; the export folder and the ``.json`` work too. An
export of the old format (one ``torch.save`` pickle, ``stackgan-export/1``) still loads, through
torch's weights-only unpickler, with a note to convert it (``python -m stackgan.convert --to
safetensors OLD.pt``).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ConfigError, ModelConfig, apply_updates, drop_removed, image_size
from .errors import StackGANError
from .files import atomic_path, atomic_write
from .models import build_generator

FORMAT = "stackgan-export/2"
LEGACY_FORMAT = "stackgan-export/1"  # one torch.save pickle (<run>/export/generator.pt)
WEIGHTS_NAME = "generator.safetensors"


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


def export_path(run_dir: str | Path) -> Path:
    """Where a run's export is written: ``<run_dir>/export/generator.safetensors``."""
    return Path(run_dir) / "export" / WEIGHTS_NAME


def config_path(weights: str | Path) -> Path:
    """The JSON next to an export's weights (``generator.json``)."""
    return Path(weights).with_suffix(".json")


def resolve_export(path: str | Path) -> Path:
    """The file an export path names: the safetensors weights (also for a ``.pt``, ``.json`` or
    folder path whose safetensors file exists), else an old-format ``.pt`` file."""
    p = Path(path)
    if p.is_dir():
        cands = [p / WEIGHTS_NAME, p / "generator.pt"]
    elif p.suffix == ".safetensors":
        cands = [p]
    elif p.suffix == ".json":
        cands = [p.with_suffix(".safetensors")]
    else:
        cands = [p.with_suffix(".safetensors"), p]
    for c in cands:
        if c.is_file():
            return c
    raise ExportError(f"generator export not found: {path} (looked for {', '.join(map(str, cands))})")


def model_config(d: dict) -> ModelConfig:
    """The model section of an export, also of one written before options were removed."""
    m = ModelConfig()
    apply_updates(m, drop_removed(d, "model"), "model.")
    return m


def save_export(path: str | Path, generator: nn.Module, mcfg: ModelConfig, *, text_encoder: str,
                text_dim: int, step: int, config: dict, stage1_model: ModelConfig | None = None) -> Path:
    """Write an export (weights at ``path`` with the suffix ``.safetensors``, the JSON next to
    it), each file atomically (temp file + rename); returns the weights path."""
    weights = Path(path).with_suffix(".safetensors")
    weights.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "format": FORMAT,
        "stage": int(mcfg.stage),
        "model": dataclasses.asdict(mcfg),
        "stage1_model": dataclasses.asdict(stage1_model) if stage1_model is not None else None,
        "text_encoder": text_encoder,
        "text_dim": int(text_dim),
        "image_size": image_size(mcfg.stage),
        "step": int(step),
        "config": config,
    }
    state = {k: _host_fp32(v) for k, v in generator.state_dict().items()}
    # the description first, then the weights: a reader that finds the weights finds their JSON
    atomic_write(config_path(weights), json.dumps(info, indent=1) + "\n")
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "step": str(int(step))})
    return weights


def _host_fp32(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``; floating point in fp32 (integer buffers keep their dtype)."""
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True).contiguous()


def read_export(path: str | Path) -> dict:
    """An export's description with its weights under ``"state_dict"`` (and the file read
    under ``"path"``); see the module docstring for which paths are accepted."""
    p = resolve_export(path)
    payload = _read_safetensors(p) if p.suffix == ".safetensors" else read_legacy_export(p)
    payload["path"] = str(p)
    return payload


def _read_safetensors(weights: Path) -> dict:
    meta = config_path(weights)
    if not meta.is_file():
        raise ExportError(f"{weights}: its description {meta.name} is missing next to it")
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta}: cannot read export description ({e})") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ExportError(f"{meta}: not a {FORMAT} description")
    try:
        with safe_open(str(weights), "pt") as f:
            header = f.metadata() or {}
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:  # truncated or not a safetensors file
        raise ExportError(f"{weights}: cannot read export weights ({e})") from e
    if header.get("format") != FORMAT or header.get("step") != str(info.get("step")):
        raise ExportError(f"{weights} (step {header.get('step')}) and {meta.name} (step {info.get('step')}) "
                          "are not from the same export (one was rewritten or copied on its own)")
    info["state_dict"] = state
    return info


def read_legacy_export(path: Path, note: bool = True) -> dict:
    """An old-format (``stackgan-export/1``) pickle export, through torch's weights-only
    unpickler (its payload is tensors and plain containers only), with a note to convert."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or a pickle that names other objects
        raise ExportError(f"{path}: cannot read generator export ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(payload, dict) or payload.get("format") != LEGACY_FORMAT:
        raise ExportError(f"{path}: not a {LEGACY_FORMAT} or {FORMAT} export")
    if note:
        print(f"note: {path} is an old pickle export; convert it to safetensors (no pickle needed to load) "
              f"with: python -m stackgan.convert --to safetensors {path}", file=sys.stderr)
    return dict(payload, format=FORMAT)


def export_info(payload: dict, path: str | Path = "") -> ExportInfo:
    return ExportInfo(
        stage=int(payload["stage"]),
        text_encoder=str(payload["text_encoder"]),
        text_dim=int(payload["text_dim"]),
        z_dim=int(payload["model"]["z_dim"]),
        image_size=int(payload["image_size"]),
        step=int(payload["step"]),
        config=payload["config"],
        path=str(payload.get("path") or path),  # the file actually read
    )


def build_from_export(payload: dict) -> nn.Module:
    """Rebuild the generator module from an export payload and load its weights."""
    try:
        mcfg = model_config(payload["model"])
        stage1 = None
        if mcfg.stage == 2:
            s1cfg = model_config(payload["stage1_model"])
            stage1 = build_generator(s1cfg, payload["text_dim"])
        g = build_generator(mcfg, payload["text_dim"], stage1=stage1)
    except (ConfigError, KeyError, TypeError) as e:
        raise ExportError(f"export does not describe a buildable generator: {e}") from e
    try:
        missing, unexpected = g.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as e:  # a shape that does not fit
        raise ExportError(f"export weights do not fit the model: {str(e).splitlines()[-1].strip()}") from None
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
    return g, model_config(payload["model"])
