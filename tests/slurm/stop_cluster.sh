#!/usr/bin/env bash
# Stop the cluster that tests/slurm/start_cluster.sh started in DIR: cancel its jobs, shut its
# daemons down, and for a multi-node cluster end every process left in its network namespaces and
# delete them (their links and bridge go with them). Signals only the processes named in DIR/pids
# (checked against their program name), job processes left behind by this cluster's slurmd, and
# processes inside the namespaces listed in DIR/netns; never anything found by name alone.
# Safe to run when nothing runs, and more than once. `--purge` also deletes DIR.
#
#   tests/slurm/stop_cluster.sh DIR [--purge]
set -uo pipefail

DIR=${1:?usage: tests/slurm/stop_cluster.sh STATE_DIR [--purge]}
[ -d "$DIR" ] || exit 0
DIR=$(cd "$DIR" && pwd)
PIDS=$DIR/pids
export SLURM_CONF=$DIR/etc/slurm.conf

say() { echo "[stop_cluster $(date +%T)] $*" >&2; }
pid_in() { cat "$PIDS/$1.pid" 2>/dev/null; }
# is PID NAME: PID is a live (not zombie) process of the program NAME, not a recycled pid.
is() { [ -n "$1" ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] && ! grep -q '^State:.*Z' "/proc/$1/status"; }
# stop PID NAME GRACE: give it GRACE seconds to exit, then SIGTERM, then SIGKILL.
stop() {
  local pid=$1 name=$2 grace=$3 i
  for ((i = 0; i < grace * 4; i++)); do is "$pid" "$name" || return 0; sleep 0.25; done
  is "$pid" "$name" && kill -TERM "$pid" 2>/dev/null
  for ((i = 0; i < 20; i++)); do is "$pid" "$name" || return 0; sleep 0.25; done
  is "$pid" "$name" && { say "$name $pid ignores SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null; }
  return 0
}
tree() {  # tree PID: PID and all its descendants
  local child
  echo "$1"
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$child"; done
}

CTLD=$(pid_in slurmctld)
MUNGED=$(pid_in munged)
# client COMMAND...: a SLURM command, where it reaches the controller (DIR/client, see start_cluster.sh).
client() {
  if [ -x "$DIR/client" ]; then "$DIR/client" "$@"; else "$@"; fi
}

# 1. Cancel every job while the controller still runs, and give them KillWait to go.
if is "$CTLD" slurmctld; then
  mapfile -t jobs < <(client squeue -h -o %i 2>/dev/null)
  if [ ${#jobs[@]} -gt 0 ]; then
    say "cancelling jobs ${jobs[*]}"
    client scancel "${jobs[@]}" 2>/dev/null
    for ((i = 0; i < 60; i++)); do
      [ -z "$(client squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  client scontrol shutdown >/dev/null 2>&1
fi

# 2. Step daemons of this cluster that outlived it (a daemon was killed before its jobs ended):
#    they run with this cluster's spool folder open as their working directory.
for proc in /proc/[0-9]*; do
  pid=${proc#/proc/}
  is "$pid" slurmstepd || continue
  case "$(readlink "$proc/cwd" 2>/dev/null)" in
    "$DIR"/*)
      say "leftover slurmstepd $pid: killing it and its job processes"
      for victim in $(tree "$pid"); do kill -KILL "$victim" 2>/dev/null; done
      ;;
  esac
done

# 3. The daemons themselves (one slurmd per node, slurmd-NODE.pid).
for file in "$PIDS"/slurmd*.pid; do
  [ -e "$file" ] && stop "$(cat "$file" 2>/dev/null)" slurmd 10
done
stop "$CTLD" slurmctld 10
stop "$MUNGED" munged 0
rm -f "$PIDS"/*.pid

# 4. The namespaces of a multi-node cluster: whatever still runs inside them is this cluster's (a
#    job's process that outlived its slurmstepd); then the namespaces, with their links and bridge.
if [ -s "$DIR/netns" ]; then
  mapfile -t namespaces <"$DIR/netns"
  for ns in "${namespaces[@]}"; do
    [ -e "/run/netns/$ns" ] || continue
    for ((i = 0; i < 3; i++)); do
      mapfile -t left < <(ip netns pids "$ns" 2>/dev/null)
      [ ${#left[@]} -gt 0 ] || break
      say "namespace $ns: killing processes ${left[*]}"
      kill -KILL "${left[@]}" 2>/dev/null
      sleep 0.5
    done
    ip netns del "$ns" 2>/dev/null || say "could not delete namespace $ns"
  done
  remaining=$(for ns in "${namespaces[@]}"; do [ -e "/run/netns/$ns" ] && echo "$ns"; done)
  [ -z "$remaining" ] && rm -f "$DIR/netns"
fi
if [ "${2:-}" = --purge ]; then
  rm -rf "$DIR"
fi
say "stopped"
exit 0
