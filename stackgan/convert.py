"""Convert generator files into this project's export (safetensors + JSON; stackgan/export.py).

    python -m stackgan.convert --to safetensors runs/x/export/generator.pt
    python -m stackgan.convert --from-official netG_epoch_90.pth --stage 2 --out runs/official/export \\
        [--netD netD_epoch_last.pth] [--text-encoder char-CNN-RNN]
    python -m stackgan.convert --from-checkpoint runs/x/checkpoints/step-00000800 --out runs/x/export-800

``--to safetensors`` rewrites an old pickle export (``stackgan-export/1``) next to itself, read
through torch's weights-only unpickler. ``--from-official`` loads a StackGAN-Pytorch
(hanzhanggit/StackGAN-Pytorch) ``netG_epoch_N.pth`` of stage I or II into our generator and
writes an export that ``stackgan.sample`` and ``stackgan.evaluate`` read; ``--netD`` converts the
matching discriminator into ``discriminator.safetensors`` beside it. The network widths (text,
condition, noise, gf/df, residual blocks) are read from the checkpoint's shapes; every key is
mapped through :data:`OFFICIAL_TO_OURS` and checked against the shape our model has, so an
unknown key, a missing one or a wrong shape is refused with the key named before anything is
written. ``--from-checkpoint`` writes the export the trainer would have written at a checkpoint's
step (its EMA generator with BatchNorm statistics of its own weights, or G without EMA), so a
run's intermediate checkpoints are scored and sampled with the same commands as its end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import checkpoint as ckpt
from .config import Config, ConfigError, ModelConfig, apply_updates, changed_by_removal, drop_removed, to_dict
from .ema import EMA
from .errors import StackGANError, report
from .export import (WEIGHTS_NAME, ExportError, build_from_export, model_config, read_legacy_export,
                     load_stage1_for_stage2, save_export)
from .models import build_discriminator, build_generator
from .run import standing_inputs
from .text import CHAR_CNN_RNN
from .words import reads_words

OFFICIAL = "hanzhanggit/StackGAN-Pytorch"
D_WEIGHTS_NAME = "discriminator.safetensors"
D_FORMAT = "stackgan-discriminator/1"

# Official key segment -> ours (the only names that differ; the rest of the keys are the same):
# the official generators hold their four up-blocks as attributes upsample1..4, ours as one
# nn.Sequential `upsample`; STAGE2_G holds its stage-I generator as STAGE1_G, ours as `stage1`.
# The discriminators' keys are identical (their Sigmoid has no weights; ours ends in logits).
OFFICIAL_TO_OURS = {
    "STAGE1_G": "stage1",
    "upsample1": "upsample.0",
    "upsample2": "upsample.1",
    "upsample3": "upsample.2",
    "upsample4": "upsample.3",
}


class ConvertError(ExportError):
    """A checkpoint that does not fit the network it claims to be (names the key)."""


def our_key(official: str) -> str:
    """Our state-dict key for an official StackGAN-Pytorch one."""
    return ".".join(OFFICIAL_TO_OURS.get(part, part) for part in official.split("."))


def _need(sd: dict, key: str, what: str, ndim: int = 2) -> torch.Tensor:
    """A weight the widths are read from, present and of the right rank."""
    if key not in sd:
        raise ConvertError(f"not a {OFFICIAL} {what}: it has no {key!r}")
    t = sd[key]
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        raise ConvertError(f"not a {OFFICIAL} {what}: {key!r} is not a {ndim}-d tensor")
    return t


def stage1_g_config(sd: dict, prefix: str = "", what: str = "stage-I netG") -> tuple[ModelConfig, int]:
    """(model config, text dim) of an official STAGE1_G state dict, from its shapes."""
    ca = _need(sd, f"{prefix}ca_net.fc.weight", what)
    fc = _need(sd, f"{prefix}fc.0.weight", what)
    cond = ca.shape[0] // 2
    mcfg = ModelConfig(stage=1, z_dim=fc.shape[1] - cond, cond_dim=cond, gf_dim=fc.shape[0] // 16 // 8)
    return mcfg, ca.shape[1]


def stage2_g_config(sd: dict) -> tuple[ModelConfig, ModelConfig, int]:
    """(stage-II config, stage-I config, text dim) of an official STAGE2_G state dict."""
    s1, text_dim = stage1_g_config(sd, "STAGE1_G.", "stage-II netG (with its STAGE1_G)")
    ca = _need(sd, "ca_net.fc.weight", "stage-II netG")
    enc = _need(sd, "encoder.0.weight", "stage-II netG", 4)
    r_num = len({k.split(".")[1] for k in sd if k.startswith("residual.")})
    return (ModelConfig(stage=2, z_dim=s1.z_dim, cond_dim=ca.shape[0] // 2, gf_dim=enc.shape[0], r_num=r_num),
            s1, text_dim)


def d_config(sd: dict, stage: int) -> ModelConfig:
    """The model config of an official STAGE1_D / STAGE2_D state dict (df_dim, cond_dim)."""
    first = _need(sd, "encode_img.0.weight", f"stage-{'I' * stage} netD", 4)
    joint = _need(sd, "get_cond_logits.outlogits.0.weight", f"stage-{'I' * stage} netD", 4)
    return ModelConfig(stage=stage, df_dim=first.shape[0], cond_dim=joint.shape[1] - first.shape[0] * 8)


def load_official(sd: dict, model: nn.Module, what: str) -> None:
    """Load an official state dict into ``model`` through :func:`our_key`; refuse unknown keys,
    wrong shapes and missing weights, naming each (BatchNorm's ``num_batches_tracked``, which
    PyTorch < 0.4.1 did not save, may be missing)."""
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ConvertError(f"{what}: {k!r} is a {type(v).__name__}, not a tensor")
        name = our_key(k)
        if name not in ours:
            raise ConvertError(f"{what}: unknown key {k!r} (not in a {OFFICIAL} network of these widths)")
        if tuple(v.shape) != tuple(ours[name].shape):
            raise ConvertError(f"{what}: {k!r} has shape {tuple(v.shape)}, the network its other weights "
                               f"describe needs {tuple(ours[name].shape)}")
        mapped[name] = v.to(ours[name].dtype)
    missing = [k for k in ours if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConvertError(f"{what}: missing {len(missing)} weight(s), e.g. {missing[:5]} (our names)")
    model.load_state_dict({**ours, **mapped})


def _read_pth(path: Path) -> dict:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConvertError(f"{path}: not found") from None
    except Exception as e:
        raise ConvertError(f"{path}: cannot read a state dict ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(sd, dict):
        raise ConvertError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd


def convert_official_g(sd: dict, stage: int, what: str = "netG") -> tuple[nn.Module, ModelConfig,
                                                                           ModelConfig | None, int]:
    """(our generator with the official weights, its config, stage-I config or None, text dim)."""
    if stage not in (1, 2):
        raise ConvertError(f"--stage must be 1 or 2, got {stage}")
    if stage == 1:
        (mcfg, text_dim), s1cfg = stage1_g_config(sd), None
    else:
        mcfg, s1cfg, text_dim = stage2_g_config(sd)
    try:
        stage1 = build_generator(s1cfg, text_dim) if s1cfg else None
        g = build_generator(mcfg, text_dim, stage1=stage1)
    except ValueError as e:  # widths read off the shapes that no generator has
        raise ConvertError(f"{what}: {e}") from None
    load_official(sd, g, what)
    return g.eval(), mcfg, s1cfg, text_dim


def convert_official_d(sd: dict, stage: int, what: str = "netD") -> tuple[nn.Module, ModelConfig]:
    mcfg = d_config(sd, stage)
    try:
        d = build_discriminator(mcfg)
    except ValueError as e:
        raise ConvertError(f"{what}: {e}") from None
    load_official(sd, d, what)
    return d.eval(), mcfg


def from_official(netg: str | Path, stage: int, out: str | Path, *, netd: str | Path | None = None,
                  text_encoder: str = CHAR_CNN_RNN) -> Path:
    """Convert an official ``netG_epoch_N.pth`` (and ``netD``) into an export under ``out``."""
    netg = Path(netg)
    epoch = int(m.group(1)) if (m := re.search(r"epoch_(\d+)", netg.name)) else None
    g, mcfg, s1cfg, text_dim = convert_official_g(_read_pth(netg), stage, str(netg))
    d = None
    if netd is not None:
        d, dcfg = convert_official_d(_read_pth(Path(netd)), stage, str(netd))
        if dcfg.cond_dim != mcfg.cond_dim:
            raise ConvertError(f"{netd}: D's condition is {dcfg.cond_dim}-d, "
                               f"{netg}'s CA-Net gives {mcfg.cond_dim}")
        mcfg = dataclasses.replace(mcfg, df_dim=dcfg.df_dim)
    out = Path(out)
    source = {"converted_from": {"code": OFFICIAL, "netG": str(netg.resolve()), "epoch": epoch,
                                 "stage": stage, "netD": str(Path(netd).resolve()) if netd else None}}
    path = save_export(out / WEIGHTS_NAME, g, mcfg, text_encoder=text_encoder, text_dim=text_dim, step=0,
                       config=source, stage1_model=s1cfg)
    if d is not None:
        state = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
                 for k, v in d.state_dict().items()}
        tmp = out / f".{D_WEIGHTS_NAME}.{os.getpid()}.tmp"
        meta = {"format": D_FORMAT, "model": json.dumps(dataclasses.asdict(mcfg)), "text_dim": str(text_dim)}
        save_file(state, str(tmp), metadata=meta)
        tmp.replace(out / D_WEIGHTS_NAME)
    return path


def to_safetensors(old: str | Path, out: str | Path | None = None) -> Path:
    """Rewrite an old pickle export as safetensors + JSON (beside it unless ``out``)."""
    old = Path(old)
    if old.suffix != ".pt" or not old.is_file():
        raise ExportError(f"{old}: expected an old-format export file (<run>/export/generator.pt)")
    payload = read_legacy_export(old, note=False)
    dest = Path(out) if out else old.with_suffix(".safetensors")
    if dest.suffix != ".safetensors":
        raise ExportError(f"--out {dest}: must end in .safetensors")
    if dest.exists():
        raise ExportError(f"{dest} exists (a newer export of this run?); remove it or pass another --out")
    g = build_from_export(payload)  # checks that the weights fit the model they describe
    s1 = model_config(payload["stage1_model"]) if payload.get("stage1_model") else None
    return save_export(dest, g, model_config(payload["model"]), text_encoder=payload["text_encoder"],
                       text_dim=payload["text_dim"], step=payload["step"], config=payload["config"],
                       stage1_model=s1)


def from_checkpoint(path: str | Path, out: str | Path, bn_stats: str = "standing") -> Path:
    """The trainer's export at checkpoint ``path`` (a ``<run>/checkpoints/step-N`` folder), written to
    ``<out>/generator.safetensors``; stage II rebuilds its frozen stage I from the run's
    ``model.stage1_export``, and the standing statistics read the run's ``data.shards``.
    ``bn_stats="copied"`` keeps the statistics the EMA copied from the live G instead (the rule
    before standing statistics; to compare the two, docs/training.md)."""
    path = Path(path)
    if not (path / "state.pt").is_file():
        raise ConvertError(f"{path}: not a checkpoint folder (no state.pt)")
    state, _ = ckpt.load(path, rank=0)
    removed = changed_by_removal(state["config"])  # as on resume: a removed option in use is refused
    if removed:
        raise ConvertError(f"{path}: " + "; ".join(removed))
    cfg = Config()
    try:  # keys removed since, at the value today's code computes, are dropped (as export.model_config does)
        apply_updates(cfg, {sec: drop_removed(v, sec) if isinstance(v, dict) else v
                            for sec, v in state["config"].items()})
    except ConfigError as e:
        raise ConvertError(f"{path}: its config does not fit this version ({e})") from None
    text_dim, encoder = int(state["text_dim"]), state["text_encoder"]
    stage1, stage1_cfg = None, None
    if cfg.model.stage == 2:
        stage1, stage1_cfg = load_stage1_for_stage2(cfg.model.stage1_export, text_dim, encoder)
    g = build_generator(cfg.model, text_dim, stage1=stage1)
    ema = state.get("ema")
    g.load_state_dict(ema["model"] if ema else state["G"])
    if ema and bn_stats == "copied":  # the live G's statistics (what every EMA update copied)
        buffers = {name for name, _ in g.named_buffers()}
        g.load_state_dict({**g.state_dict(), **{k: v for k, v in state["G"].items() if k in buffers}})
    if ema and bn_stats == "standing":  # statistics of the averaged weights' own, as the trainer exports
        sampler = EMA(g, ema["decay"])
        sampler.set_standing_inputs(standing_inputs(cfg, words=reads_words(g)))
        g = sampler.sampler()
    return save_export(Path(out) / WEIGHTS_NAME, g, cfg.model, text_encoder=encoder, text_dim=text_dim,
                       step=int(state["step"]), config=to_dict(cfg), stage1_model=stage1_cfg)


def main(argv: list[str] | None = None) -> int:
    doc = "\n\n".join(__doc__.split("\n\n")[:2])
    p = argparse.ArgumentParser(prog="python -m stackgan.convert", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--to", choices=["safetensors"],
                     help="rewrite an old pickle export (the positional path)")
    src.add_argument("--from-official", metavar="netG_epoch_N.pth",
                     help=f"a {OFFICIAL} generator checkpoint")
    src.add_argument("--from-checkpoint", metavar="CHECKPOINT",
                     help="a checkpoint folder of this trainer (<run>/checkpoints/step-N)")
    p.add_argument("--bn-stats", choices=["standing", "copied"], default="standing",
                   help="--from-checkpoint: the EMA generator's BatchNorm statistics: recomputed for its "
                        "weights (the trainer's rule, default) or copied from the live G (the earlier rule)")
    p.add_argument("old", nargs="?", help="with --to: the old export (<run>/export/generator.pt)")
    p.add_argument("--stage", type=int, choices=[1, 2], help="with --from-official: the checkpoint's stage")
    p.add_argument("--netD", help="with --from-official: the matching discriminator (netD_epoch_*.pth)")
    p.add_argument("--out", help="--from-official / --from-checkpoint: export folder (required); --to: the "
                                 ".safetensors path (default: beside the old file)")
    p.add_argument("--text-encoder", default=CHAR_CNN_RNN,
                   help="encoder of the embeddings the checkpoint was trained on (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        if a.to:
            if not a.old:
                p.error("--to safetensors needs the old export's path")
            path = to_safetensors(a.old, a.out)
        elif a.from_checkpoint:
            if not a.out:
                p.error("--from-checkpoint needs --out <export folder>")
            path = from_checkpoint(a.from_checkpoint, a.out, a.bn_stats)
        else:
            if a.stage is None or not a.out:
                p.error("--from-official needs --stage 1|2 and --out <export folder>")
            path = from_official(a.from_official, a.stage, a.out, netd=a.netD, text_encoder=a.text_encoder)
    except StackGANError as e:  # a bad export, official file or checkpoint (ConfigError, CheckpointError too)
        return report(e, "convert")
    print(f"wrote {path} and {path.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
