#!/bin/bash
# StackGAN stage I on Slurm: one task per GPU, every task runs the trainer directly.
#
#   sbatch slurm/stage1.sh [--config FILE] [key=value ...]        (run from the project folder)
#
# Default config: configs/birds_stage1.yaml (the embedded set); the full run uses
# --config configs/cub_stage1.yaml (the StackGAN-Pytorch network; the paper's TF birds network:
# configs/cub_tf_stage1.yaml). key=value are trainer overrides (train.run_dir=...,
# data.shards=..., optim.lr_g=...). Logs: slurm/logs/<job name>-<job id>.out; outputs in the
# run folder (train.run_dir), which also gets slurm-history.log (one line per start/requeue/end).
# On a time-limit warning (USR1, 5 min before the end), preemption or `scontrol requeue` the
# trainers save a checkpoint and the job is requeued; it resumes from the run folder.
# See docs/clusters.md to adapt the defaults below (or override any of them: sbatch --time=...).
#
# ---- edit these for your cluster (keep --ntasks-per-node equal to --gpus-per-node) ----------
#SBATCH --job-name=stackgan-s1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=myproject
##SBATCH --mem=0
# ---------------------------------------------------------------------------------------------
STACKGAN_ROOT="${STACKGAN_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"
# shellcheck source=slurm/common.sh
source "$STACKGAN_ROOT/slurm/common.sh" || { echo "no slurm/common.sh in $STACKGAN_ROOT: run sbatch from the project folder or set STACKGAN_ROOT" >&2; exit 2; }

CONFIG=configs/birds_stage1.yaml
if [[ ${1:-} == --config ]]; then CONFIG=$2; shift 2; fi
stackgan_setup
stackgan_train_step "$CONFIG" "$@"
