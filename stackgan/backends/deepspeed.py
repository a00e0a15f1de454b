"""DeepSpeed as the training backend: two ZeRO engines (G and D) for one GAN.

Accelerate's DeepSpeed integration wraps one model per ``Accelerator``, and a GAN has two
networks with two optimisers stepped alternately. What works (ZeRO-1 and ZeRO-2, any number
of processes): two DeepSpeed plugins ``"G"`` and ``"D"``, one ``Accelerator`` per network
(the second shares the first one's state), the plugin selected before each ``prepare``.
Each engine then owns backward, gradient reduction, clipping (from its config) and the
optimizer step. D's parameters are frozen while G's loss is backpropagated through D, so
ZeRO-2 never sees D gradients outside D's own step (else it asserts "parameter ... has
already been reduced").

:class:`DeepSpeedGAN` is the trainer's backend (:func:`stackgan.backends.make_backend`) when
``train.backend=deepspeed`` (or when launched with a DeepSpeed accelerate config,
``configs/accelerate/deepspeed_zero{1,2}.yaml``). Choices made here:

* ZeRO stage from the launcher (``ACCELERATE_DEEPSPEED_ZERO_STAGE`` / a DeepSpeed config file),
  default 2. Stage 3 is refused: G's update calls D's module directly, which needs D's
  full weights on every rank (stages 1 and 2 keep them; stage 3 shards them).
* ``mixed_precision=bf16`` uses DeepSpeed's ``torch_autocast`` mode: fp32 weights and fp32
  ZeRO master copy, forward under ``torch.autocast(bf16)`` exactly as the DDP path, and
  conv/linear gradients reduced in bf16. Weights stay fp32, so EMA, exports and the frozen
  stage-I generator inside stage II are unchanged. No loss scaling (bf16 has fp32's range).
* ``mixed_precision=fp16`` uses DeepSpeed's own fp16 mode, because its ``torch_autocast``
  mode scales losses only without ZeRO: fp16 weights and buffers in the engines (BatchNorm
  needs its statistics in the weights' dtype), an fp32 master copy in the ZeRO partitions,
  and **one dynamic loss scaler per engine**, so an overflow in D's step halves D's scale
  and skips D's step only, never G's. Inputs are cast to fp16 by the engines, and forwards
  outside them run under ``torch.autocast(fp16)`` (:meth:`DeepSpeedGAN.autocast`). The EMA
  keeps fp32 weights and exports are written in fp32 (``stackgan.export``); the frozen
  stage-I generator inside stage II is held in fp16 like the rest of G (autocast would round
  its convolution weights to fp16 anyway). fp16 needs an accelerator DeepSpeed supports fp16
  on (any CUDA GPU); elsewhere the run trains in fp32 and says so, as with DDP.
  :meth:`DeepSpeedGAN.amp_state` reports each engine's loss scale and skipped steps.
* The trainer's own per-step learning rate (StackGAN's halving schedule) is written into the
  engines' optimizer param groups; no DeepSpeed scheduler. Gradient accumulation is 1.
* Checkpoints: every rank writes its ZeRO partition with ``engine.save_checkpoint`` into a
  ``deepspeed/`` folder that becomes part of the trainer's atomic checkpoint folder
  (``deepspeed/{G,D}/``, plus DeepSpeed's ``zero_to_fp32.py``); rank 0's ``state.pt`` holds
  the full weights, EMA, step and config. Resume restores both engines (same world size).
* BatchNorm statistics stay per rank (DeepSpeed does not broadcast buffers); checkpoints and
  exports hold rank 0's, which is also what DDP's ``broadcast_buffers`` leaves on rank 0.
"""
from __future__ import annotations

import os
import socket
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint as ckpt
from ..amp import Update
from ..config import Config, ConfigError, process_batch
from .base import check_backend, slow_bf16_note

ENGINES_DIR = "deepspeed"  # inside a checkpoint folder: deepspeed/G, deepspeed/D
SUPPORTED_ZERO = (1, 2)
BUCKET_ELEMENTS = 25_000_000  # largest ZeRO bucket we pick (100 MB fp32; DDP's is 25 MB)
# fp16: dynamic loss scaling, per engine (DeepSpeed's defaults, as torch's GradScaler: 2^16,
# halve on overflow, double after 1000 clean steps); a DeepSpeed config file may set them
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}


def launched_with_deepspeed() -> bool:
    """True under ``accelerate launch`` with a DeepSpeed config (it sets this variable)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """Plain ``python`` (no launcher): a one-process rendezvous, else DeepSpeed looks for MPI."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo)
    try:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401  (accelerate's DeepSpeed plugin needs it)
    except ImportError as e:
        raise ConfigError(
            f"train.backend=deepspeed needs the deepspeed extra ({e}): "
            "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'"
        ) from None
    return deepspeed


def _fp16_supported() -> bool:
    """Whether DeepSpeed's accelerator (CUDA, or its CPU accelerator) trains in fp16."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def _enabled(section: dict | None) -> bool:
    return str((section or {}).get("enabled", False)).lower() == "true"


def _precision_sections(conf: dict, precision: str) -> None:
    """The engine's precision, the run's resolved one (a DeepSpeed config file may not disagree).

    bf16: DeepSpeed's torch_autocast (fp32 weights). fp16: DeepSpeed's fp16 mode with dynamic
    loss scaling, inputs cast by the engine, and BatchNorm statistics in fp16 like the weights
    (mixed fp16 weights / fp32 statistics are refused by batch_norm)."""
    for key in ("fp16", "bf16"):
        if _enabled(conf.get(key)) and key != precision:
            raise ConfigError(f"DeepSpeed config enables {key!r} but the run's precision is {precision}: set "
                              "it with train.mixed_precision or accelerate launch --mixed_precision")
    conf["torch_autocast"] = {"enabled": precision == "bf16", "dtype": "bfloat16"}
    conf["bf16"] = {"enabled": False}
    if precision != "fp16":
        conf["fp16"] = {"enabled": False}
        return
    fp16 = conf.setdefault("fp16", {})
    fp16.update(enabled=True, auto_cast=True)
    for key, value in FP16_LOSS_SCALING.items():
        if fp16.get(key, "auto") == "auto":
            fp16[key] = value
    conf.setdefault("data_types", {}).setdefault("buffer_dtype", "fp16")


def _plugin(cfg: Config, precision: str):
    """One network's DeepSpeed plugin: launcher settings plus what the trainer owns."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(gradient_accumulation_steps=1)  # stage/offload/config file: from the launcher
    conf = plugin.deepspeed_config
    for key in ("optimizer", "scheduler"):
        if key in conf:
            raise ConfigError(f"DeepSpeed config: remove the {key!r} section (the trainer builds Adam "
                              "and its learning-rate schedule from optim.*)")
    conf["train_micro_batch_size_per_gpu"] = process_batch(cfg.data, int(os.environ.get("WORLD_SIZE", "1")))
    conf["gradient_accumulation_steps"] = 1
    conf["gradient_clipping"] = float(cfg.optim.grad_clip)  # 0 = off (not accelerate's 'auto' = 1.0)
    _precision_sections(conf, precision)
    conf["steps_per_print"] = 2**62
    return plugin


def _fit_buckets(plugin, model: torch.nn.Module) -> None:
    """ZeRO's gradient / all-gather bucket sizes (elements), unless a DeepSpeed config file sets
    them: the network's trainable size, at most BUCKET_ELEMENTS. DeepSpeed's default (5e8
    elements, a 2 GB fp32 buffer per engine) is larger than any StackGAN network, and accelerate's
    'auto' needs a transformers ``model.config``."""
    zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = min(BUCKET_ELEMENTS, -(-numel // 1024) * 1024)  # ZeRO wants a multiple of its alignment
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key, "auto") == "auto":
            zero[key] = size


class DeepSpeedGAN:
    """The GAN backend over two DeepSpeed engines (see :class:`stackgan.backends.base.GANBackend`).

    ``prepare(G, D, opt_g, opt_d)`` returns the engines (``G``/``D``, callable like the
    modules) and accelerate's optimizer wrappers (their ``param_groups`` are the real ones,
    so the trainer's lr schedule applies; ``step``/``zero_grad`` are no-ops: use
    :meth:`update`). ``precision``: "no", "bf16" or "fp16" (resolved by the caller).
    """

    name = "deepspeed"
    keeps_channels_last = False  # DeepSpeed flattens weights as contiguous memory

    def __init__(self, cfg: Config, precision: str, *, precision_source: str = "config",
                 log_with: list | None = None, project_dir: str | None = None):
        if cfg.train.compile:
            raise ConfigError("train.compile=true is not supported with train.backend=deepspeed")
        _import_deepspeed()
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        use_cuda = torch.cuda.is_available()
        self.note, self.precision_source = slow_bf16_note(precision, not use_cuda), precision_source
        if precision == "fp16" and not _fp16_supported():
            self.note = ("mixed_precision=fp16 needs a GPU (DeepSpeed has no fp16 on this machine's "
                         "accelerator); this run has no GPU and runs in fp32")
            precision = "no"
        self.precision = precision
        if precision == "bf16":
            try:
                import deepspeed.runtime.torch_autocast  # noqa: F401
            except ImportError:
                raise ConfigError("train.backend=deepspeed with mixed_precision=bf16 needs a DeepSpeed with "
                                  "torch_autocast support (tested: 0.19.8)") from None
        _single_process_env()
        plugins = {"G": _plugin(cfg, precision), "D": _plugin(cfg, precision)}
        self.zero_stage = int(plugins["G"].zero_stage)
        if self.zero_stage not in SUPPORTED_ZERO:
            raise ConfigError(f"DeepSpeed ZeRO stage {self.zero_stage}: the GAN backend supports stages "
                              f"{SUPPORTED_ZERO} (stage 3 shards D's weights, which G's update reads whole)")
        handlers = [] if use_cuda else [InitProcessGroupKwargs(backend="gloo")]
        # mixed_precision="no" here: bf16 is DeepSpeed's torch_autocast (set in the plugins)
        self.acc_g = Accelerator(mixed_precision="no", deepspeed_plugins=plugins, kwargs_handlers=handlers,
                                 log_with=log_with, project_dir=project_dir)
        self.acc_d = Accelerator()  # shares acc_g's state and plugins; holds D's engine
        self.G = self.D = None

    # ---- the process group and the networks ----------------------------------------------
    @property
    def accelerator(self):
        return self.acc_g

    @property
    def device(self) -> torch.device:
        return self.acc_g.device

    @property
    def process_index(self) -> int:
        return self.acc_g.process_index

    @property
    def num_processes(self) -> int:
        return self.acc_g.num_processes

    @property
    def is_main_process(self) -> bool:
        return self.acc_g.is_main_process

    def wait_for_everyone(self) -> None:
        self.acc_g.wait_for_everyone()

    def unwrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.acc_g.unwrap_model(model)

    def autocast(self):
        """The run's autocast for forwards outside an engine (G's pass through D, sample grids).
        Under fp16 it is also what lets fp32 inputs meet the engines' fp16 weights."""
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return nullcontext()

    def prepare(self, G, D, opt_g, opt_d):
        # DeepSpeed broadcasts and flattens weights as plain contiguous memory: channels_last
        # weights are refused (and would not survive ZeRO's flattening anyway)
        G = G.to(memory_format=torch.contiguous_format)
        D = D.to(memory_format=torch.contiguous_format)
        self.acc_g.state.select_deepspeed_plugin("G")
        _fit_buckets(self.acc_g.state.deepspeed_plugin, G)
        G, opt_g = self.acc_g.prepare(G, opt_g)
        self.acc_d.state.select_deepspeed_plugin("D")
        _fit_buckets(self.acc_d.state.deepspeed_plugin, D)
        D, opt_d = self.acc_d.prepare(D, opt_d)
        self.G, self.D = G, D
        return G, D, opt_g, opt_d

    # ---- reports -----------------------------------------------------------------------
    def describe(self) -> str:
        """One log line with what the engines themselves report (after :meth:`prepare`)."""
        G = self.G
        clip = G.gradient_clipping()
        if G.fp16_enabled():
            mode = (f"fp16 (fp16 weights, fp32 master copy, dynamic loss scale per engine from "
                    f"{G.optimizer.loss_scale:g})")
        elif G.torch_autocast_enabled():
            mode = "bf16 (torch autocast, fp32 weights)"
        else:
            mode = "fp32"
        return (f"backend deepspeed: ZeRO-{G.zero_optimization_stage()}, one engine each for G and D, "
                f"gradient clipping {clip if clip > 0 else 'off'}, {mode}")

    def amp_state(self) -> dict[str, float]:
        """fp16: each engine's current loss scale and the steps it skipped so far (gradient
        overflow); empty otherwise. Host numbers the engines keep: reading them never waits
        for the device. Log them with the losses (``train.log_every``)."""
        if self.G is None or not self.G.fp16_enabled():
            return {}
        out = {}
        for tag, engine in (("g", self.G), ("d", self.D)):
            out[f"loss_scale_{tag}"] = float(engine.optimizer.loss_scale)
            out[f"skipped_steps_{tag}"] = int(engine.skipped_steps)
        return out

    def update(self, model, opt, loss: torch.Tensor, *, want_norm: bool = False) -> Update:
        """Backward, gradient reduction, clipping (from the engine's config: ``optim.grad_clip``),
        loss scaling and optimizer step of one engine (``model``; ``opt`` is the engine's own).
        The global gradient norm before clipping when ``want_norm``; skipped steps are counted
        by the engines (:meth:`amp_state`)."""
        model.backward(loss)
        model.step()
        if not want_norm:
            return Update(None, None)
        norm = model.get_global_grad_norm()
        return Update(None if norm is None else torch.as_tensor(float(norm)), None)

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Nothing of the optimizers in rank 0's state.pt: their ZeRO partitions are in the engines' files."""
        return {"backend": self.name, "opt_g": None, "opt_d": None, "scaler": None}

    def check_resume(self, state: dict, world_size: int, path: Path) -> None:
        """The same backend, and as many processes: ZeRO partitions are per rank."""
        check_backend(state, self.name, path)
        if state.get("world_size") != world_size:
            raise ckpt.CheckpointError(
                f"{path}: ZeRO optimizer state is sharded over {state.get('world_size')} processes; resume "
                f"with that many (this run has {world_size}), or start a new run folder from its weights")

    def save_checkpoint(self, run_dir: str | Path, step: int, state_fn: Callable[[], dict], extra_rng: dict,
                        *, keep_last: int, keep_every: int = 0) -> Path:
        """:func:`stackgan.checkpoint.save` with both engines' files inside the same atomic folder.

        Every rank writes its ZeRO partitions (``engine.save_checkpoint`` is collective) into
        the checkpoint's temporary folder, so the folder appears (by rename) with the
        engines in it or not at all.
        """
        def engines(tmp: Path) -> None:
            for tag, engine in (("G", self.G), ("D", self.D)):
                engine.save_checkpoint(str(tmp / ENGINES_DIR), tag=tag, save_latest=False)

        return ckpt.save(run_dir, step, state_fn, extra_rng, rank=self.process_index,
                         barrier=self.wait_for_everyone, keep_last=keep_last, keep_every=keep_every,
                         rank_files=engines)

    def load_checkpoint(self, path: Path, state: dict | None = None) -> None:
        """Restore both engines (weights, ZeRO optimizer partitions) from a checkpoint folder."""
        folder = Path(path) / ENGINES_DIR
        for tag, engine in (("G", self.G), ("D", self.D)):
            if not (folder / tag).is_dir():
                raise ckpt.CheckpointError(f"{path}: no {ENGINES_DIR}/{tag} "
                                           "(not written by the deepspeed backend)")
            loaded, _ = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
            if loaded is None:
                raise ckpt.CheckpointError(f"{folder / tag}: DeepSpeed could not load it")

