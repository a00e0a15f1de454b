"""Typed experiment configuration: every knob of a run, documented in one place.

A run is described by one :class:`Config` built from a YAML file in ``configs/`` plus
dotted ``key=value`` overrides from the command line (``optim.lr_g=5e-4``). Unknown keys
and values of the wrong type are refused with a message that names the key, before any
expensive work starts. The resolved config is written next to every output
(``config.yaml`` in the run folder, and inside every checkpoint and export).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema (names the key)."""


# --------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    shards: str = "shards/birds-embedded"  # folder with metadata.json and *.tar shards
    split: str = "train"  # split the trainer streams from
    batch_size: int = 64  # per process; the global batch is batch_size x world size
    num_workers: int = -1  # loader worker processes per training process; -1 = sized to the machine
    shuffle_buffer: int = 0  # shuffle window in samples (no memory cost); 0 = whole split, 1 = none
    emb_mode: Literal["one", "mean"] = "one"  # one of the 10 captions, or mean of emb_k
    emb_k: int = 4  # captions averaged when emb_mode=mean (TF StackGAN uses 4)
    on_corrupt: Literal["raise", "skip"] = "raise"  # corrupt shard: stop naming it, or skip + count
    fixed_samples: int = 8  # captions used for the fixed-noise sample grids


@dataclass
class ModelConfig:
    stage: Literal[1, 2] = 1
    z_dim: int = 100  # noise dimension (Z_DIM)
    cond_dim: int = 128  # conditioning-augmentation output (EMBEDDING_DIM / ef_dim)
    gf_dim: int = 128  # generator base filters (GF_DIM)
    df_dim: int = 64  # discriminator base filters (DF_DIM)
    r_num: int = 4  # residual blocks in the stage-II generator
    text_dim: int = 0  # 0 = take it from the shard metadata
    emb_scale: float = 1.0  # multiplies the text embedding before CA-Net; unit-norm sentence embeddings
    # (all-MiniLM-L6-v2, 384-d) need ~sqrt(dim) = 19.6, or mu ~ 0 and D ignores the text
    ca_act: Literal["relu", "leaky"] = "relu"  # CA-Net activation: relu = official PyTorch, leaky = official TF
    d_cond: Literal["mu", "text"] = "mu"  # D's condition: G's CA mean (official PyTorch) or its own
    # projection of the text embedding (official TensorFlow)
    spectral_norm: bool = False  # spectral norm on D's convolutions (stabiliser)
    g_film: bool = False  # stage I: the condition also scales/shifts every up-block of G (not in StackGAN)
    d_projection: bool = False  # add a projection term <W h, cond> to D's conditional logit (not in StackGAN)
    contrastive_dim: int = 0  # > 0: D gets image/text code heads of this size for loss.contrastive_coef
    contrastive_spatial: bool = False  # D's image code reads its whole 4x4 map (where each colour is),
    # not the map's spatial mean
    d_uncond: bool = False  # stage I: D also gets stage II's unconditional (realism only) head, weighed
    # by loss.uncond_coef as in stage II (StackGAN-v2's joint loss; stage II always has it)
    stage1_export: str = ""  # stage II: path of the stage-I generator export (frozen)


@dataclass
class LossConfig:
    kind: Literal["bce", "hinge"] = "bce"  # bce = official StackGAN; hinge = stabiliser option
    wrong: Literal["class", "shift", "perm"] = "class"  # how mismatched (wrong) pairs are drawn
    kl_coef: float = 2.0  # weight of the conditioning-augmentation KL term in G's loss
    uncond_coef: float = 1.0  # weight of the unconditional head (stage II, stage I with model.d_uncond; official: 1)
    contrastive_coef: float = 0.0  # image-text InfoNCE in D's code space, on real images for D and on
    # fakes for G (XMC-GAN style; not in StackGAN); needs model.contrastive_dim > 0
    contrastive_temp: float = 0.1  # temperature of that InfoNCE
    contrastive_fakes: bool = False  # D's caption->image side also counts the batch's fakes as negatives,
    # so G cannot win the contrastive term with codes D never sees on real images
    contrastive_bank: int = 0  # > 0: the last N captions seen are extra negatives for each image (D
    # re-encodes them every step); same-class captions are never negatives. Needs model.d_cond=text
    contrastive_g_coef: float = -1.0  # G's weight of the contrastive term on its fakes (-1 = contrastive_coef)
    class_coef: float = 0.0  # > 0: D gets a species classifier head trained on real images, and G is
    # trained to make its fakes read as its caption's species (AC-GAN / TAC-GAN style; not in StackGAN).
    # Captions rarely state every part; the species they name fixes the rest (docs/quality.md)
    class_g_coef: float = -1.0  # G's weight of the species terms on its fakes (-1 = class_coef; 0 = the
    # head only shapes D's features: no pull on G towards one recognisable picture per species)
    class_twin: bool = False  # with class_coef: TAC-GAN's twin species head (Gong et al. 2019), trained
    # by D on G's fakes (class_coef); G's loss subtracts it (class_g_coef), cancelling the species head's pull
    # towards one easy-to-classify picture per caption (the conditional mode collapse of AC-GAN)
    diffaug_shift: int = 0  # > 0: every image D sees (real and fake) is shifted by up to this many
    # pixels, differentiably (DiffAugment, translation only; stackgan.augment)
    r1_gamma: float = 0.0  # > 0: R1 penalty gamma/2 * |grad_x D(x, text)|^2 on real matching pairs in D's
    # step (Mescheder et al. 2018; not in StackGAN): D cannot grow arbitrarily sharp around real images
    r1_every: int = 16  # lazy R1 (StyleGAN2): the penalty runs every N steps, weighted by N
    ms_coef: float = 0.0  # > 0: mode-seeking term (MSGAN, Mao et al. 2019) in G's loss: coef / (mean
    # |G(t, z1) - G(t, z2)| / mean |z1 - z2|), so G cannot ignore its noise (the species head's price)
    ms_samples: int = 8  # captions per step that get a second sample for it (0 = the whole batch)


@dataclass
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_decay_epochs: float = 50.0  # halve both LRs every this many epochs (0 = never)
    lr_decay_factor: float = 0.5
    ema_decay: float = 0.999  # EMA of G's weights used for sampling (0 = off)
    ema_start: int = 0  # steps before EMA starts tracking (copies G until then)
    ema_warmup: bool = True  # decay ramps up as min(ema_decay, (1 + n) / (10 + n)) (TF's rule)
    fused: bool = True  # fused Adam (CPU and CUDA); false = the plain for-loop Adam
    grad_clip: float = 0.0  # clip grad norm of both nets (0 = off)


@dataclass
class TrainConfig:
    run_dir: str = "runs/stage1"
    seed: int = 0
    steps: int = 0  # optimizer updates; 0 = derive from epochs and the shard metadata
    epochs: float = 600.0  # StackGAN's unit, converted to steps when steps=0
    time_limit_min: float = 0.0  # stop (checkpoint + export) after this many minutes of training; 0 = none
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    backend: Literal["ddp", "deepspeed"] = "ddp"
    channels_last: bool = True
    channels_last_min_hw: int = 32  # CPU: layers on maps narrower than this stay NCHW (faster there); 0 = none. GPU: ignored
    compile: bool = False  # torch.compile G and D
    log_every: int = 50  # status line, JSONL, TensorBoard scalars
    diag_every: int = 200  # D(real/wrong/fake), grad norms, diversity score
    sample_every: int = 500  # fixed-noise sample grid
    ckpt_every: int = 1000
    keep_last: int = 3  # checkpoints kept in run_dir/checkpoints
    diversity_warn: float = 0.05  # warn when the diversity score falls below this
    metrics: str = ""  # metrics at snapshot time, e.g. "judge_consistency,judge_fd,diversity"; "" = off
    metrics_every: int = 0  # steps between metric snapshots (metrics.jsonl); 0 = at the end only
    metrics_samples: int = 500  # generated images per split for the judge metrics
    judge: str = ""  # attribute judge file; "" = <shards>/judge.pt (trained there on first use)
    tqdm: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------
# Loading, overriding, checking
# --------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only what is lossless."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:  # "1" from the command line matches Literal[1]
            if value == a or (isinstance(value, str) and not isinstance(a, str) and value == str(a)):
                return a
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got str {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if isinstance(value, float) and math.isnan(value):
            raise ConfigError(f"{key}: NaN is not a valid value")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def apply_updates(obj: Any, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key {key!r} (known here: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of sub-keys, got {v!r}")
            apply_updates(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, (dict,)):  # keep "a=b: c" literal
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a YAML file (optional) and ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        try:
            apply_updates(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def apply_overrides(obj: Any, overrides: list[str] | tuple[str, ...], what: str = "command-line override") -> None:
    """Apply dotted ``key.sub=value`` strings (values parsed as YAML) to a config dataclass."""
    for text in overrides:
        parts, value = _parse_override(text)
        nested: Any = value
        for part in reversed(parts):
            nested = {part: nested}
        try:
            apply_updates(obj, nested)
        except ConfigError as e:
            raise ConfigError(f"{what} {text!r}: {e}") from None


def validate(cfg: Config) -> None:
    """Cross-field checks that a type annotation cannot express."""
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "model.z_dim": cfg.model.z_dim,
        "model.cond_dim": cfg.model.cond_dim,
        "model.gf_dim": cfg.model.gf_dim,
        "model.df_dim": cfg.model.df_dim,
        "train.log_every": cfg.train.log_every,
        "train.diag_every": cfg.train.diag_every,
        "train.sample_every": cfg.train.sample_every,
        "train.ckpt_every": cfg.train.ckpt_every,
        "train.keep_last": cfg.train.keep_last,
    }
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k} must be > 0, got {v}")
    for k, v in {"optim.lr_g": cfg.optim.lr_g, "optim.lr_d": cfg.optim.lr_d}.items():
        if not v > 0:
            raise ConfigError(f"{k} must be > 0, got {v}")
    if cfg.data.num_workers < -1:
        raise ConfigError(f"data.num_workers must be >= 0, or -1 (sized to the machine), got {cfg.data.num_workers}")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}")
    if cfg.model.stage == 2 and cfg.model.gf_dim % 4:
        raise ConfigError(f"model.gf_dim must be divisible by 4 for stage II, got {cfg.model.gf_dim}")
    if cfg.model.stage == 1 and cfg.model.gf_dim % 2:
        raise ConfigError(f"model.gf_dim must be even, got {cfg.model.gf_dim}")
    if cfg.model.contrastive_dim < 0 or cfg.loss.contrastive_coef < 0 or not cfg.loss.contrastive_temp > 0:
        raise ConfigError("model.contrastive_dim and loss.contrastive_coef must be >= 0 and loss.contrastive_temp > 0")
    if cfg.loss.contrastive_bank < 0:
        raise ConfigError(f"loss.contrastive_bank must be >= 0, got {cfg.loss.contrastive_bank}")
    if cfg.loss.contrastive_bank > 0 and not (cfg.loss.contrastive_coef > 0 and cfg.model.d_cond == "text"):
        raise ConfigError(f"loss.contrastive_bank={cfg.loss.contrastive_bank} needs loss.contrastive_coef > 0 and "
                          f"model.d_cond=text (D encodes the stored captions' raw text embeddings)")
    if cfg.loss.class_coef < 0:
        raise ConfigError(f"loss.class_coef must be >= 0, got {cfg.loss.class_coef}")
    if cfg.loss.class_twin and not cfg.loss.class_coef > 0:
        raise ConfigError("loss.class_twin=true needs loss.class_coef > 0 (the twin counters D's species head)")
    if cfg.loss.class_g_coef < 0 and cfg.loss.class_g_coef != -1:
        raise ConfigError(f"loss.class_g_coef must be >= 0, or -1 (= loss.class_coef), got {cfg.loss.class_g_coef}")
    if cfg.loss.r1_gamma < 0:
        raise ConfigError(f"loss.r1_gamma must be >= 0, got {cfg.loss.r1_gamma}")
    if cfg.loss.r1_every < 1:
        raise ConfigError(f"loss.r1_every must be >= 1, got {cfg.loss.r1_every}")
    if cfg.loss.ms_coef < 0:
        raise ConfigError(f"loss.ms_coef must be >= 0, got {cfg.loss.ms_coef}")
    if cfg.loss.ms_samples == 1 or cfg.loss.ms_samples < 0:
        raise ConfigError(f"loss.ms_samples must be 0 (the whole batch) or >= 2, got {cfg.loss.ms_samples}")
    if cfg.loss.diffaug_shift < 0:
        raise ConfigError(f"loss.diffaug_shift must be >= 0, got {cfg.loss.diffaug_shift}")
    if cfg.loss.contrastive_g_coef < 0 and cfg.loss.contrastive_g_coef != -1:
        raise ConfigError(f"loss.contrastive_g_coef must be >= 0, or -1 (= loss.contrastive_coef), "
                          f"got {cfg.loss.contrastive_g_coef}")
    if cfg.loss.contrastive_fakes and not cfg.loss.contrastive_coef > 0:
        raise ConfigError("loss.contrastive_fakes=true needs loss.contrastive_coef > 0")
    if cfg.loss.contrastive_coef > 0 and cfg.model.contrastive_dim == 0:
        raise ConfigError(f"loss.contrastive_coef={cfg.loss.contrastive_coef} needs model.contrastive_dim > 0 "
                          "(the size of D's image/text codes)")
    if cfg.train.steps < 0 or cfg.train.epochs < 0:
        raise ConfigError("train.steps and train.epochs must be >= 0")
    if cfg.train.steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("set train.steps or train.epochs")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Rebuild a config saved by :func:`to_dict` (checkpoints, exports), with checking."""
    cfg = Config()
    apply_updates(cfg, data)
    validate(cfg)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def image_size(stage: int) -> int:
    """Training resolution of a stage (StackGAN: 64 then 256)."""
    return 64 if stage == 1 else 256
