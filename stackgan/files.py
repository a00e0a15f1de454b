"""Where files go and where they come from: atomic writes, and the configs shipped with the package.

Every file another process may read while it is written (metadata, exports, PNG grids, JSON
reports) goes through :func:`atomic_path`: written under a temp name beside it (``.NAME.PID.tmp``,
which ``stackgan.data.prepare`` sweeps up after a kill) and renamed over it, so a reader sees
the old file or the new one, never half of one.

The YAML configs in the repository's ``configs/`` are installed with the package
(``stackgan/configs`` links to them, setup.cfg ships them as package data), so
:func:`config_path` finds ``configs/birds_stage1.yaml`` from any folder, in a checkout or an
installed copy alike.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp name beside ``path``; when the block succeeds, rename it over ``path``.

    ``suffix`` ends the temp name, for writers that add one when it is missing (``np.save``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the block failed


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to ``path`` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)


def atomic_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent))


def config_path(name: str | Path) -> Path:
    """The config file ``name`` means: an existing path wins; else a config shipped with the package,
    named as the docs name it (``configs/birds_stage1.yaml``, ``configs/accelerate/cpu_2proc.yaml``)
    or by its stem (``birds_stage1``). A name found nowhere comes back unchanged, for the caller's
    error to name."""
    p = Path(name)
    if p.is_file() or p.is_absolute():
        return p
    parts = p.parts[1:] if p.parts[:1] == ("configs",) else p.parts
    if not parts:
        return p
    named = SHIPPED_CONFIGS.joinpath(*parts)
    for cand in (named, named.with_name(named.name + ".yaml")):
        if cand.is_file():
            return cand
    return p
