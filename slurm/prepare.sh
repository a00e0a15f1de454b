#!/bin/bash
# Shard preparation on Slurm: one CPU task runs shards/prepare.py once (before stage I).
#
#   sbatch slurm/prepare.sh [shards/prepare.py arguments]          (run from the project folder)
#   sbatch slurm/prepare.sh --cub-root /data/CUB_200_2011 --birds-root /data/birds --out shards/cub
#   sbatch slurm/prepare.sh                                         (the embedded bird set)
#
# --workers defaults to the job's CPUs. Safe to resubmit: finished shards are kept and a rerun
# with the same inputs does nothing. Log: slurm/logs/<job name>-<job id>.out.
#
# ---- edit these for your cluster -------------------------------------------------------------
#SBATCH --job-name=stackgan-prep
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
##SBATCH --partition=cpu
##SBATCH --account=myproject
# ---------------------------------------------------------------------------------------------
STACKGAN_ROOT="${STACKGAN_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"
# shellcheck source=slurm/common.sh
source "$STACKGAN_ROOT/slurm/common.sh" || { echo "no slurm/common.sh in $STACKGAN_ROOT: run sbatch from the project folder or set STACKGAN_ROOT" >&2; exit 2; }

stackgan_setup
args=("$@")
[[ " $* " == *" --workers "* ]] || args+=(--workers "${SLURM_CPUS_PER_TASK:-1}")
stackgan_log "python shards/prepare.py ${args[*]}"
srun --ntasks=1 "$PYTHON" shards/prepare.py "${args[@]}"
rc=$?
((rc == 0)) && stackgan_log "shards ready" || stackgan_log "ERROR: shards/prepare.py failed with status $rc"
exit "$rc"
