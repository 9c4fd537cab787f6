#!/usr/bin/env bash
# scripts/slurm/up.sh - start a throw-away single-node SLURM cluster on localhost (CI and laptops; no systemd needed).
#
# Installs Debian's SLURM packages if missing (slurmctld, slurmd, slurm-client, munge), writes /etc/slurm/slurm.conf
# and gres.conf, starts munged (only if no working munge is there), slurmctld and slurmd, waits for the node and runs
# an `srun` smoke test. The node advertises fake GPUs (gres/gpu backed by symlinks to /dev/null): SLURM schedules
# `--gpus` / `--gres=gpu:N` jobs and sets CUDA_VISIBLE_DEVICES, but there is no GPU behind it (torch sees none).
#
# Idempotent: with a healthy cluster started by this script and an unchanged config it only re-checks health
# (~0.2 s). A changed config (other knobs) restarts the daemons this script started.
# Every daemon it starts is recorded by PID under the state dir; scripts/slurm/down.sh stops exactly those.
# It refuses to touch a SLURM it did not set up (a foreign /etc/slurm/slurm.conf or a running foreign controller).
# Based on the configuration measured in ../shared/reference/slurm_notes.md (Debian 12, slurm 22.05.8, munge 0.5.15).
#
# Needs root. Knobs (environment):
#   SFTRL_SLURM_STATE=/tmp/sftrl-slurm   state dir: pid files, logs, spool, fake GPU device links
#   SFTRL_SLURM_AUTH=munge|none          auth plugin (auth/none needs no munged; insecure, CI only)
#   SFTRL_SLURM_CPUS=<n>                 CPUs the node advertises (default: nproc; may exceed the real count)
#   SFTRL_SLURM_MEM_MB=<n>               RealMemory the node advertises (default: 90% of RAM)
#   SFTRL_SLURM_GPUS=2                   number of fake GPUs (gres/gpu), 0 = none
#   SFTRL_SLURM_GPU_TYPE=                a gres type for them (e.g. h100: then `--gpus=h100:N` works, as the
#                                        gpu_model of profiles/slurm asks); empty = untyped (`--gpus=N` only)
#   SFTRL_SLURM_PARTITION=debug          name of the single partition (profiles/slurm-localhost uses `debug`)
set -euo pipefail

ST=${SFTRL_SLURM_STATE:-/tmp/sftrl-slurm}
AUTH=${SFTRL_SLURM_AUTH:-munge}
CPUS=${SFTRL_SLURM_CPUS:-$(nproc)}
MEM=${SFTRL_SLURM_MEM_MB:-$(awk '/MemTotal/{printf "%d", $2/1024*0.9}' /proc/meminfo)}
NGPU=${SFTRL_SLURM_GPUS:-2}
GPU_TYPE=${SFTRL_SLURM_GPU_TYPE:-}
PARTITION=${SFTRL_SLURM_PARTITION:-debug}
CONF=/etc/slurm
MARK="# written by sftrl scripts/slurm/up.sh (state dir $ST)"

say() { echo "up.sh: $*"; }
die() { echo "up.sh: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (SLURM daemons, /etc/slurm and apt need it); try: sudo $0"
case "$AUTH" in munge|none) ;; *) die "SFTRL_SLURM_AUTH must be munge or none, not '$AUTH'" ;; esac

# alive PIDFILE NAME: the pid in PIDFILE runs, is not a zombie (a PID 1 that does not reap leaves those), and is NAME
# (so a recycled pid is never mistaken for our daemon).
alive() {
  [ -f "$1" ] || return 1
  local pid state comm
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ "$state" != Z ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [ "$comm" = "$2" ]
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null || true; }

# ---------- 1. packages ----------
pkgs="slurmctld slurmd slurm-client"
[ "$AUTH" = munge ] && pkgs="$pkgs munge"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || die "packages missing ($missing ) and apt-get is not available (Debian/Ubuntu only)"
  say "installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# ---------- 2. config (compared with the running one; a change restarts our daemons) ----------
mkdir -p "$ST/ctld" "$ST/spool" "$CONF"
if [ -f "$CONF/slurm.conf" ] && ! head -n 1 "$CONF/slurm.conf" | grep -q '^# written by sftrl scripts/slurm/up.sh'; then
  die "$CONF/slurm.conf exists and was not written by this script: a real SLURM is configured here; not touching it"
fi
if ! alive "$ST/slurmctld.pid" slurmctld && scontrol ping 2>/dev/null | grep -q ' is UP'; then
  die "a SLURM controller not started by this script (state dir $ST) is running; stop it first"
fi

gres_line=""; gres_types=""; gres_conf=""
if [ "$NGPU" -gt 0 ]; then
  # Fake GPUs: gres/gpu needs File= entries that are character devices; symlinks to /dev/null work without warnings.
  for i in $(seq 0 $((NGPU - 1))); do ln -sfn /dev/null "$ST/fakegpu$i"; done
  gres_types="GresTypes=gpu"
  if [ -n "$GPU_TYPE" ]; then
    gres_line="Gres=gpu:$GPU_TYPE:$NGPU"; gres_conf="Name=gpu Type=$GPU_TYPE File=$ST/fakegpu[0-$((NGPU - 1))]"
  else
    gres_line="Gres=gpu:$NGPU"; gres_conf="Name=gpu File=$ST/fakegpu[0-$((NGPU - 1))]"
  fi
fi
new_conf=$(cat <<EOF
$MARK
ClusterName=sftrl
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/$AUTH
CredType=cred/$AUTH
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldPidFile=$ST/slurmctld.pid
SlurmdPidFile=$ST/slurmd.pid
SlurmctldLogFile=$ST/slurmctld.log
SlurmdLogFile=$ST/slurmd.log
StateSaveLocation=$ST/ctld
SlurmdSpoolDir=$ST/spool
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$gres_types
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM $gres_line State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ "$(cat "$CONF/slurm.conf" 2>/dev/null)" != "$new_conf" ] || [ "$(cat "$CONF/gres.conf" 2>/dev/null)" != "$gres_conf" ]; then
  changed=1
  printf '%s\n' "$new_conf" > "$CONF/slurm.conf"
  printf '%s\n' "$gres_conf" > "$CONF/gres.conf"
fi

# ---------- fast path: our cluster is up, config unchanged, node usable ----------
if [ "$changed" = 0 ] && alive "$ST/slurmctld.pid" slurmctld && alive "$ST/slurmd.pid" slurmd; then
  case "$(node_state)" in idle*|mixed*|allocated*|completing*)
    say "cluster already up (state dir $ST)"; exit 0 ;;
  esac
fi
if [ "$changed" = 1 ] && { alive "$ST/slurmctld.pid" slurmctld || alive "$ST/slurmd.pid" slurmd; }; then
  say "config changed: restarting the daemons started from $ST"
  SFTRL_SLURM_KEEP_MUNGE=1 bash "$(dirname "$0")/down.sh" >/dev/null
fi

# ---------- 3. munge (only started if no working munged answers; then recorded as ours) ----------
if [ "$AUTH" = munge ]; then
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/mungekey -c; }
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    setsid runuser -u munge -- /usr/sbin/munged --force </dev/null >>"$ST/munged.out" 2>&1
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munged did not come up (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$ST/munged.pid"   # we started it, so down.sh may stop it
  fi
fi

# ---------- 4. slurmctld + slurmd (they daemonize; fully detached so callers capturing our output never hang) ----------
if ! alive "$ST/slurmctld.pid" slurmctld; then
  setsid /usr/sbin/slurmctld </dev/null >>"$ST/slurmctld.out" 2>&1
fi
if ! alive "$ST/slurmd.pid" slurmd; then
  # -N: the node name is `localhost` whatever the machine's hostname is
  setsid /usr/sbin/slurmd -N localhost </dev/null >>"$ST/slurmd.out" 2>&1
fi

# ---------- 5. wait for the node to be usable ----------
state=""
for _ in $(seq 60); do
  state=$(node_state)
  case "$state" in
    idle*|mixed*|allocated*) break ;;
    drain*|inval*|down*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in idle*|mixed*|allocated*) ;; *)
  echo "up.sh: ERROR: node not ready (state='$state')" >&2
  tail -n 20 "$ST/slurmctld.log" "$ST/slurmd.log" >&2 || true
  exit 1 ;;
esac
timeout 60 srun -t 1 -N1 true || die "smoke test 'srun true' failed (see $ST/slurmctld.log, $ST/slurmd.log)"
sinfo -N -o "%N %T %c %m %G"
say "cluster ready (state dir $ST, auth=$AUTH cpus=$CPUS mem=${MEM}M gpus=$NGPU${GPU_TYPE:+ ($GPU_TYPE)} partition=$PARTITION)"
