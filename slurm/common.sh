# Shared by slurm/*.sh (sourced, not run). The #SBATCH defaults live at the top of each script;
# what is common to all of them lives here: finding the project, the software environment
# (slurm/site.sh), the distributed environment for one task per process, and requeue on the
# trainer's checkpoint-and-exit status.
#
# Environment knobs (all optional; sbatch passes your environment to the job):
#   STACKGAN_ROOT          project checkout (default: the folder sbatch was run from)
#   STACKGAN_SITE          shell file sourced first: modules, conda, cache paths
#                          (default: $STACKGAN_ROOT/slurm/site.sh when it exists)
#   STACKGAN_PYTHON        python to run (default: python3 on the PATH after the site file)
#   STACKGAN_MAX_REQUEUES  give up after this many restarts of one job (default 100)
#   STACKGAN_SRUN_WAIT     seconds the other tasks get after the first one ends (default 300)
#   STACKGAN_MASTER_PORT   rendezvous port (default: 20000 + job id % 20000)
#   STACKGAN_ALLOW_INCOMPLETE_STAGE1=1  stage II may start from a stage I that did not reach its
#                          planned steps (stopped by train.time_limit_min); refused otherwise

# Trainer exit statuses (STACKGAN_EXIT_*) and the rendezvous port and world sizes come from
# stackgan/errors.py and stackgan/cluster/env.py (`python -m stackgan.cluster env`, in stackgan_setup);
# until Python is found, stackgan_die exits 2 (EXIT_BAD_INPUT).

stackgan_log() { printf '[%s %(%F %T)T] %s\n' "${SLURM_JOB_NAME:-stackgan}" -1 "$*"; }
stackgan_die() { stackgan_log "ERROR: $*" >&2; exit "${STACKGAN_EXIT_BAD_INPUT:-2}"; }

# stackgan_setup: environment + working directory; call first.
stackgan_setup() {
  [[ -n ${SLURM_JOB_ID:-} ]] || stackgan_die "not inside a Slurm job: submit with sbatch $0"
  cd "$STACKGAN_ROOT" || stackgan_die "cannot cd to STACKGAN_ROOT=$STACKGAN_ROOT"
  local site="${STACKGAN_SITE:-$STACKGAN_ROOT/slurm/site.sh}"
  if [[ -f $site ]]; then
    stackgan_log "sourcing $site"
    # shellcheck disable=SC1090
    source "$site" || stackgan_die "$site failed"
  elif [[ -n ${STACKGAN_SITE:-} ]]; then
    stackgan_die "STACKGAN_SITE=$STACKGAN_SITE does not exist"
  fi
  PYTHON="${STACKGAN_PYTHON:-python3}"
  command -v "$PYTHON" >/dev/null || stackgan_die "no $PYTHON on PATH (set it up in slurm/site.sh)"
  local shared
  shared=$("$PYTHON" -m stackgan.cluster env) || stackgan_die "$PYTHON cannot run stackgan (set it up in slurm/site.sh)"
  eval "$shared"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  stackgan_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}," \
    "${SLURM_NTASKS:-1} task(s), cwd $PWD, $("$PYTHON" -c 'import sys; print(sys.executable)')"
}

# stackgan_resolve CONFIG OVERRIDES...: check the config before any rank starts (exit 2 with the
# reason if it is wrong) and set RUN_DIR, STAGE, STAGE1_EXPORT from the resolved values.
stackgan_resolve() {
  local out
  out=$("$PYTHON" -m stackgan.cluster resolve --config "$@") || exit "$STACKGAN_EXIT_BAD_INPUT"
  eval "$out"
  mkdir -p "$RUN_DIR" || stackgan_die "cannot create run folder $RUN_DIR"
}

# stackgan_dist_env: what torch's env:// rendezvous needs, shared by all tasks; RANK and
# LOCAL_RANK differ per task and are set inside each task (see stackgan_srun).
stackgan_dist_env() {
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR  # MASTER_PORT, WORLD_SIZE, LOCAL_WORLD_SIZE: exported by stackgan_setup
  if [[ -n ${SLURM_GPUS_ON_NODE:-} && -n ${LOCAL_WORLD_SIZE:-} && $SLURM_GPUS_ON_NODE != "$LOCAL_WORLD_SIZE" ]]; then
    stackgan_log "WARNING: $SLURM_GPUS_ON_NODE GPU(s) per node but $LOCAL_WORLD_SIZE task(s) per node; " \
      "one task per GPU is intended (--ntasks-per-node = --gpus-per-node)"
  fi
  stackgan_log "rendezvous $MASTER_ADDR:$MASTER_PORT, world size $WORLD_SIZE"
}

# stackgan_history MESSAGE: one line per event in <run_dir>/slurm-history.log, so a run folder
# tells which jobs, restarts and log files produced it.
stackgan_history() {
  printf '%(%F %T)T job=%s restart=%s nodes=%s tasks=%s log=%s %s\n' -1 "$SLURM_JOB_ID" \
    "${SLURM_RESTART_COUNT:-0}" "${SLURM_JOB_NODELIST:-?}" "${SLURM_NTASKS:-1}" \
    "$(stackgan_log_path)" "$*" >>"$RUN_DIR/slurm-history.log"
}

# stackgan_log_path: the job's stdout file (absolute), as Slurm resolved --output
stackgan_log_path() {
  scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p' | head -n 1
}

# stackgan_srun CMD...: one task per process; each task gets RANK/LOCAL_RANK from Slurm and
# execs CMD, so Slurm's signals reach the trainer itself and srun returns its exit status.
# Where Slurm binds one GPU per task (--gpus-per-task=1, --gpu-bind=single:1), the task sees a
# single device, cuda:0, whatever its local rank: LOCAL_RANK is then 0 (Accelerate picks
# cuda:LOCAL_RANK); LOCAL_WORLD_SIZE still says how many processes share the node's CPUs.
# The batch shell survives SIGTERM (preemption, scontrol requeue) until srun returns, so the
# trainers can finish their checkpoint before the job ends; a stop signal sent to the batch shell
# alone (--signal=B:USR1@300, scancel --batch --signal=...) is passed on to the trainers by srun.
stackgan_srun() {
  local rc
  STACKGAN_SRUN_PID='' STACKGAN_PENDING_SIGNAL=''
  trap 'stackgan_forward TERM' TERM
  trap 'stackgan_forward USR1' USR1
  trap 'stackgan_forward USR2' USR2
  srun --kill-on-bad-exit=0 --wait="${STACKGAN_SRUN_WAIT:-300}" \
    bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID NODE_RANK=$SLURM_NODEID
             if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$CUDA_VISIBLE_DEVICES" != *,* ]]; then export LOCAL_RANK=0; fi
             exec "$@"' \
    stackgan-task "$@" &
  STACKGAN_SRUN_PID=$!
  [[ -n $STACKGAN_PENDING_SIGNAL ]] && stackgan_forward "$STACKGAN_PENDING_SIGNAL"
  while kill -0 "$STACKGAN_SRUN_PID" 2>/dev/null; do wait "$STACKGAN_SRUN_PID"; done
  wait "$STACKGAN_SRUN_PID"
  rc=$?
  trap - TERM USR1 USR2
  return "$rc"
}

# stackgan_forward SIG: the batch shell's trap: srun passes SIG on to every task (the trainers
# checkpoint and exit 3); when the whole job was signalled they already have it, and a second
# one changes nothing.
stackgan_forward() {
  if [[ -z ${STACKGAN_SRUN_PID:-} ]]; then STACKGAN_PENDING_SIGNAL=$1; return; fi
  stackgan_log "batch shell got SIG$1: passing it to the trainers, waiting for their checkpoint"
  kill -s "$1" "$STACKGAN_SRUN_PID" 2>/dev/null || true
}

# stackgan_train_step CONFIG OVERRIDES...: the whole stage: resolve, launch, act on the status.
stackgan_train_step() {
  local config=$1 rc state
  shift
  stackgan_resolve "$config" "$@"
  stackgan_dist_env
  stackgan_history "start stage $STAGE config=$config overrides=[$*]"
  stackgan_log "stage $STAGE, run folder $RUN_DIR"
  stackgan_srun "$PYTHON" -m stackgan.train --config "$config" --resume auto "train.run_dir=$RUN_DIR" "$@"
  rc=$?
  case $rc in
    "$STACKGAN_EXIT_OK")
      if [[ -f $RUN_DIR/COMPLETE ]]; then
        stackgan_history "finished"
        stackgan_log "finished: $RUN_DIR (export: $RUN_DIR/export/generator.safetensors)"
        return 0
      fi
      if [[ -f $RUN_DIR/TIME_LIMIT ]]; then  # train.time_limit_min: this launch's budget is spent
        stackgan_history "stopped by train.time_limit_min, not complete: $(<"$RUN_DIR/TIME_LIMIT")"
        stackgan_log "stopped by train.time_limit_min before the planned steps: $RUN_DIR is not complete" \
          "(resubmit to continue; stage II refuses it unless STACKGAN_ALLOW_INCOMPLETE_STAGE1=1)"
        return 0
      fi
      stackgan_history "exit 0 without COMPLETE"
      stackgan_log "ERROR: trainer exited 0 but $RUN_DIR/COMPLETE is missing"
      return 1 ;;
    "$STACKGAN_EXIT_REQUEUE")
      if ((${SLURM_RESTART_COUNT:-0} >= ${STACKGAN_MAX_REQUEUES:-100})); then
        stackgan_history "checkpointed; not requeued (STACKGAN_MAX_REQUEUES=${STACKGAN_MAX_REQUEUES:-100} reached)"
        stackgan_log "checkpoint saved; restart limit reached, resubmit to continue"
        return "$rc"
      fi
      state=$(squeue -h -j "$SLURM_JOB_ID" -o %T 2>/dev/null)
      if [[ $state != RUNNING ]]; then  # preemption, scontrol requeue, scancel: Slurm decides
        stackgan_history "checkpointed; job is $state (ended or requeued by Slurm)"
        stackgan_log "checkpoint saved; Slurm is ending this job ($state); it resumes from $RUN_DIR if requeued"
        return "$rc"
      fi
      stackgan_history "checkpointed; requeue"
      stackgan_log "checkpoint saved; requeueing job $SLURM_JOB_ID (resumes from $RUN_DIR)"
      scontrol requeue "$SLURM_JOB_ID" || { stackgan_log "ERROR: scontrol requeue failed"; return "$rc"; }
      return 0 ;;
    *)
      stackgan_history "failed with status $rc"
      case $rc in
        "$STACKGAN_EXIT_BAD_INPUT") stackgan_log "ERROR: bad config or input (status 2), not requeued" ;;
        "$STACKGAN_EXIT_NONFINITE") stackgan_log "ERROR: NaN/Inf loss (status 4); last good checkpoint kept" ;;
        *) stackgan_log "ERROR: training failed with status $rc" ;;
      esac
      return "$rc" ;;
  esac
}
