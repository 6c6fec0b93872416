#!/usr/bin/env bash
# A real single-machine SLURM cluster from Debian's packages: munge, slurmctld and slurmd on this host.
#
#   sudo tools/slurm/cluster-up.sh          # install if needed, write slurm.conf, start, wait for an idle node
#   sudo tools/slurm/cluster-up.sh status   # what is running (exit 1 if the node is not up)
#   sudo tools/slurm/cluster-up.sh down     # stop the daemons, set slurm.conf aside (packages stay)
#
# Idempotent: a second run finds the daemons up with the same config and changes nothing. No systemd
# (containers, CI machines): the daemons are started directly. No accounting database: jobs stay in
# squeue for MinJobAge seconds after they end, which is where snakemake-executor-plugin-slurm reads
# their states (`--slurm-status-command squeue`, set in profiles/slurm), and slurmctld appends one
# line per finished job to $JOBCOMP (jobcomp/filetxt), a record of every job that went through sbatch.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
JOBCOMP=$LOGDIR/jobcomp.log
SPOOL=/var/spool/slurm
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}

die() { echo "cluster-up: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts system daemons)"

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n1; }

stop() {
    for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
        if running "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in $(seq 50); do running "$pidfile" || break; sleep 0.1; done
        fi
        rm -f "$pidfile"
    done
}

case "${1:-up}" in
    down)
        # The config goes aside too: with it, client commands (scontrol, sacct) retry the stopped
        # controller for about 9 s, and snakemake-executor-plugin-slurm runs `scontrol show config`
        # when it is imported, which every `snakemake` start does. Without it they fail at once.
        stop; [ -f "$CONF" ] && mv "$CONF" "$CONF.down"
        echo "cluster-up: slurmctld and slurmd stopped, $CONF moved to $CONF.down (munged left running)"; exit 0 ;;
    status)
        for pidfile in /run/munge/munged.pid /run/slurmctld.pid /run/slurmd.pid; do
            running "$pidfile" && echo "$(basename "$pidfile" .pid): running" || echo "$(basename "$pidfile" .pid): stopped"
        done
        state=$(node_state || true); echo "node: ${state:-unknown}"
        [ "$state" = idle ] || [ "$state" = mix ] || [ "$state" = alloc ]; exit ;;
    up) ;;
    *) die "unknown mode '$1' (use: up, status or down)" ;;
esac

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged are missing and there is no apt-get to install them"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The daemons and the client commands only (slurm-wlm's recommends pull in HDF5, RRD, ... plugins).
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# munge: the key the package made, one daemon.
mkdir -p /run/munge && chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { runuser -u munge -- mungekey --create 2>/dev/null || \
    { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key;
      chmod 400 /etc/munge/munge.key; }; }
running /run/munge/munged.pid || runuser -u munge -- munged

# slurm.conf for this host, from what slurmd sees (CPUs, sockets, cores, memory).
host=$(hostname -s)
# The daemons talk over the loopback address, so the host name need not resolve for them.
node=$(slurmd -C | head -n1 | sed "s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/")
mkdir -p "$LOGDIR" "$SPOOL/ctld" "$SPOOL/d" /etc/slurm
new=$(mktemp)
cat >"$new" <<EOF
# Written by tools/slurm/cluster-up.sh: a one-machine cluster for gpt2ipu's workflow.
ClusterName=gpt2ipu
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
# No cgroups in containers: processes are tracked by their parents, tasks are not pinned.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Jobs get the cores and memory they ask for; several small jobs share the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# No accounting database: finished jobs stay in squeue this long (the plugin reads their states there)
# and each one is appended to the job completion log.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
MinJobAge=600
$node State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
changed=1
if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then changed=0; rm -f "$new"; else mv "$new" "$CONF"; chmod 644 "$CONF"; fi

# A changed config means fresh daemons; an unchanged one with both daemons up is left alone.
[ "$changed" = 0 ] || stop
running /run/slurmctld.pid || slurmctld
running /run/slurmd.pid || slurmd

for _ in $(seq 120); do
    state=$(node_state || true)
    case "$state" in
        idle|mix|alloc) echo "cluster-up: node $host is $state (slurm.conf: $CONF, logs: $LOGDIR)"; exit 0 ;;
        down*|drain*|inval*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
die "node $host did not become idle in 60 s (state: ${state:-none}); see $LOGDIR/slurmctld.log and slurmd.log"
