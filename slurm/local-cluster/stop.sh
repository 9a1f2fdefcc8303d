#!/usr/bin/env bash
# Stops the daemons slurm/local-cluster/start.sh started, by their pid files in the state directory: never by process
# name, so that another Slurm or MariaDB on this machine is left alone. Jobs still running are cancelled first.
set -uo pipefail
STATE=${SAEPIPE_SLURM_STATE:-/tmp/saepipe-slurm}
export SLURM_CONF="$STATE/etc/slurm.conf"
[ -d "$STATE/run" ] || { echo "local-cluster: nothing started in $STATE" >&2; exit 0; }
if [ -f "$STATE/run/slurmctld.pid" ] && kill -0 "$(cat "$STATE/run/slurmctld.pid")" 2>/dev/null; then
  scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
fi
for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
  pidfile="$STATE/run/$daemon.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "local-cluster: $daemon ($pid) ignored SIGTERM; SIGKILL" >&2; kill -9 "$pid"; }
  fi
  rm -f "$pidfile"
done
echo "local-cluster: stopped (state kept in $STATE)" >&2
