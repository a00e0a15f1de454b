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

from .errors import StackGANError
from .files import atomic_write, config_path


class ConfigError(StackGANError, ValueError):
    """A config file or override that does not fit the schema (names the key)."""


REPORT_TO = ("tensorboard", "wandb", "mlflow", "comet_ml", "all", "none")  # train.report_to's names


# --------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    shards: str = "shards/birds-embedded"  # folder with metadata.json and *.tar shards (the train split is
    # streamed), or a URL: file://, http(s)://, pipe:CMD with {name} for the file (pipe:aws s3 cp s3://b/c/{name} -)
    cache_dir: str = ""  # remote shards: node-local cache folder; "" = $STACKGAN_SHARD_CACHE or
    # $TMPDIR/stackgan-shards
    cache_gb: float = 20.0  # remote shards: the cache's bound (least recently used shards are evicted)
    batch_size: int = 64  # the global batch the recipe was tuned for (all processes together); see batch_rule
    batch_rule: Literal["keep_global", "linear", "sqrt"] = "keep_global"  # on K processes: keep_global = each
    # takes batch_size / K (refused unless divisible); linear / sqrt = each takes batch_size (the global batch
    # grows K-fold) and the learning rates grow K-fold / sqrt(K)-fold. Epochs count global batches
    num_workers: int = -1  # loader worker processes per training process; -1 = sized to the machine
    shuffle_buffer: int = 0  # shuffle window in samples (no memory cost); 0 = whole split, 1 = none
    emb_k: int = 1  # caption embeddings averaged per image: 1 = one of the 10 (official PyTorch), 4 = official TF
    on_corrupt: Literal["raise", "skip"] = "raise"  # corrupt shard: stop naming it, or skip + count


@dataclass
class ModelConfig:
    stage: Literal[1, 2] = 1
    family: Literal["pytorch", "tf"] = "pytorch"  # pytorch = the StackGAN-Pytorch (COCO) networks; tf = the
    # TensorFlow birds networks of the paper: residual blocks in stage I's G and in both Ds, 1x1 joint conv in D's
    # logit head, log-sigma CA-Net, no unconditional head in stage II's D (needs d_cond=text, ca_act=leaky)
    z_dim: int = 100  # noise dimension (Z_DIM)
    cond_dim: int = 128  # conditioning-augmentation output (EMBEDDING_DIM / ef_dim)
    gf_dim: int = 128  # generator base filters (GF_DIM)
    df_dim: int = 64  # discriminator base filters (DF_DIM)
    r_num: int = 4  # residual blocks in the stage-II generator
    emb_scale: float = 1.0  # multiplies the text embedding before CA-Net; unit-norm sentence embeddings
    # (all-MiniLM-L6-v2, 384-d) need ~sqrt(dim) = 19.6, or mu ~ 0 and D ignores the text
    ca_act: Literal["relu", "leaky"] = "relu"  # CA-Net activation: relu = official PyTorch, leaky = official TF
    d_cond: Literal["mu", "text"] = "mu"  # D's condition: G's CA mean (official PyTorch) or its own
    # projection of the text embedding (official TensorFlow)
    spectral_norm: bool = False  # spectral norm on D's convolutions (stabiliser)
    g_film: bool = False  # the condition also scales/shifts every up-block of G (not in StackGAN)
    upsample_skip: bool = False  # stage II: G draws a correction on top of the bicubically upsampled stage-I
    # image (zero at the start), instead of a new image from its 16x16 code (official)
    word_attn: bool = False  # stage I: G's 32- and 64-px maps attend over the caption's word vectors
    # (AttnGAN's attention; not in StackGAN); the words: the sentence encoder's word pieces (stackgan.words).
    # Needs loss.word_coef > 0
    stage1_export: str = ""  # stage II: path of the stage-I generator export (frozen)


@dataclass
class LossConfig:
    kind: Literal["bce", "hinge"] = "bce"  # bce = official StackGAN; hinge = stabiliser option
    wrong: Literal["class", "shift", "perm"] = "class"  # how mismatched (wrong) pairs are drawn
    kl_coef: float = 2.0  # weight of the conditioning-augmentation KL term in G's loss
    contrastive_coef: float = 0.0  # > 0: D gets image/text code heads, and an image-text InfoNCE in their
    # space trains D on real pairs and G on its fakes (XMC-GAN style; not in StackGAN)
    contrastive_bank: int = 0  # > 0: the last N captions seen are extra negatives for each image (D
    # re-encodes them every step; same-class captions are never negatives) and G's fakes are negatives for
    # D's caption->image side. Needs model.d_cond=text
    class_coef: float = 0.0  # > 0: D gets a species classifier head trained on real images, and G is
    # trained to make its fakes read as its caption's species (AC-GAN style; not in StackGAN).
    # Captions rarely state every part; the species they name fixes the rest (docs/quality.md)
    attr_coef: float = 0.0  # > 0: D gets an attribute head (one softmax per attribute group, e.g. crown
    # colour) trained on real images' labels (attr.npy), and G is trained to make its fakes read as the
    # groups its caption states, and no others (not in StackGAN; needs shards with attributes)
    word_coef: float = 0.0  # > 0: D gets word and region codes (its 4x4 map), and AttnGAN's word-region
    # matching loss (DAMSM's, in D's space) trains D on real pairs and G on its fakes (not in StackGAN).
    # Stage I, together with model.word_attn (each alone measured no better)
    recon_coef: float = 0.0  # stage II: G also refines the real 64-px crops, and the L1 distance of that
    # refinement to the real 256-px crop is in its loss (a super-resolution signal real images give for free)


@dataclass
class OptimConfig:
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lr_decay_epochs: float = 50.0  # halve both LRs every this many epochs (0 = never)
    ema_decay: float = 0.999  # EMA of G's weights used for sampling (0 = off); ramps up as (1 + n) / (10 + n)
    grad_clip: float = 0.0  # clip grad norm of both nets (0 = off)


@dataclass
class TrainConfig:
    run_dir: str = "runs/stage1"
    seed: int = 0
    steps: int = 0  # optimizer updates; 0 = derive from epochs and the shard metadata
    epochs: float = 600.0  # StackGAN's unit, converted to steps when steps=0
    time_limit_min: float = 0.0  # stop (checkpoint + export) after this many minutes of training; 0 = none
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: the launcher's (accelerate launch
    # --mixed_precision, or its config file), else fp32; an explicit value must agree with the launcher's
    backend: Literal["ddp", "deepspeed"] = "ddp"
    channels_last: bool = True  # CPU: maps narrower than 32 px stay NCHW (faster there; docs/performance.md)
    compile: bool = False  # torch.compile G and D
    tf32: bool = True  # CUDA: TF32 tensor cores for fp32 matmuls and convolutions (Ampere and newer)
    cudnn_benchmark: bool = True  # CUDA: let cuDNN pick the fastest kernels (every batch has the same shape)
    log_every: int = 50  # status line, JSONL, TensorBoard scalars
    sample_every: int = 500  # fixed-noise sample grid, D(real/wrong/fake), grad norms, diversity score
    ckpt_every: int = 1000  # steps between checkpoints (and one at the end or on a stop signal)
    keep_last: int = 3  # the newest N complete checkpoints are kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (milestones); 0 = none
    metrics: str = ""  # metrics at snapshot time, e.g. "judge_consistency,judge_fd,diversity"; "" = off
    metrics_every: int = 0  # steps between metric snapshots (metrics.jsonl); 0 = at the end only
    metrics_samples: int = 500  # generated images per split for the judge metrics, and for IS / FID
    # snapshots (monitoring only: the papers' protocol, 30k, is `python -m stackgan.evaluate`)
    inception: str = ""  # torchvision Inception-v3 state_dict for inception_score / fid (never downloaded)
    fid_inception: str = ""  # FID-Inception weights for fid_inception; "" = the torch hub cache
    report_to: str = "tensorboard"  # experiment trackers, comma-separated: tensorboard, wandb, mlflow,
    # comet_ml; all (every one installed) or none. The JSONL logs in the run folder are written in any case
    judge: str = ""  # attribute judge: "parts", "species" or a file; "" = parts on the embedded set, else species


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Options that are gone: key -> (the value that behaves as today, or None for any; why it went).
# "retired" ones were measured no better (docs/quality.md, "Retired options", with the commit where
# each last lived); the others became constants or part of another option. A checkpoint saved with
# one of them set otherwise cannot continue as it was trained, and is refused (``changed_by_removal``).
# model.d_uncond was a *stage-I* option (an unconditional head on stage I's D, commit ca0a87d) and stays
# retired; whether stage II's D has its unconditional head is a property of the network, model.family.
LAST_COMMIT = "7f4e420"
_RETIRED = "retired"
REMOVED: dict[str, tuple[object, str]] = {
    "model.d_projection": (False, _RETIRED), "model.contrastive_spatial": (False, _RETIRED),
    "model.d_uncond": (False, _RETIRED), "loss.contrastive_g_coef": (-1.0, _RETIRED),
    "loss.class_g_coef": (-1.0, _RETIRED), "loss.class_twin": (False, _RETIRED),
    "loss.diffaug_shift": (0, _RETIRED), "loss.r1_gamma": (0.0, _RETIRED), "loss.r1_every": (None, _RETIRED),
    "loss.ms_coef": (0.0, _RETIRED), "loss.ms_samples": (None, _RETIRED), "optim.ema_start": (0, _RETIRED),
    "data.split": ("train", "the train split is always streamed"),
    "data.emb_mode": (None, "data.emb_k=1 is one caption, k > 1 the mean of k"),
    "data.fixed_samples": (None, "sample grids show 8 captions"),
    "model.text_dim": (None, "taken from the shards"),
    "model.contrastive_dim": (None, "D's codes have 128 dims when loss.contrastive_coef > 0"),
    "loss.uncond_coef": (1.0, "stage II's unconditional head has the official weight 1"),
    "loss.contrastive_temp": (0.1, "the contrastive temperature is 0.1"),
    "loss.contrastive_fakes": (None, "G's fakes are negatives whenever loss.contrastive_bank > 0"),
    "optim.lr_decay_factor": (0.5, "learning rates halve every optim.lr_decay_epochs"),
    "optim.ema_warmup": (True, "the EMA always warms up"),
    "optim.fused": (None, "Adam is always fused"),
    "train.channels_last_min_hw": (None, "32 on CPUs"),
    "train.diag_every": (None, "diagnostics come with the sample grids (train.sample_every)"),
    "train.diversity_warn": (None, "the collapse warning fires below a diversity of 0.05"),
    "train.tqdm": (None, "a progress bar when stdout is a terminal"),
}


def removed_note(key: str) -> str:
    same, why = REMOVED[key]
    if why == _RETIRED:
        return (f"{key} was retired: measured no better (docs/quality.md, 'Retired options'; "
                f"last in commit {LAST_COMMIT})")
    return f"{key} was removed: {why}"


def changed_by_removal(saved: dict) -> list[str]:
    """Notes on the removed options a saved config (a checkpoint's) had set to something that
    today's code no longer does."""
    notes = []
    for key, (same, _) in REMOVED.items():
        section, name = key.split(".")
        sec = saved.get(section) or {}
        if same is not None and name in sec and sec[name] != same:
            notes.append(f"{removed_note(key)} (this run had {name}={sec[name]!r})")
    return notes


def drop_removed(saved: dict, section: str) -> dict:
    """One section of a saved config without the keys that no longer exist (an old export's
    ``model`` dict: none of them changed what a generator computes)."""
    return {k: v for k, v in saved.items() if f"{section}.{k}" not in REMOVED}


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
        if value is False and "no" in allowed:  # YAML 1.1 reads a bare `no` (mixed_precision=no) as false
            return "no"
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
            if key in REMOVED:
                raise ConfigError(removed_note(key))
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
    """Build a :class:`Config` from a YAML file (optional; a path or a shipped config's name, see
    :func:`stackgan.files.config_path`) and ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        update_from_yaml(cfg, config_path(path), what="config file")
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def update_from_yaml(obj: Any, path: str | Path, what: str = "config file", _seen: tuple = ()) -> None:
    """Apply a YAML mapping of sections to a config dataclass; errors name the file and key.
    A top-level ``include: other.yaml`` (relative to this file) is applied first, so an old
    config name can stay a one-line alias of the preset that replaced it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    if "include" in data:
        inc = data.pop("include")
        if not isinstance(inc, str):
            raise ConfigError(f"{p}: include must be a file name, got {inc!r}")
        if p.resolve() in _seen:
            raise ConfigError(f"{p}: includes itself (through {' -> '.join(str(s) for s in _seen)})")
        update_from_yaml(obj, p.parent / inc, what=f"{p}: included file", _seen=(*_seen, p.resolve()))
    try:
        apply_updates(obj, data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


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
        "data.batch_size": cfg.data.batch_size, "data.emb_k": cfg.data.emb_k,
        "model.z_dim": cfg.model.z_dim, "model.cond_dim": cfg.model.cond_dim,
        "model.gf_dim": cfg.model.gf_dim, "model.df_dim": cfg.model.df_dim,
        "train.log_every": cfg.train.log_every, "train.sample_every": cfg.train.sample_every,
        "train.ckpt_every": cfg.train.ckpt_every, "train.keep_last": cfg.train.keep_last,
        "optim.lr_g": cfg.optim.lr_g, "optim.lr_d": cfg.optim.lr_d,
    }
    for k, v in positive.items():
        if not v > 0:
            raise ConfigError(f"{k} must be > 0, got {v}")
    non_negative = {
        "loss.contrastive_coef": cfg.loss.contrastive_coef, "loss.contrastive_bank": cfg.loss.contrastive_bank,
        "loss.class_coef": cfg.loss.class_coef, "loss.recon_coef": cfg.loss.recon_coef,
        "loss.attr_coef": cfg.loss.attr_coef, "loss.word_coef": cfg.loss.word_coef,
        "optim.grad_clip": cfg.optim.grad_clip, "train.steps": cfg.train.steps, "train.epochs": cfg.train.epochs,
        "train.keep_every": cfg.train.keep_every, "train.metrics_every": cfg.train.metrics_every,
    }
    for k, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{k} must be >= 0, got {v}")
    if not cfg.data.cache_gb > 0:
        raise ConfigError(f"data.cache_gb must be > 0, got {cfg.data.cache_gb}")
    if cfg.data.num_workers < -1:
        raise ConfigError(f"data.num_workers must be >= 0, or -1 (sized to the machine), got {cfg.data.num_workers}")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {cfg.optim.ema_decay}")
    if cfg.model.stage == 2 and cfg.model.gf_dim % 4:
        raise ConfigError(f"model.gf_dim must be divisible by 4 for stage II, got {cfg.model.gf_dim}")
    if cfg.model.stage == 1 and cfg.model.gf_dim % 2:
        raise ConfigError(f"model.gf_dim must be even, got {cfg.model.gf_dim}")
    if cfg.loss.contrastive_bank > 0 and not (cfg.loss.contrastive_coef > 0 and cfg.model.d_cond == "text"):
        raise ConfigError(f"loss.contrastive_bank={cfg.loss.contrastive_bank} needs loss.contrastive_coef > 0 and "
                          f"model.d_cond=text (D encodes the stored captions' raw text embeddings)")
    if cfg.model.family == "tf" and (cfg.model.d_cond != "text" or cfg.model.ca_act != "leaky" or cfg.model.g_film):
        raise ConfigError("model.family=tf is the TensorFlow birds network: it needs model.d_cond=text, "
                          "model.ca_act=leaky and model.g_film=false")
    if (cfg.model.word_attn or cfg.loss.word_coef > 0) and (cfg.model.stage != 1 or cfg.model.family != "pytorch"):
        raise ConfigError("model.word_attn and loss.word_coef are stage-I options of the pytorch family "
                          "(model.stage=1, model.family=pytorch); stage II passes the words to a stage-I "
                          "export that has them")
    if cfg.model.word_attn != (cfg.loss.word_coef > 0):
        raise ConfigError(f"model.word_attn={cfg.model.word_attn} with loss.word_coef={cfg.loss.word_coef}: the "
                          "two go together (G's attention over the words and the word-region loss that asks "
                          "for them; each alone measured no better: docs/quality.md, 'Word-level conditioning')")
    if cfg.model.word_attn and cfg.data.emb_k != 1:  # (with loss.word_coef, checked just above)
        raise ConfigError(f"model.word_attn and loss.word_coef read one caption's words: they need "
                          f"data.emb_k=1 (the embedding of one caption), got data.emb_k={cfg.data.emb_k}")
    if cfg.model.stage == 1 and (cfg.model.upsample_skip or cfg.loss.recon_coef > 0):
        raise ConfigError("model.upsample_skip and loss.recon_coef are stage-II options (model.stage=2)")
    trackers = [n.strip() for n in cfg.train.report_to.split(",")]
    unknown = [n for n in trackers if n not in REPORT_TO]
    if unknown or (len(trackers) > 1 and {"all", "none"} & set(trackers)):
        raise ConfigError(f"train.report_to={cfg.train.report_to!r}: expected a comma-separated list of "
                          f"{', '.join(REPORT_TO[:4])}, or all, or none")
    if cfg.train.steps == 0 and cfg.train.epochs == 0:
        raise ConfigError("set train.steps or train.epochs")


def process_batch(data: DataConfig, world: int) -> int:
    """The batch of one of ``world`` processes under ``data.batch_rule`` (a ConfigError when
    ``keep_global`` cannot split the global batch evenly)."""
    if world < 1:
        raise ValueError(f"process_batch: world must be >= 1, got {world}")
    if data.batch_rule != "keep_global":
        return data.batch_size
    if data.batch_size % world:
        up = -(-data.batch_size // world) * world
        raise ConfigError(f"data.batch_size={data.batch_size} (the global batch; data.batch_rule=keep_global)"
                          f" does not split over {world} processes: use a multiple of {world} (e.g. {up}), or"
                          f" data.batch_rule=linear|sqrt (each process takes {data.batch_size}, learning"
                          " rates scaled)")
    return data.batch_size // world


def lr_scale(data: DataConfig, world: int) -> float:
    """Factor on both learning rates for the global batch run on ``world`` processes: 1 when the
    recipe's global batch is kept, K or sqrt(K) when K processes each take the whole batch."""
    k = process_batch(data, world) * world / data.batch_size
    return {"keep_global": 1.0, "linear": k, "sqrt": math.sqrt(k)}[data.batch_rule]


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys (``{"optim.lr_g": 2e-4, ...}``): how overrides name them,
    how a resume compares two configs and how trackers show them."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def image_size(stage: int) -> int:
    """Training resolution of a stage (StackGAN: 64 then 256)."""
    return 64 if stage == 1 else 256
