#!/usr/bin/env bash
# Runs `t2t-jax train` as N cooperating processes on this machine, joined by jax.distributed and
# CPU collectives (gloo), each with DEVICES_PER_PROCESS fake CPU devices: the multi-host code
# path without a cluster, for testing a setup and for tests.
#
#   launch/local_multiprocess.sh N CONFIG WORKDIR [--config.x=y ...]
#
# Needs bash >= 5.1. Environment: DEVICES_PER_PROCESS (default 2), PORT (default: a free one), T2T_JAX (the
# command, default `t2t-jax`, or `.venv/bin/t2t-jax` when present), INIT_TIMEOUT (default 120).
# Each process logs to WORKDIR/logs/process_<i>.out (its pid is line i+1 of WORKDIR/logs/pids;
# `kill -TERM` one, or this script, to see a preemption save); the script exits with the first non-zero
# status, stopping the other processes, or 0 when all succeed.
#
# Worked example (two processes of 4 devices = one 8-device mesh, data parallel):
#   DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh 2 configs/tiny.py /tmp/t2t_mp \
#       --config.train.num_steps=20
#   tail /tmp/t2t_mp/logs/process_*.out; ls /tmp/t2t_mp/checkpoints
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 N CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
num_processes=$1
config=$2
workdir=$3
shift 3
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: N must be a positive integer, got '$num_processes'" >&2
  exit 2
fi
if [[ ! -f $config ]]; then
  echo "$0: no config file $config" >&2
  exit 2
fi

devices=${DEVICES_PER_PROCESS:-2}
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
if [[ -n ${T2T_JAX:-} ]]; then
  read -r -a command <<< "$T2T_JAX"
elif [[ -x .venv/bin/t2t-jax ]]; then
  command=(.venv/bin/t2t-jax)
else
  command=(t2t-jax)
fi

mkdir -p "$workdir/logs"
pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
kill_all_later() {  # processes waiting on a dead peer may not heed TERM
  (sleep "${KILL_GRACE:-20}"; for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done) &
}
# A signal to this script (e.g. a preemption notice) reaches every process: they checkpoint.
# One that comes while the processes are still being started reaches those started after it too.
stopping=0
trap 'stopping=1; stop_all' TERM INT

for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
    JAX_PLATFORMS=cpu \
    "${command[@]}" train --config "$config" --workdir "$workdir" \
    --coordinator_address "localhost:$port" --num_processes "$num_processes" \
    --process_id "$i" --init_timeout "${INIT_TIMEOUT:-120}" "$@" \
    > "$workdir/logs/process_$i.out" 2>&1 &
  pids+=("$!")
done
((stopping)) && stop_all
printf '%s\n' "${pids[@]}" > "$workdir/logs/pids"  # process i's pid on line i+1
echo "started $num_processes processes (${pids[*]}), $devices devices each, coordinator localhost:$port; logs in $workdir/logs" >&2

status=0
remaining=$num_processes
while ((remaining > 0)); do
  finished=""
  rc=0
  wait -n -p finished "${pids[@]}" || rc=$?
  # A trapped signal wakes `wait` with no process ended, and bash 5.2 then leaves `finished`
  # unset (not empty): under `set -u` only the ${...:-} form may read it.
  if [[ -z ${finished:-} ]]; then
    continue  # the trap forwarded the signal; keep waiting for every process to save and exit
  fi
  remaining=$((remaining - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "$0: process pid $finished exited with $rc; stopping the others" >&2
    stop_all
    kill_all_later
  fi
done
for ((i = 0; i < num_processes; i++)); do
  echo "--- process $i: tail of $workdir/logs/process_$i.out" >&2
  tail -n 3 "$workdir/logs/process_$i.out" >&2
done
exit "$status"
