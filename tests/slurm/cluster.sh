#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine, for the project's Slurm tests (CI and developers).
#
#   bash tests/slurm/cluster.sh start    install what is missing, write the config, start, wait idle
#   bash tests/slurm/cluster.sh stop     stop exactly the daemons started here (by recorded PID)
#   bash tests/slurm/cluster.sh status   daemons and nodes
#   eval "$(bash tests/slurm/cluster.sh env)"   SLURM_CONF for this shell (only needed when
#                                        /etc/slurm/slurm.conf belongs to another cluster)
#
# Target: Debian 12, root, no systemd. Debian's Slurm 22.05 runs several slurmd on one host, so
# node1 and node2 are two slurmd on 127.0.0.1 (ports 17001, 17002). Accounting (slurmdbd on a
# socket-only MariaDB) is on because submitit reads job states from sacct. Each node advertises
# fake GPUs (char devices aliasing /dev/null) so that scripts asking for --gpus-per-node are
# scheduled as on a GPU cluster; the jobs themselves run on the CPU.
#
# Everything this script writes lives in one folder, $STACKGAN_SLURM_HOME (default
# /var/lib/stackgan-slurm): etc/ (slurm.conf, gres.conf, slurmdbd.conf), state/, spool/, log/,
# run/ (PID files). Outside it: /etc/hosts gets one tagged line (node1 node2 -> 127.0.0.1, which
# torch's rendezvous needs), /etc/slurm/slurm.conf becomes a link to our config if no other
# cluster's config is there, and the munge key / MariaDB data dir are the packages' defaults.
# Idempotent: a second `start` installs nothing, rewrites only a changed config (restarting the
# Slurm daemons then), and starts only daemons that are not running.
set -euo pipefail

ACTION="${1:-start}"
HOME_DIR="${STACKGAN_SLURM_HOME:-/var/lib/stackgan-slurm}"
NODES=2
GPUS_PER_NODE="${STACKGAN_SLURM_FAKE_GPUS:-2}"
WAIT_S="${STACKGAN_SLURM_WAIT_S:-120}"
FIRST_PORT=17001
DB_PASS=stackgan-ci            # MariaDB runs with --skip-networking: reachable only by local root
TAG="# stackgan-slurm"

ETC=$HOME_DIR/etc
RUN=$HOME_DIR/run
LOG=$HOME_DIR/log
export SLURM_CONF=$ETC/slurm.conf

say() { printf '[cluster.sh %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { say "ERROR: $*" >&2; exit 1; }

# running PIDFILE NAME: the PID recorded in PIDFILE is alive and is the program NAME
running() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(<"$1")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$2" ]]
}

# halt PIDFILE:NAME...: TERM each recorded PID that still runs NAME, wait (KILL after 10 s), forget
halt() {
  local spec pids=() pid i
  for spec in "$@"; do
    if running "${spec%%:*}" "${spec##*:}"; then
      pid=$(<"${spec%%:*}")
      say "stopping ${spec##*:} (pid $pid)"
      kill "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
    rm -f "${spec%%:*}"
  done
  for pid in "${pids[@]}"; do
    for i in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    [[ -d /proc/$pid ]] && { say "pid $pid ignores TERM, killing"; kill -9 "$pid" 2>/dev/null || true; }
  done
  return 0
}

nodes() { local i; for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; }

stop_slurm() {
  local n specs=()
  for n in $(nodes); do specs+=("$RUN/slurmd-$n.pid:slurmd"); done
  halt "${specs[@]}" "$RUN/slurmctld.pid:slurmctld"
}

stop_all() {
  stop_slurm
  halt "$RUN/slurmdbd.pid:slurmdbd"
  halt "$RUN/mariadbd.pid:mariadbd" "$RUN/munged.pid:munged"
}

show_status() {
  local pf
  for pf in "$RUN"/*.pid; do
    [[ -e $pf ]] || continue
    local name; name=$(basename "$pf" .pid)
    if running "$pf" "${name%%-*}"; then echo "$name: pid $(<"$pf")"; else echo "$name: not running"; fi
  done
  sinfo -N -o '%N %T %c %G' 2>/dev/null || echo "slurmctld not answering"
}

case "$ACTION" in
  stop) stop_all; exit 0 ;;
  status) show_status; exit 0 ;;
  env) echo "export SLURM_CONF=$SLURM_CONF"; exit 0 ;;
  start) ;;
  *) die "usage: $0 start|stop|status|env" ;;
esac

[[ $(id -u) == 0 ]] || die "needs root (installs packages, starts daemons); run the other tests with -m 'not slurm'"
T0=$SECONDS

# ------------------------------------------------------------------------------------------ packages
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server mariadb-client)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  # keep the packages' maintainer scripts from starting daemons: this script starts them itself
  policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  ((policy)) && rm -f /usr/sbin/policy-rc.d
  say "installed in $((SECONDS - T0)) s"
fi

# ------------------------------------------------------------------------------------------ config
install -d -m 755 "$ETC" "$RUN" "$HOME_DIR/gpu"
install -d -o slurm -g slurm -m 755 "$LOG" "$HOME_DIR/state"
for n in $(nodes); do install -d -m 755 "$HOME_DIR/spool/$n"; done
for ((g = 0; g < GPUS_PER_NODE; g++)); do
  [[ -c $HOME_DIR/gpu/nvidia$g ]] || mknod -m 666 "$HOME_DIR/gpu/nvidia$g" c 1 3
done

HOST=$(hostname -s)
HW=$(slurmd -C | head -1)   # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ... RealMemory=24105"
hw() { sed -nE "s/.*[[:space:]]$1=([0-9]+).*/\1/p" <<<"$HW"; }
CPUS=$(hw CPUs) MEM=$(hw RealMemory)
GRES=""; ((GPUS_PER_NODE > 0)) && GRES=" Gres=gpu:$GPUS_PER_NODE"

NEW=$(mktemp -d)
trap 'rm -rf "$NEW"' EXIT
cat >"$NEW/slurm.conf" <<EOF
# written by tests/slurm/cluster.sh -- a two-node test cluster on 127.0.0.1
ClusterName=stackgan-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6817
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again once its old credential expired (default 120 s)
AuthInfo=cred_expire=10
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobRequeue=1
ReturnToService=2
KillWait=10
InactiveLimit=0
MinJobAge=600
MailProg=/bin/true
StateSaveLocation=$HOME_DIR/state
SlurmdSpoolDir=$HOME_DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
GresTypes=gpu
EOF
i=0
for n in $(nodes); do
  echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((FIRST_PORT + i)) CPUs=$CPUS RealMemory=$((MEM / (NODES + 1)))$GRES State=UNKNOWN" >>"$NEW/slurm.conf"
  i=$((i + 1))
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$NEW/slurm.conf"
{
  echo "AutoDetect=off"
  ((GPUS_PER_NODE > 0)) && echo "Name=gpu File=$HOME_DIR/gpu/nvidia[0-$((GPUS_PER_NODE - 1))]"
} >"$NEW/gres.conf"
cat >"$NEW/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=stackgan_slurm_acct
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
EOF

changed=0
for f in slurm.conf gres.conf; do
  cmp -s "$NEW/$f" "$ETC/$f" || { install -m 644 "$NEW/$f" "$ETC/$f"; changed=1; }
done
cmp -s "$NEW/slurmdbd.conf" "$ETC/slurmdbd.conf" || install -m 600 -o slurm -g slurm "$NEW/slurmdbd.conf" "$ETC/slurmdbd.conf"

# plain `sbatch` finds the cluster without SLURM_CONF, unless another cluster's config is there
mkdir -p /etc/slurm
if [[ ! -e /etc/slurm/slurm.conf || $(readlink /etc/slurm/slurm.conf) == "$ETC/slurm.conf" ]]; then
  ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
else
  say "note: /etc/slurm/slurm.conf belongs to another cluster; use: eval \"\$(bash $0 env)\""
fi

# node names resolve to this host (torch's MASTER_ADDR is the first node's name)
hosts_line="127.0.0.1 $(nodes | paste -sd' ') $TAG"
if ! grep -qxF "$hosts_line" /etc/hosts; then
  grep -vF "$TAG" /etc/hosts >"$NEW/hosts" || true
  echo "$hosts_line" >>"$NEW/hosts"
  cat "$NEW/hosts" >/etc/hosts   # in place: /etc/hosts may be a bind mount
fi

# ------------------------------------------------------------------------------------------ munge
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  for i in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$RUN/munged.pid"
fi
for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munge does not work"

# ------------------------------------------------------------------------------------------ accounting
install -d -o mysql -g mysql /run/mysqld "$HOME_DIR/mariadb"   # mariadbd writes its PID and log as mysql
if ! mysqladmin ping >/dev/null 2>&1; then
  say "starting mariadbd (unix socket only)"
  setsid /usr/sbin/mariadbd --user=mysql --skip-networking --pid-file="$HOME_DIR/mariadb/mariadbd.pid" \
    --log-error="$HOME_DIR/mariadb/error.log" </dev/null >/dev/null 2>&1 &
  for i in $(seq 150); do mysqladmin ping >/dev/null 2>&1 && break; sleep 0.2; done
  mysqladmin ping >/dev/null 2>&1 || die "mariadbd did not start (see $HOME_DIR/mariadb/error.log)"
  cp "$HOME_DIR/mariadb/mariadbd.pid" "$RUN/mariadbd.pid"
fi
mysql -e "CREATE DATABASE IF NOT EXISTS stackgan_slurm_acct;
          CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
          GRANT ALL ON stackgan_slurm_acct.* TO 'slurm'@'localhost';"
if ! running "$RUN/slurmdbd.pid" slurmdbd; then
  say "starting slurmdbd"
  /usr/sbin/slurmdbd
fi
for i in $(seq 150); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd not answering (see $LOG/slurmdbd.log)"

# ------------------------------------------------------------------------------------------ slurm
((changed)) && stop_slurm
if ! running "$RUN/slurmctld.pid" slurmctld; then
  say "starting slurmctld"
  /usr/sbin/slurmctld
fi
for i in $(seq 150); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping | grep -q UP || die "slurmctld not answering (see $LOG/slurmctld.log)"
for n in $(nodes); do
  if ! running "$RUN/slurmd-$n.pid" slurmd; then
    say "starting slurmd -N $n"
    /usr/sbin/slurmd -N "$n"
  fi
done

deadline=$((SECONDS + WAIT_S))
while :; do
  states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
  ready=$(awk '$2 ~ /^(idle|mixed|allocated|completing)$/' <<<"$states" | wc -l)
  ((ready >= NODES)) && break
  # nodes left down or drained by an earlier run: bring them back
  bad=$(awk '$2 ~ /^(down|drained|draining|inval)/ {print $1}' <<<"$states" | paste -sd, -)
  [[ -n $bad ]] && scontrol update nodename="$bad" state=resume 2>/dev/null || true
  ((SECONDS > deadline)) && { sinfo -N -l; sinfo -R; die "nodes not ready after ${WAIT_S} s (see $LOG)"; }
  sleep 0.5
done
sinfo -N -o '%N %T %c %G'
say "cluster ready in $((SECONDS - T0)) s (config: $ETC, logs: $LOG)"
