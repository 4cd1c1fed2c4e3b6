#!/usr/bin/env bash
# A throw-away SLURM cluster for the tests: munged + slurmctld + one slurmd per node.
#
#   tests/slurm/start_cluster.sh DIR        # prints `export SLURM_CONF=DIR/etc/slurm.conf`
#   source DIR/slurm.env; DIR/client sbatch ...; tests/slurm/stop_cluster.sh DIR
#
# One node (the default): slurmctld and slurmd on 127.0.0.1, the node named after this machine.
# LOCAL_SLURM_NODES=N (2 or more): N nodes node1..nodeN on one machine, each slurmd in a network
# namespace of its own with its own hostname (a UTS namespace), its own address 10.213.0.I on a
# bridge, and its own mount namespace, where /etc/hosts is DIR/etc/hosts (the nodes' names) and
# DIR/scratch is DIR/nodes/nodeI/scratch: a node-local folder, as /tmp or /scratch are on a real
# cluster. Everything else is the one shared filesystem. slurmctld runs in a further namespace,
# DIR's "hub" (10.213.0.254, the bridge); the SLURM commands reach it from there: DIR/client runs a
# command in that namespace (in the one-node cluster it just runs it). The namespaces are named
# distvae-HASH-hub and distvae-HASH-nodeI (HASH from DIR's path) and listed in DIR/netns; no address,
# link or route is added outside them, so the cluster sends nothing beyond the machine.
#
# Everything (config, munge key and socket, controller state, slurmd spools, pid files, logs) lives
# under DIR; nothing is written to /etc and no systemd is needed. Needs root (slurmd runs the jobs;
# namespaces). Installs Debian's slurmctld, slurmd, slurm-client and munge with apt-get when they
# are missing. Idempotent: a healthy cluster in DIR is left alone; a half-dead one is stopped and
# started again. tests/slurm/stop_cluster.sh removes every daemon, namespace and link it made.
#
# Environment (all optional):
#   LOCAL_SLURM_NODES      nodes (1); 2 or more: in network namespaces, as above
#   LOCAL_SLURM_CTLD_PORT, LOCAL_SLURM_SLURMD_PORT   TCP ports (6917, 6918); pick free ones when
#                          several clusters may run on one machine
#   LOCAL_SLURM_CPUS       CPUs each node advertises (8, whatever the machine has: jobs share cores)
#   LOCAL_SLURM_MEMORY_MB  memory each node advertises (8192; nothing enforces it, no cgroups)
#   LOCAL_SLURM_REQUEUE_DELAY  seconds a requeued job waits before it can start again; SLURM takes it
#                          from AuthInfo's cred_expire (default 120)                          (5)
#   LOCAL_SLURM_MIN_JOB_AGE    seconds `scontrol show job` still shows a finished job        (300)
#   LOCAL_SLURM_TIMEOUT    seconds to wait for each daemon                                    (60)
set -euo pipefail

DIR=${1:?usage: tests/slurm/start_cluster.sh STATE_DIR}
mkdir -p "$DIR/logs"
DIR=$(cd "$DIR" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=${LOCAL_SLURM_NODES:-1}
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
export SLURM_CONF=$CONF
# The namespaces of a multi-node cluster, named after DIR so that two clusters never share one.
PREFIX=distvae-$(printf %s "$DIR" | md5sum | cut -c1-8)
HUB=$PREFIX-hub
SUBNET=10.213.0
if [ "$NODES" -gt 1 ]; then
  mapfile -t NODE_NAMES < <(seq -f 'node%g' 1 "$NODES")
  CONTROLLER_ADDR=$SUBNET.254
else
  NODE_NAMES=("$(hostname -s)")
  CONTROLLER_ADDR=127.0.0.1
fi

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
# client COMMAND...: a SLURM command, run where it reaches the controller.
client() {
  if [ "$NODES" -gt 1 ]; then nsenter --net="/run/netns/$HUB" "$@"; else "$@"; fi
}
# on_node I COMMAND...: COMMAND on node I of a multi-node cluster: in its network namespace, with
# its hostname, and in a mount namespace of its own where /etc/hosts and DIR/scratch are the node's.
on_node() {
  local i=$1
  shift
  nsenter --net="/run/netns/$PREFIX-node$i" unshare --uts --mount --propagation slave sh -c '
    hostname "$1" && mount --bind "$2" /etc/hosts && mount --bind "$3" "$4" && shift 4 && exec "$@"' \
    on_node "node$i" "$DIR/etc/hosts" "$DIR/nodes/node$i/scratch" "$DIR/scratch" "$@"
}
node_ready() {  # node_ready NAME: the node answers and takes jobs
  case "$(client sinfo -h -n "$1" -o %T 2>/dev/null)" in idle | mixed | allocated | completing) return 0 ;; esac
  return 1
}
all_running() {
  local name
  running "$PIDS/munged.pid" munged && running "$PIDS/slurmctld.pid" slurmctld || return 1
  for name in "${NODE_NAMES[@]}"; do
    running "$PIDS/slurmd-$name.pid" slurmd && node_ready "$name" || return 1
  done
}

[ "$(id -u)" = 0 ] || die "must run as root: slurmd starts jobs as their user"
[ "$NODES" -ge 1 ] 2>/dev/null && [ "$NODES" -le 250 ] || die "LOCAL_SLURM_NODES=$NODES: give 1 to 250 nodes"
[ ${#SOCKET} -lt 100 ] || die "state folder path too long for a unix socket: $SOCKET"
# munged refuses a socket below a folder that others cannot enter (pytest's tmp folders are 0700).
above=$(dirname "$DIR")
while [ "$above" != / ]; do
  [ "$(( 0$(stat -c %a "$above") & 1 ))" = 1 ] ||
    die "munged needs every folder above its socket to be o+x, $above is not: put the state folder elsewhere (/tmp)"
  above=$(dirname "$above")
done

# 1. Packages.
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
  ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  apt-get update -qq >"$LOGS/apt.log" 2>&1 || die "apt-get update failed, see $LOGS/apt.log"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >>"$LOGS/apt.log" 2>&1 ||
    die "apt-get install failed, see $LOGS/apt.log"
fi
if [ "$NODES" -gt 1 ] && ! command -v ip >/dev/null; then
  say "installing iproute2 (apt-get)"
  apt-get install -y -qq --no-install-recommends iproute2 >>"$LOGS/apt.log" 2>&1 ||
    { apt-get update -qq >>"$LOGS/apt.log" 2>&1 &&
      apt-get install -y -qq --no-install-recommends iproute2 >>"$LOGS/apt.log" 2>&1; } ||
    die "apt-get install iproute2 failed, see $LOGS/apt.log"
fi
if [ "$NODES" -gt 1 ]; then
  command -v ip >/dev/null && command -v unshare >/dev/null && command -v nsenter >/dev/null ||
    die "a multi-node cluster needs ip (iproute2), unshare and nsenter (util-linux)"
fi

# 2. Already up?
if all_running; then
  say "already running in $DIR"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
if ls "$PIDS"/*.pid >/dev/null 2>&1 || [ -s "$DIR/netns" ]; then
  say "a previous cluster in $DIR is partly up: stopping it first"
  "$HERE/stop_cluster.sh" "$DIR"
fi

# 3. Folders. Job state starts empty every time; munged wants its folders not writable by others.
rm -rf "$DIR/state" "$DIR/spool" "$PIDS"
mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool" "$DIR/munge" "$PIDS" "$LOGS"
chmod 755 "$DIR" "$DIR/etc" "$DIR/munge" "$PIDS" "$LOGS"
for name in "${NODE_NAMES[@]}"; do mkdir -p "$DIR/spool/$name"; done

# 4. munge: a private key (root-owned, 0600) and a private socket. A unix socket is reached by its
#    path, so the nodes' network namespaces share this one munged.
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

# 5. The network of a multi-node cluster: a bridge in the hub namespace, one veth pair per node (its
#    eth0 in the node's namespace, the other end on the bridge), loopback up everywhere. Each
#    namespace is listed in DIR/netns before it exists, so a start that fails half-way is undone.
if [ "$NODES" -gt 1 ]; then
  say "making namespaces $HUB and $PREFIX-node1..$NODES (bridge $SUBNET.0/24)"
  : >"$DIR/netns"
  echo "$HUB" >>"$DIR/netns"
  ip netns add "$HUB"
  ip -n "$HUB" link set lo up
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" addr add "$CONTROLLER_ADDR/24" dev br0
  ip -n "$HUB" link set br0 up
  {
    echo "# Written by tests/slurm/start_cluster.sh: /etc/hosts on the nodes of the cluster in $DIR."
    echo "127.0.0.1 localhost"
    for ((i = 1; i <= NODES; i++)); do echo "$SUBNET.$i node$i"; done
  } >"$DIR/etc/hosts"
  mkdir -p "$DIR/scratch"
  for ((i = 1; i <= NODES; i++)); do
    echo "$PREFIX-node$i" >>"$DIR/netns"
    ip netns add "$PREFIX-node$i"
    ip -n "$HUB" link add "veth-node$i" type veth peer name eth0 netns "$PREFIX-node$i"
    ip -n "$HUB" link set "veth-node$i" master br0 up
    ip -n "$PREFIX-node$i" link set lo up
    ip -n "$PREFIX-node$i" addr add "$SUBNET.$i/24" dev eth0
    ip -n "$PREFIX-node$i" link set eth0 up
    mkdir -p "$DIR/nodes/node$i/scratch"
  done
  printf '#!/bin/sh\n# Run a SLURM command where it reaches the controller of the cluster in %s.\nexec nsenter --net=/run/netns/%s "$@"\n' \
    "$DIR" "$HUB" >"$DIR/client"
else
  printf '#!/bin/sh\n# Run a SLURM command (the controller of the cluster in %s is on 127.0.0.1).\nexec "$@"\n' \
    "$DIR" >"$DIR/client"
fi
chmod 755 "$DIR/client"

# 6. slurm.conf: no cgroups, no accounting database, short timers. %n is the node's name: each
#    slurmd has its own spool folder, pid file and log.
{
  cat <<EOF
# Written by tests/slurm/start_cluster.sh: a $NODES-node test cluster, state in $DIR.
ClusterName=distvae-test
SlurmctldHost=$(hostname -s)($CONTROLLER_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job is held before it may start again.
AuthInfo=socket=$SOCKET,cred_expire=$REQUEUE_DELAY
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# One line per finished (or requeued) run of a job, with its state and exit code: there is no sacct
# without slurmdbd.
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
# Nodes advertise what this file says, not what slurmd finds (jobs may share the real cores).
SlurmdParameters=config_overrides
MinJobAge=$MIN_JOB_AGE
KillWait=5
ReturnToService=2
InactiveLimit=0
Waittime=0
EOF
  if [ "$NODES" -gt 1 ]; then
    for ((i = 1; i <= NODES; i++)); do
      echo "NodeName=node$i NodeAddr=$SUBNET.$i CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  else
    echo "NodeName=${NODE_NAMES[0]} NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN"
    echo "PartitionName=debug Nodes=${NODE_NAMES[0]} Default=YES MaxTime=INFINITE State=UP"
  fi
} >"$CONF"

# 7. The daemons fork into the background themselves and write their pid files.
say "starting slurmctld ($CONTROLLER_ADDR:$CTLD_PORT)"
client slurmctld -f "$CONF" </dev/null >>"$LOGS/slurmctld.out" 2>&1 ||
  die "slurmctld did not start: $(tail -n 5 "$LOGS/slurmctld.log" "$LOGS/slurmctld.out" 2>/dev/null)"
controller_up() { client scontrol ping | grep -q UP; }
until_ok slurmctld controller_up || die "slurmctld does not answer, see $LOGS/slurmctld.log"
for ((i = 1; i <= NODES; i++)); do
  name=${NODE_NAMES[$((i - 1))]}
  say "starting slurmd $name (port $SLURMD_PORT)"
  if [ "$NODES" -gt 1 ]; then
    on_node "$i" slurmd -f "$CONF" -N "$name" </dev/null >>"$LOGS/slurmd-$name.out" 2>&1
  else
    slurmd -f "$CONF" -N "$name" </dev/null >>"$LOGS/slurmd-$name.out" 2>&1
  fi || die "slurmd $name did not start: $(tail -n 5 "$LOGS/slurmd-$name.log" "$LOGS/slurmd-$name.out" 2>/dev/null)"
done
for name in "${NODE_NAMES[@]}"; do
  if ! until_ok "node $name" node_ready "$name"; then
    client scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
    until_ok "node $name" node_ready "$name" ||
      die "node $name is $(client sinfo -h -n "$name" -o '%T %E' 2>&1), see $LOGS/slurmd-$name.log and $LOGS/slurmctld.log"
  fi
done

echo "export SLURM_CONF=$CONF" >"$DIR/slurm.env"
say "cluster up: $(client sinfo -h -o '%P %D %T %c CPUs %m MB %N' 2>&1)"
echo "export SLURM_CONF=$CONF"
