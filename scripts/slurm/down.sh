#!/usr/bin/env bash
# scripts/slurm/down.sh - stop the single-node SLURM cluster that scripts/slurm/up.sh started, by recorded PID only.
# Never stops a daemon it did not start: it reads the pid files under the state dir and checks each process's name.
# Idempotent: missing or stale pid files are ignored. Leaves /etc/slurm/*.conf and the packages in place.
# Knobs (environment):
#   SFTRL_SLURM_STATE=/tmp/sftrl-slurm   the state dir up.sh used
#   SFTRL_SLURM_PURGE=1                  also delete the state dir (logs, spool, saved job state)
#   SFTRL_SLURM_KEEP_MUNGE=1             leave a munged that up.sh started running (used by up.sh on a restart)
set -u
ST=${SFTRL_SLURM_STATE:-/tmp/sftrl-slurm}

# ours PIDFILE NAME: prints the pid recorded in PIDFILE if that process is alive, not a zombie, and named NAME
ours() {
  [ -f "$1" ] || return 1
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive_pid "$pid" "$2" && echo "$pid"
}
alive_pid() {  # $1 = pid, $2 = expected process name
  local state
  [ -r "/proc/$1/stat" ] || return 1
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

stop() {  # $1 = pid file, $2 = process name. Waits on the pid itself: slurmd removes its pid file before it exits.
  local pid
  if pid=$(ours "$1" "$2"); then
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do alive_pid "$pid" "$2" || break; sleep 0.2; done
    if alive_pid "$pid" "$2"; then kill -9 "$pid" 2>/dev/null; echo "down.sh: $2 (pid $pid) ignored SIGTERM for 10 s: killed"; fi
    echo "down.sh: stopped $2 (pid $pid)"
  fi
  rm -f "$1"
}

if ours "$ST/slurmctld.pid" slurmctld >/dev/null; then
  # Cancel leftover jobs first, while munge and slurmctld still run, and let them end: a job step whose daemons
  # vanish under it can keep slurmd from exiting.
  timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 75); do [ -z "$(squeue -h -u "$(id -un)" 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop "$ST/slurmd.pid" slurmd
stop "$ST/slurmctld.pid" slurmctld
[ "${SFTRL_SLURM_KEEP_MUNGE:-0}" = 1 ] || stop "$ST/munged.pid" munged   # only if up.sh started munged
[ "${SFTRL_SLURM_PURGE:-0}" = 1 ] && rm -rf "$ST"
echo "down.sh: done (state dir $ST)"
