#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for trying the cluster path on a workstation and for the tests:
# munge, accounting (slurmdbd + MariaDB on loopback), slurmctld and slurmd, 8 fake GPUs (a gres on char devices, so
# that `--gpus=1` jobs schedule), the fast-requeue settings, and more declared CPUs than the machine has, so that 8
# array tasks run at once.
#
#   slurm/local-cluster/start.sh        # idempotent: installs what is missing, starts what is not running
#   export SLURM_CONF=$STATE/etc/slurm.conf   # printed at the end; sbatch, squeue, sacct and submitit need it
#   slurm/local-cluster/stop.sh         # stops the daemons this script started (by pid file)
#
# Settings (environment): SAEPIPE_SLURM_STATE (state directory, default /tmp/saepipe-slurm), SAEPIPE_SLURM_CPUS
# (declared CPUs, default 16), SAEPIPE_SLURM_GPUS (fake GPUs, default 8), SAEPIPE_SLURM_PORT (slurmctld port, default
# 6817; slurmd, slurmdbd and MariaDB use the next three). Needs root (the daemons run as root, SlurmUser=root).
# slurmctld and slurmd listen on all interfaces (Slurm has no option to bind them to loopback); MariaDB and slurmdbd
# listen on 127.0.0.1 only.
set -euo pipefail

STATE=${SAEPIPE_SLURM_STATE:-/tmp/saepipe-slurm}
CPUS=${SAEPIPE_SLURM_CPUS:-16}
GPUS=${SAEPIPE_SLURM_GPUS:-8}
CTLD_PORT=${SAEPIPE_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
DBD_PORT=$((CTLD_PORT + 2))
DB_PORT=$((CTLD_PORT + 3))
HOST=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
t0=$(date +%s.%N)

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (the daemons run as root with SlurmUser=root)"

# ---- packages: only what is missing (a machine that has them installs nothing)
missing=()
for p in "${PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d: package scripts must not start the daemons themselves (this script starts its own, by pid file)
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$STATE"/{etc,log,run,spool/ctld,spool/d,munge,dev}
running() { [ -f "$STATE/run/$1.pid" ] && kill -0 "$(cat "$STATE/run/$1.pid")" 2>/dev/null; }
wait_for() {  # seconds, description, command...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "$what did not come up in ${limit}s (logs in $STATE/log)"
}

# ---- configuration (rewritten each time; the daemons read it when they start)
for i in $(seq 0 $((GPUS - 1))); do [ -c "$STATE/dev/fakegpu$i" ] || mknod "$STATE/dev/fakegpu$i" c 1 3; done
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
SOCKET="$STATE/run/munge/munge.socket"  # its directory must be world-searchable; the key directory is not
cat > "$STATE/etc/slurm.conf" <<EOF
ClusterName=saepipe
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job without --mem takes this much per CPU, not the whole node (which would run one job at a time)
DefMemPerCPU=$((MEM / CPUS))
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
KillWait=5
ReturnToService=2
SchedulerParameters=bf_interval=5,sched_interval=5
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd this names the munge socket (slurmctld talks to slurmdbd through it, not through AuthInfo's)
AccountingStoragePass=$SOCKET
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
cat > "$STATE/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=$HOST Name=gpu File=$STATE/dev/fakegpu[0-$((GPUS - 1))]
EOF
cat > "$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$STATE/etc/slurmdbd.conf"
export SLURM_CONF="$STATE/etc/slurm.conf"

# ---- munge: its own key, socket and log, owned by the munge user
chown munge:munge "$STATE/munge"
chmod 700 "$STATE/munge"
if [ ! -s "$STATE/munge/munge.key" ]; then
  dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1 count=1024 status=none
  chown munge:munge "$STATE/munge/munge.key"; chmod 400 "$STATE/munge/munge.key"
fi
if ! running munged; then
  touch "$STATE/log/munged.log"; chown munge:munge "$STATE/log/munged.log"
  install -d -o munge -g munge -m 755 "$STATE/run/munge"
  runuser -u munge -- /usr/sbin/munged --key-file="$STATE/munge/munge.key" --socket="$SOCKET" \
    --pid-file="$STATE/run/munge/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge/munge.seed"
  wait_for 10 munged test -s "$STATE/run/munge/munged.pid"
  cp "$STATE/run/munge/munged.pid" "$STATE/run/munged.pid"
fi

# ---- MariaDB on loopback, its own datadir
if ! running mariadbd; then
  if [ ! -d "$STATE/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$STATE/mysql" --auth-root-authentication-method=normal >"$STATE/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
  fi
  (setsid mariadbd --user=root --datadir="$STATE/mysql" --bind-address=127.0.0.1 --port="$DB_PORT" \
     --socket="$STATE/run/mysqld.sock" --pid-file="$STATE/run/mariadbd.pid" --skip-name-resolve \
     --log-error="$STATE/log/mariadb.log" </dev/null >/dev/null 2>&1 &)
  wait_for 30 MariaDB mariadb --socket="$STATE/run/mysqld.sock" -uroot -e "select 1"
fi

# ---- slurmdbd, slurmctld, slurmd
if ! running slurmdbd; then
  slurmdbd  # reads slurmdbd.conf next to $SLURM_CONF
  wait_for 30 slurmdbd bash -c "exec 3<>/dev/tcp/127.0.0.1/$DBD_PORT"
fi
if ! running slurmctld; then
  slurmctld -f "$SLURM_CONF"
  wait_for 30 slurmctld scontrol ping
fi
sacctmgr -i -n add cluster saepipe >/dev/null 2>&1 || true  # exists already after the first start
if ! running slurmd; then
  slurmd -f "$SLURM_CONF"
fi
node_idle() { [ "$(sinfo -h -n "$HOST" -o %T 2>/dev/null | tr -d '*')" = idle ]; }
wait_for 30 "the node ($HOST) in state idle" node_idle
# submitit needs job accounting: wait until sacct answers from the database
wait_for 30 "accounting (sacct)" sacct -n -X -S now-1minute

log "node $HOST idle with $CPUS CPUs and $GPUS fake GPUs in $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}") s; state in $STATE"
echo "export SLURM_CONF=$SLURM_CONF"
