"""Training checkpoints: complete, atomic, newest-complete-wins.

Layout (``<run_dir>/checkpoints``)::

    step-00001000/state.pt        models, EMA, optimisers, scaler, step, config (rank 0)
    step-00001000/rng-rank0.pt    RNG states of every rank (one file each)
    step-00001000/meta.json       written last inside the folder
    .tmp-step-00001000/           a checkpoint being written; renamed when complete

A folder named ``step-*`` only ever appears by an atomic rename of a finished temp folder,
so a kill at any moment leaves either the previous set of checkpoints or the new one.
All ranks must call :func:`save` (each writes its RNG file); the run folder must be on a
filesystem every rank sees (the usual shared cluster filesystem).

Tensors are written from host memory (a GPU run's checkpoint loads on a machine without the
GPU), and each rank keeps the CUDA RNG state of its own device only: ranks of a Slurm job
may see one GPU each or all of the node's, and a requeue may land on either layout.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import StackGANError

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(StackGANError, RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    done = list_complete(run_dir)
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    """This process's global RNG states; for CUDA the current device's (the rank's GPU)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = _own_cuda_state(state.get("cuda"))
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def _own_cuda_state(saved: torch.Tensor | list | None) -> torch.Tensor | None:
    """The current device's CUDA RNG state from a checkpoint: one state (this format) or, from
    older checkpoints, the list of every visible device's, indexed by the current device."""
    if saved is None or torch.is_tensor(saved):
        return saved
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    return saved[index] if index < len(saved) else None


def to_host(obj: Any) -> Any:
    """``obj`` with every tensor (in dicts, lists, tuples) copied to host memory."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_host(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state_dict's per-layer versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_host(v) for v in obj)
    return obj


def save(run_dir: str | Path, step: int, state_fn: Callable[[], dict], extra_rng: dict, *,
         rank: int, barrier: Callable[[], None], keep_last: int, keep_every: int = 0,
         rank_files: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` collectively; returns its final folder.

    ``state_fn`` is called on rank 0 only (it gathers the model/optimizer state);
    ``extra_rng`` holds per-rank generator states beyond the global ones; ``rank_files``
    (called on every rank with the temp folder) writes per-rank shards, e.g. DeepSpeed's
    ZeRO optimizer partitions, so they are committed by the same rename. Afterwards older
    checkpoints are removed as :func:`prune` says.
    """
    root = ckpt_root(run_dir)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    torch.save({**rng_state(), "extra": extra_rng}, tmp / f"rng-rank{rank}.pt")
    if rank_files is not None:
        rank_files(tmp)
    barrier()
    if rank == 0:
        torch.save(to_host(state_fn()), tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time()}))
        if final.exists():  # a rerun of the same step (e.g. after a crash right after saving)
            shutil.rmtree(final)
        tmp.rename(final)
        prune(run_dir, keep_last, keep_every)
    barrier()
    return final


def step_of(path: Path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise CheckpointError(f"{path}: not a checkpoint folder (step-NNNNNNNN)")
    return int(m.group(1))


def prune(run_dir: str | Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Remove complete checkpoints except the newest ``keep_last`` and the milestones (steps
    that are multiples of ``keep_every`` > 0); returns what was removed."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    older = list_complete(run_dir)[:-keep_last]
    gone = [p for p in older if not (keep_every > 0 and step_of(p) % keep_every == 0)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def resolve(run_dir: str | Path, resume: str) -> Path | None:
    """``auto`` (or ``force``) -> newest complete checkpoint (or None); ``none`` -> None; else a path."""
    if resume in ("", "none", "no"):
        return None
    if resume in ("auto", "force"):
        return latest(run_dir)
    p = Path(resume)
    if p.is_dir() and (p / "state.pt").is_file() and (p / "meta.json").is_file():
        return p
    if p.is_dir() and latest(p) is not None:  # a run folder was given
        return latest(p)
    raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (needs state.pt and meta.json)")


def load(path: Path, rank: int) -> tuple[dict, dict | None]:
    """Load the shared state and this rank's RNG file (None if the world size changed)."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}/state.pt: cannot be read ({e})") from e
    rng_file = path / f"rng-rank{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    return state, rng
