#!/usr/bin/env bash
# The README's test command: installs everything on a fresh machine, starts a real 2-node
# Slurm cluster on localhost (when run as root), runs the whole test suite, stops the cluster.
#   bash tests/run.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# DS_BUILD_OPS=0: DeepSpeed JIT-builds the few ops it needs (once, cached) instead of all at install
DS_BUILD_OPS=0 python3 -m pip install --quiet --disable-pip-version-check -e '.[dev,deepspeed,trackers]'

slurm_started=0
if [[ "${STACKGAN_SKIP_SLURM:-0}" != 1 && "$(id -u)" == 0 ]]; then
    bash tests/slurm/cluster.sh start
    slurm_started=1
    export STACKGAN_REQUIRE_SLURM="${STACKGAN_REQUIRE_SLURM:-1}"
fi
cleanup() { if [[ $slurm_started == 1 ]]; then bash tests/slurm/cluster.sh stop || true; fi; }
trap cleanup EXIT

python3 -m pytest "$@"
