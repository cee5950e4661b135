#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by start-local-cluster.sh (slurmd, slurmctld, munged).
# Idempotent: daemons that are not running are skipped. Jobs still running are killed with slurmd.
# Leaves /etc/slurm/slurm.conf, state and logs in place so a restart resumes where it stopped.
set -euo pipefail

say() { echo "stop-local-cluster: $*" >&2; }

stop_pidfile() { # pidfile name
    local pidfile=$1 name=$2 pid
    if [[ -f "$pidfile" ]] && pid="$(cat "$pidfile")" && kill -0 "$pid" 2>/dev/null; then
        say "stopping $name (pid $pid)"
        kill "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name did not exit after 10 s; sending SIGKILL"
            kill -9 "$pid" || true
        fi
    else
        say "$name is not running"
    fi
}

stop_pidfile /run/slurmd.pid slurmd
stop_pidfile /run/slurmctld.pid slurmctld
if [[ "${1:-}" != "--keep-munge" ]]; then
    stop_pidfile /run/munge/munged.pid munged
fi
