#!/usr/bin/env bash
# Start (or confirm running) a single-node Slurm cluster on this host for runner's tests and users.
#
# This host (hostname -s) is controller and only compute node, with its real CPUs and memory, two
# partitions (`cpu`, the default, and `gpu`; the node has no GPU gres, so runner drops --gpus with a
# warning), no cgroups, no slurmdbd: finished jobs are recorded by jobcomp/filetxt in $JOBCOMP_LOC.
# Runs munged, slurmctld and slurmd as background daemons without systemd (root needed).
# Idempotent: a running cluster with an unchanged slurm.conf is left alone.
#
# Exit status: 0 cluster up (node idle or allocated); 3 Slurm cannot be installed here (not root,
# no apt-get, install failed); 4 daemons did not come up (log tails are printed); 1 other errors.
# Environment: RUNNER_SLURM_FORCE=1 overwrites an /etc/slurm/slurm.conf that this script did not write.
set -euo pipefail

MARKER="# written by runner scripts/slurm/start-local-cluster.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
STATE_DIR=/var/lib/slurm
JOBCOMP_LOC="$LOG_DIR/jobcomp.log"
NODE="$(hostname -s)"

say() { echo "start-local-cluster: $*" >&2; }

if [[ $EUID -ne 0 ]]; then
    say "must run as root (it installs packages and starts slurmctld/slurmd/munged)"
    exit 3
fi

missing=()
for bin in sbatch squeue scontrol sinfo slurmctld slurmd munged mungekey; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if ((${#missing[@]})); then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing ${missing[*]} and apt-get is not available to install slurm-wlm and munge"
        exit 3
    fi
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge; } >/tmp/runner-slurm-apt.log 2>&1; then
        tail -n 20 /tmp/runner-slurm-apt.log >&2
        say "apt-get install slurm-wlm munge failed (full log: /tmp/runner-slurm-apt.log)"
        exit 3
    fi
fi

# --- munge ------------------------------------------------------------------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    say "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.1
    done
    if ! munge -n | unmunge >/dev/null; then
        say "munged did not start"
        tail -n 20 /var/log/munge/munged.log >&2 || true
        exit 4
    fi
fi

# --- slurm.conf -------------------------------------------------------------------------------
# slurmd -C reports this host's real topology and memory, which slurmd checks the config against.
hw="$(slurmd -C | head -n 1)"
cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
mem_mb="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
node_line="$(sed 's/^NodeName=[^ ]*/NodeName='"$NODE"'/' <<<"$hw") State=UNKNOWN"
# Jobs that ask for no memory get an even share, so several can run at once under CR_Core_Memory.
def_mem_per_cpu=$((mem_mb / cpus))

new_conf="$(cat <<CONF
$MARKER
# Single-node cluster for runner tests; regenerate with the script, do not edit.
ClusterName=runner-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP_LOC
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem_per_cpu
MpiDefault=none
ReturnToService=2
# Keep finished jobs visible to scontrol (reason, stdout path) for an hour.
MinJobAge=3600
$node_line
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
CONF
)"

conf_changed=0
if [[ -f "$CONF" ]]; then
    if ! grep -qxF "$MARKER" "$CONF" && [[ "${RUNNER_SLURM_FORCE:-0}" != 1 ]]; then
        say "$CONF exists and was not written by this script; set RUNNER_SLURM_FORCE=1 to overwrite it"
        exit 1
    fi
    [[ "$(cat "$CONF")" == "$new_conf" ]] || conf_changed=1
else
    conf_changed=1
fi
if ((conf_changed)); then
    install -d -m 0755 "$CONF_DIR"
    printf '%s\n' "$new_conf" >"$CONF"
    say "wrote $CONF (node $NODE: $cpus CPUs, ${mem_mb} MB)"
fi
install -d -m 0755 "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
touch "$JOBCOMP_LOC"

# --- daemons ----------------------------------------------------------------------------------
pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() { # pidfile name
    local pid
    pid="$(cat "$1" 2>/dev/null)" || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    say "stopping $2 (config changed)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}

if ((conf_changed)); then
    stop_daemon /run/slurmd.pid slurmd
    stop_daemon /run/slurmctld.pid slurmctld
fi
if ! pid_alive /run/slurmctld.pid; then
    say "starting slurmctld"
    slurmctld
fi
if ! pid_alive /run/slurmd.pid; then
    say "starting slurmd"
    slurmd
fi

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n 1; }
state=""
for i in $(seq 120); do
    state="$(node_state)"
    case "$state" in
        idle | mixed | allocated | completing) break ;;
        down* | drain* | fail*)
            # A node left down by an earlier run (e.g. a config change) comes back on resume.
            if ((i % 10 == 1)); then scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true; fi ;;
    esac
    sleep 0.5
done
case "$state" in
    idle | mixed | allocated | completing)
        say "cluster up: node $NODE is $state; partitions: $(sinfo -h -o '%P' | tr '\n' ' ')"
        say "finished jobs are logged in $JOBCOMP_LOC"
        ;;
    *)
        say "node $NODE did not become idle (state '${state:-unreachable}')"
        for log in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
            echo "--- tail $log" >&2
            tail -n 15 "$log" >&2 || true
        done
        exit 4
        ;;
esac
