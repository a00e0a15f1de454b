"""The Slurm distributed environment and the trainer's exit statuses, for Python and the shell.

torch's ``env://`` rendezvous needs MASTER_ADDR, MASTER_PORT and WORLD_SIZE shared by every task,
and RANK / LOCAL_RANK per task. The submitit jobs (:mod:`stackgan.cluster.jobs`) and the sbatch
scripts (``slurm/common.sh``, which evals ``python -m stackgan.cluster env``) take the port rule,
the world sizes and the exit statuses from here, so the two launch paths cannot drift apart.
"""
from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping

from ..errors import EXIT_CODES

PORT_BASE = PORT_SPAN = 20000  # default rendezvous port: 20000 + job id % 20000


def master_port(job_id: str | int, environ: Mapping[str, str] = os.environ) -> int:
    """``STACKGAN_MASTER_PORT`` if set, else one port per job id (two jobs sharing a node differ)."""
    if environ.get("STACKGAN_MASTER_PORT"):
        return int(environ["STACKGAN_MASTER_PORT"])
    digits = re.sub(r"\D", "", str(job_id)) or "0"  # array jobs: "123_4"
    return PORT_BASE + int(digits) % PORT_SPAN


def shell_assignments(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What ``slurm/common.sh`` exports: the exit statuses, and inside a job the shared
    rendezvous values Slurm's variables give (MASTER_ADDR comes from ``scontrol`` there)."""
    out = {f"STACKGAN_EXIT_{k.upper()}": str(v) for k, v in EXIT_CODES.items()}
    if environ.get("SLURM_JOB_ID"):
        out["MASTER_PORT"] = str(master_port(environ["SLURM_JOB_ID"], environ))
        out["WORLD_SIZE"] = environ.get("SLURM_NTASKS", "1")
        per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # "2(x3)" -> "2"
        if per_node:
            out["LOCAL_WORLD_SIZE"] = per_node
    return out


def shell_text(environ: Mapping[str, str] = os.environ) -> str:
    """:func:`shell_assignments` as ``export`` lines for ``eval``."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in shell_assignments(environ).items())
