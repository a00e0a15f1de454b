"""An installed copy works away from the checkout: ``pip install .`` (not editable) into a fresh
virtual environment, then, in an empty folder, prepare the embedded set and train a few steps
from a config named the way the docs name it (``--config configs/birds_stage1.yaml``).

The environment reuses the installed torch, pip, setuptools etc. (``--system-site-packages``,
``--no-deps``), so only the package itself is built; the test checks that the copy it runs is the
installed one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_train import TINY, log_records

pytestmark = pytest.mark.slow

TOP_SKIP = {".git", "runs", "data", "build", "dist", "tests"}  # history, outputs, build leftovers


def _skip(folder: str, names: list[str]) -> set[str]:
    """What copytree leaves out: the top-level outputs, prepared shards, caches."""
    top = Path(folder) == ROOT
    shards = Path(folder) == ROOT / "shards"
    return {n for n in names if (top and n in TOP_SKIP) or n == "__pycache__" or n.endswith(".egg-info")
            or (shards and (Path(folder) / n).is_dir())}


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A venv holding a non-editable install of this working tree; its bin folder and environment."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_skip)
    venv = base / "venv"
    # without its own pip: the installed pip and setuptools build it (a venv's seeded ones can be too old)
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], base,
         dict(os.environ))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", TOKENIZERS_PARALLELISM="false")
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
          "--no-build-isolation", "--disable-pip-version-check", str(src)], base, env)
    return venv / "bin", env


def test_installed_copy_prepares_and_trains_from_an_empty_folder(installed, tmp_path):
    bin_dir, env = installed
    work = tmp_path / "empty"
    work.mkdir()
    py = str(bin_dir / "python")
    where = _run([py, "-c", "import stackgan; print(stackgan.__file__)"], work, env).stdout.strip()
    assert "site-packages" in where and str(ROOT) not in where, where  # the installed copy, not the checkout
    _run([str(bin_dir / "stackgan-prepare"), "--embedded", "--species", "4", "--images-per-species", "6",
          "--shard-size", "8", "--workers", "1", "--quiet"], work, env)
    assert (work / "shards" / "birds-embedded" / "metadata.json").is_file()
    _run([py, "-m", "stackgan.train", "--config", "configs/birds_stage1.yaml", "train.steps=3",
          "train.run_dir=runs/s1", *TINY], work, env)
    run = work / "runs" / "s1"
    assert (run / "COMPLETE").is_file() and (run / "export" / "generator.safetensors").is_file()
    assert [r["step"] for r in log_records(run) if "loss_d" in r][-1] == 3


def test_installed_copy_ships_every_config(installed, tmp_path):
    """Each YAML under configs/ resolves, by its documented name, to the installed copy's file."""
    bin_dir, env = installed
    names = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
    code = ("import sys; from stackgan.files import config_path\n"
            "for n in sys.argv[1:]: print(config_path(n).resolve())")
    found = _run([str(bin_dir / "python"), "-c", code, *names], tmp_path, env).stdout.split()
    assert len(found) == len(names)
    for name, path in zip(names, found):
        assert "site-packages" in path and Path(path).read_text() == (ROOT / name).read_text(), (name, path)
