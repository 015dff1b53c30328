#!/usr/bin/env bash
# A t2t-jax training run on a Cloud TPU pod slice (TPU VMs): create the slice, install this
# project on every worker, start the same `t2t-jax train` on all of them, read their logs, delete.
#
#   launch/tpu_pod.sh check | create | setup | train | logs | stop | delete
#
# `check` (no cloud project needed, run it first) compiles the train step for $ACCELERATOR on
# this machine with the TPU compiler and prints the mesh, per-chip memory and whether it fits
# (`t2t-jax compile`, see docs/tpu.md): what you would otherwise learn from an OOM on the pod.
#
# Parameters (environment):
#   PROJECT      Google Cloud project                    (required)
#   ZONE         zone with TPU capacity                   (default us-central2-b)
#   TPU_NAME     name of the slice                        (default t2t-jax)
#   ACCELERATOR  accelerator type, e.g. v4-32, v5p-64     (default v4-32)
#   RUNTIME      TPU VM software version                  (default tpu-ubuntu2204-base)
#   CONFIG       config file in this repository           (default configs/wmt14_ende_base.py)
#   WORKDIR      gs:// directory all workers share        (required for train)
#   DATA_DIR     gs:// TFDS data dir, prepared beforehand (default $WORKDIR/tfds)
#   EXTRA_ARGS   more flags, e.g. "--config.mesh.ici.fsdp=4"
#   SPOT=1       create a Spot slice (preemptible: training saves and resumes on SIGTERM)
#
# Every worker runs the same command; `--distributed=on` makes jax.distributed find the other
# workers through the TPU metadata server. Each worker logs to ~/t2t_jax_train.log on itself
# and to $WORKDIR/logs/host_<i>.log.
#
# Worked example (WMT14 en-de base model on a v4-32, 4 hosts x 4 chips):
#   export PROJECT=my-project ZONE=us-central2-b ACCELERATOR=v4-32 WORKDIR=gs://my-bucket/ende
#   .venv/bin/t2t-jax prepare --config configs/wmt14_ende_base.py --workdir "$WORKDIR" \
#       --config.data.data_dir="$WORKDIR/tfds"          # once, from any machine
#   launch/tpu_pod.sh check         # fits? on this machine, before paying for the slice
#   launch/tpu_pod.sh create && launch/tpu_pod.sh setup && launch/tpu_pod.sh train
#   launch/tpu_pod.sh logs          # the last lines of every worker's log
#   launch/tpu_pod.sh delete        # when done; checkpoints stay in $WORKDIR
set -euo pipefail

: "${ZONE:=us-central2-b}" "${TPU_NAME:=t2t-jax}" "${ACCELERATOR:=v4-32}"
: "${RUNTIME:=tpu-ubuntu2204-base}" "${CONFIG:=configs/wmt14_ende_base.py}" "${EXTRA_ARGS:=}"
repo_dir=t2t_jax
log=t2t_jax_train.log

need() {
  if [[ -z ${!1:-} ]]; then
    echo "$0: set $1 (see the top of this script)" >&2
    exit 2
  fi
}

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
    --worker=all --command "$1"
}

if [[ ${1:-} == check ]]; then
  # EXTRA_ARGS is a list of flags: split it into words on purpose.
  # shellcheck disable=SC2086
  exec "${T2T_JAX:-.venv/bin/t2t-jax}" compile --config "$CONFIG" --topology "$ACCELERATOR" \
    $EXTRA_ARGS
fi
need PROJECT
case "${1:-}" in
  create)
    spot=()
    if [[ ${SPOT:-0} == 1 ]]; then spot=(--spot); fi
    gcloud compute tpus tpu-vm create "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${spot[@]}"
    ;;
  setup)
    # The same source tree on every worker, installed with the TPU build of jax.
    tarball=$(mktemp --suffix .tar.gz)
    git archive --format=tar.gz -o "$tarball" HEAD
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:~/t2t_jax.tar.gz" --project "$PROJECT" \
      --zone "$ZONE" --worker=all
    rm -f "$tarball"
    on_all_workers "rm -rf ~/$repo_dir && mkdir -p ~/$repo_dir && tar -xzf ~/t2t_jax.tar.gz -C ~/$repo_dir && cd ~/$repo_dir && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e '.[tpu]' && .venv/bin/python -c 'import jax, t2t_jax; print(jax.__version__, t2t_jax.__version__)'"
    ;;
  train)
    need WORKDIR
    data_dir=${DATA_DIR:-$WORKDIR/tfds}
    # nohup: the run outlives this ssh session; the version check and the coordinator timeout
    # happen inside t2t-jax, so a bad worker fails the start with a one-line reason in its log.
    on_all_workers "cd ~/$repo_dir && nohup .venv/bin/t2t-jax train --distributed=on --config $CONFIG --workdir $WORKDIR --config.data.data_dir=$data_dir $EXTRA_ARGS > ~/$log 2>&1 &"
    echo "started on all workers of $TPU_NAME; follow with: $0 logs" >&2
    ;;
  logs)
    on_all_workers "echo \"== \$(hostname)\"; tail -n 20 ~/$log"
    ;;
  stop)
    # SIGTERM: every worker saves a checkpoint at one agreed step and exits 0; `train` resumes.
    on_all_workers "pkill -TERM -f 't2t-jax train' || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" --quiet
    ;;
  *)
    echo "usage: $0 check|create|setup|train|logs|stop|delete (parameters: see the top of $0)" >&2
    exit 2
    ;;
esac
