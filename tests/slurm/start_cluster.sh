#!/usr/bin/env bash
# A throw-away single-node SLURM cluster for the tests: munged + slurmctld + slurmd on 127.0.0.1.
#
#   tests/slurm/start_cluster.sh DIR        # prints `export SLURM_CONF=DIR/etc/slurm.conf`
#   source DIR/slurm.env; sbatch ...; tests/slurm/stop_cluster.sh DIR
#
# Everything (config, munge key and socket, controller state, slurmd spool, pid files, logs) lives
# under DIR; nothing is written to /etc and no systemd is needed. Needs root (slurmd runs the jobs).
# Installs Debian's slurmctld, slurmd, slurm-client and munge with apt-get when they are missing.
# Idempotent: a healthy cluster in DIR is left alone; a half-dead one is stopped and started again.
#
# Environment (all optional):
#   LOCAL_SLURM_CTLD_PORT, LOCAL_SLURM_SLURMD_PORT   TCP ports (6917, 6918); pick free ones when
#                          several clusters may run on one machine
#   LOCAL_SLURM_CPUS       CPUs the node advertises (8, whatever the machine has: jobs share cores)
#   LOCAL_SLURM_MEMORY_MB  memory the node advertises (8192; nothing enforces it, no cgroups)
#   LOCAL_SLURM_REQUEUE_DELAY  seconds a requeued job waits before it can start again; SLURM takes it
#                          from AuthInfo's cred_expire (default 120)                          (5)
#   LOCAL_SLURM_MIN_JOB_AGE    seconds `scontrol show job` still shows a finished job        (300)
#   LOCAL_SLURM_TIMEOUT    seconds to wait for each daemon                                    (60)
set -euo pipefail

DIR=${1:?usage: tests/slurm/start_cluster.sh STATE_DIR}
mkdir -p "$DIR/logs"
DIR=$(cd "$DIR" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6917}
SLURMD_PORT=${LOCAL_SLURM_SLURMD_PORT:-6918}
CPUS=${LOCAL_SLURM_CPUS:-8}
MEMORY_MB=${LOCAL_SLURM_MEMORY_MB:-8192}
REQUEUE_DELAY=${LOCAL_SLURM_REQUEUE_DELAY:-5}
MIN_JOB_AGE=${LOCAL_SLURM_MIN_JOB_AGE:-300}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}

CONF=$DIR/etc/slurm.conf
SOCKET=$DIR/munge/socket
PIDS=$DIR/pids
LOGS=$DIR/logs
NODE=$(hostname -s)
export SLURM_CONF=$CONF

say() { echo "[start_cluster $(date +%T)] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }
# running PIDFILE NAME: the pid in PIDFILE is alive (not a zombie) and is the program NAME (not recycled).
running() {
  local pid
  pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] &&
    ! grep -q '^State:.*Z' "/proc/$pid/status"
}
# until_ok WHAT COMMAND...: retry COMMAND every 0.5 s for up to TIMEOUT seconds.
until_ok() {
  local what=$1 tries=$((TIMEOUT * 2))
  shift
  until "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    [ "$tries" -gt 0 ] || return 1
    sleep 0.5
  done
  say "$what: ok"
}
node_ready() {  # the node answers and takes jobs
  case "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" in idle | mixed | allocated | completing) return 0 ;; esac
  return 1
}

[ "$(id -u)" = 0 ] || die "must run as root: slurmd starts jobs as their user"
[ ${#SOCKET} -lt 100 ] || die "state folder path too long for a unix socket: $SOCKET"
# munged refuses a socket below a folder that others cannot enter (pytest's tmp folders are 0700).
above=$(dirname "$DIR")
while [ "$above" != / ]; do
  [ "$(( 0$(stat -c %a "$above") & 1 ))" = 1 ] ||
    die "munged needs every folder above its socket to be o+x, $above is not: put the state folder elsewhere (/tmp)"
  above=$(dirname "$above")
done

# 1. Packages.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
  ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$LOGS/apt.log" 2>&1 || die "apt-get update failed, see $LOGS/apt.log"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >>"$LOGS/apt.log" 2>&1 ||
    die "apt-get install failed, see $LOGS/apt.log"
fi

# 2. Already up?
if running "$PIDS/munged.pid" munged && running "$PIDS/slurmctld.pid" slurmctld &&
  running "$PIDS/slurmd.pid" slurmd && node_ready; then
  say "already running in $DIR"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
if ls "$PIDS"/*.pid >/dev/null 2>&1; then
  say "a previous cluster in $DIR is partly up: stopping it first"
  "$HERE/stop_cluster.sh" "$DIR"
fi

# 3. Folders. Job state starts empty every time; munged wants its folders not writable by others.
rm -rf "$DIR/state" "$DIR/spool" "$PIDS"
mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/munge" "$PIDS" "$LOGS"
chmod 755 "$DIR" "$DIR/etc" "$DIR/munge" "$PIDS" "$LOGS"

# 4. munge: a private key (root-owned, 0600) and a private socket.
if [ ! -s "$DIR/munge/key" ]; then
  head -c 1024 /dev/urandom >"$DIR/munge/key"
fi
chown root:root "$DIR/munge/key"
chmod 600 "$DIR/munge/key"
say "starting munged"
munged --key-file="$DIR/munge/key" --socket="$SOCKET" --pid-file="$PIDS/munged.pid" \
  --log-file="$LOGS/munged.log" --seed-file="$DIR/munge/seed" </dev/null >>"$LOGS/munged.out" 2>&1 ||
  die "munged did not start: $(tail -n 3 "$LOGS/munged.log" "$LOGS/munged.out" 2>/dev/null)"
munge_works() { munge -n -S "$SOCKET" | unmunge -S "$SOCKET"; }
until_ok munged munge_works || die "munged does not answer, see $LOGS/munged.log"

# 5. slurm.conf: one node on 127.0.0.1, no cgroups, no accounting database, short timers.
cat >"$CONF" <<EOF
# Written by tests/slurm/start_cluster.sh: a one-node test cluster, state in $DIR.
ClusterName=distvae-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job is held before it may start again.
AuthInfo=socket=$SOCKET,cred_expire=$REQUEUE_DELAY
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# Look at pending jobs every second, so a requeued job starts as soon as it is allowed to.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEMORY_MB / CPUS))
# The node advertises what this file says, not what slurmd finds (jobs may share the real cores).
SlurmdParameters=config_overrides
MinJobAge=$MIN_JOB_AGE
KillWait=5
ReturnToService=2
InactiveLimit=0
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# 6. The daemons fork into the background themselves and write their pid files.
say "starting slurmctld (port $CTLD_PORT)"
slurmctld -f "$CONF" </dev/null >>"$LOGS/slurmctld.out" 2>&1 ||
  die "slurmctld did not start: $(tail -n 5 "$LOGS/slurmctld.log" "$LOGS/slurmctld.out" 2>/dev/null)"
controller_up() { scontrol ping | grep -q UP; }
until_ok slurmctld controller_up || die "slurmctld does not answer, see $LOGS/slurmctld.log"
say "starting slurmd (port $SLURMD_PORT)"
slurmd -f "$CONF" -N "$NODE" </dev/null >>"$LOGS/slurmd.out" 2>&1 ||
  die "slurmd did not start: $(tail -n 5 "$LOGS/slurmd.log" "$LOGS/slurmd.out" 2>/dev/null)"
if ! until_ok "node $NODE" node_ready; then
  scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
  until_ok "node $NODE" node_ready ||
    die "node $NODE is $(sinfo -h -n "$NODE" -o '%T %E' 2>&1), see $LOGS/slurmd.log and $LOGS/slurmctld.log"
fi

echo "export SLURM_CONF=$CONF" >"$DIR/slurm.env"
say "cluster up: $(sinfo -h -o '%P %D %T %c CPUs %m MB' 2>&1)"
echo "export SLURM_CONF=$CONF"
