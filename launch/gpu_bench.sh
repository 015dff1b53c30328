#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md on the GPU this machine has, as one prepared run: issue
# 14's base and big train steps (bf16, cuDNN attention, 16k tokens a side at length 512; the base
# step also profiled by kind), beam-4 and greedy decoding of the base model, the small
# parallel-text preset's step, rbg dropout bits, cuDNN's packed spans against the dense mask,
# and XLA's dot merger turned off. Each point runs under its own timeout, so one slow compile
# (XLA's GPU autotuning takes 20-40 s a point) cannot use up the others' time. Each point writes
# its bench.json and log.txt (the base point its profile too) under OUT_DIR/NAME, and
# OUT_DIR/summary.txt has a line a point: tokens/s, step, MFU, memory.
#
#   launch/gpu_bench.sh OUT_DIR [NAME ...]     # the named points only (default: all, in order)
#   launch/gpu_bench.sh --list                 # the points' names, in order
#
# Environment: T2T_JAX (the command, default `t2t-jax`, or `.venv/bin/t2t-jax` when present),
# POINT_TIMEOUT (seconds a point may take, default 150), EXTRA_ARGS (flags added to every point,
# after its own, so they win: "--steps 20", "--config.train.dropout_rng=rbg"), DRY_RUN=1 (print
# each point's command line instead of running it). A point that fails or times out is reported
# and the run goes on; the script exits 1 if any did.
#
# Worked example (the three points of issue 14's targets, about 5 minutes with compiles):
#   launch/gpu_bench.sh /tmp/gpu_bench base big beam4
#   cat /tmp/gpu_bench/summary.txt; grep -h devices: /tmp/gpu_bench/*/log.txt
#
# The point `train_prepared` trains the base model (bf16) for TRAIN_STEPS steps (default 300) on
# prepared ids, the built-in reverse task packed into 32 rows of 512 tokens, the shape of the
# `base` point, so that its tokens/s compare with bench's on random tokens; its summary line
# adds the time a step waited for its batch. The GPU machine needs no TensorFlow for it (only
# ml_collections and tqdm beside JAX, Flax and Optax): make the ids where TensorFlow is, and
# carry the folder (about 2 MB) to it as PREPARED_DATA:
#   launch/gpu_bench.sh --prepare data/gpu_bench        # here (writes DIR's TFDS data and ids)
#   PREPARED_DATA=data/gpu_bench launch/gpu_bench.sh /tmp/gpu_bench train_prepared   # there
set -uo pipefail

BF16=(--config.model.dtype=bfloat16 --attention auto)
STEP_512=(--batch_tokens 16384 --seq_lens 512 --steps 10)
DECODE=(--config configs/base.py --config.model.dtype=bfloat16 --mode decode --seq_lens 32
        --batch_tokens 8192 --steps 3)
NAMES=(base big beam4 greedy small base_rbg packed_spans packed_dense base_no_dot_merger
       train_prepared)
# The train_prepared point's data and run: the base model on packed rows of 512 of the reverse task.
PREPARED=(--config configs/base.py --config.data.data_dir="${PREPARED_DATA:-data/gpu_bench}"
          --config.data.packing=True --config.data.batch_size=32
          --config.data.max_source_length=512 --config.data.max_target_length=512)

# The command line of point $1 (after the t2t-jax command); the output and profile folders are
# added by the loop below.
point_args() {
  case $1 in
    base) echo bench --config configs/base.py "${BF16[@]}" "${STEP_512[@]}" ;;
    big) echo bench --config configs/big.py "${BF16[@]}" "${STEP_512[@]}" ;;
    beam4) echo bench "${DECODE[@]}" --beam_size 4 ;;
    greedy) echo bench "${DECODE[@]}" ;;
    # The preset's 8k SentencePiece pieces, given here so that no TensorFlow is needed to know it.
    small) echo bench --config configs/parallel_text.py:small --config.model.vocab_size=8000 \
      "${BF16[@]}" --batch_tokens 4096 --seq_lens 128 --steps 10 ;;
    base_rbg) echo bench --config configs/base.py "${BF16[@]}" "${STEP_512[@]}" \
      --config.train.dropout_rng=rbg ;;
    packed_spans) echo bench --config configs/base.py "${BF16[@]}" "${STEP_512[@]}" \
      --packed_examples 16 --config.model.max_segments_per_row=16 ;;
    packed_dense) echo bench --config configs/base.py "${BF16[@]}" "${STEP_512[@]}" \
      --packed_examples 16 ;;
    base_no_dot_merger) echo bench --config configs/base.py "${BF16[@]}" "${STEP_512[@]}" ;;
    train_prepared) echo train "${PREPARED[@]}" --config.model.dtype=bfloat16 \
      --config.train.num_steps="${TRAIN_STEPS:-300}" --config.train.log_every=50 \
      --config.train.eval_every=100000 --config.train.checkpoint_every=100000 \
      --config.train.num_decode_examples=0 --config.data.eval_steps=1 ;;
    *) return 1 ;;
  esac
}

# XLA flags of point $1, added to the caller's XLA_FLAGS.
point_xla_flags() {
  case $1 in
    base_no_dot_merger) echo --xla_gpu_dot_merger_threshold_mb=0 ;;
  esac
}

if [[ ${1:-} == --list ]]; then
  printf '%s\n' "${NAMES[@]}"
  exit 0
fi
if [[ ${1:-} == --prepare ]]; then  # the train_prepared point's data, where TensorFlow is
  [[ $# -eq 2 ]] || { echo "usage: $0 --prepare DIR" >&2; exit 2; }
  cd "$(dirname "$0")/.." || exit 2
  PREPARED_DATA=$(realpath -m "$2")
  PREPARED=(--config configs/base.py --config.data.data_dir="$PREPARED_DATA")
  exec "${T2T_JAX:-.venv/bin/t2t-jax}" prepare "${PREPARED[@]}" --workdir "$PREPARED_DATA/workdir"
fi
if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: $0 OUT_DIR [NAME ...] (or --list for the names)" >&2
  exit 2
fi
out_dir=$(realpath -m "$1")  # absolute: the points run from the repository's root
shift
selected=("$@")
[[ ${#selected[@]} -gt 0 ]] || selected=("${NAMES[@]}")
for name in "${selected[@]}"; do
  if ! point_args "$name" >/dev/null; then
    echo "$0: unknown point '$name'; the points are: ${NAMES[*]}" >&2
    exit 2
  fi
done

cd "$(dirname "$0")/.." || exit 2
if [[ -z ${T2T_JAX:-} ]]; then
  if [[ -x .venv/bin/t2t-jax ]]; then T2T_JAX=.venv/bin/t2t-jax; else T2T_JAX=t2t-jax; fi
fi
read -r -a t2t_jax <<<"$T2T_JAX"
read -r -a extra_args <<<"${EXTRA_ARGS:-}"
timeout_s=${POINT_TIMEOUT:-150}

failed=()
for name in "${selected[@]}"; do
  read -r -a args <<<"$(point_args "$name")"
  args+=("${extra_args[@]}")
  if [[ ${args[0]} == train ]]; then
    args+=(--workdir "$out_dir/$name/run")
  else
    args+=(--output "$out_dir/$name")
  fi
  [[ $name == base ]] && args+=(--profile "$out_dir/$name/profile")
  xla_flags=${XLA_FLAGS:-}
  point_flags=$(point_xla_flags "$name")
  [[ -n $point_flags ]] && xla_flags="${xla_flags:+$xla_flags }$point_flags"
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "$name: XLA_FLAGS='$xla_flags' ${t2t_jax[*]} ${args[*]}"
    continue
  fi
  rm -rf "$out_dir/$name/bench.json" "$out_dir/$name/run"  # no stale figures, a fresh run
  echo "=== $name ($(date +%T)), at most ${timeout_s} s"
  mkdir -p "$out_dir/$name"
  XLA_FLAGS=$xla_flags timeout "$timeout_s" "${t2t_jax[@]}" "${args[@]}" \
    2>&1 | tee "$out_dir/$name/log.txt" | grep -v '^[WIE]0000'
  status=${PIPESTATUS[0]}
  if [[ $status -ne 0 ]]; then
    [[ $status -eq 124 ]] && echo "$name: timed out after ${timeout_s} s"
    failed+=("$name")
  fi
done
[[ ${DRY_RUN:-0} == 1 ]] && exit 0

# One line a point, from each bench.json, into OUT_DIR/summary.txt.
python3 - "$out_dir" "${selected[@]}" <<'PYTHON' | tee "$out_dir/summary.txt"
import json, os, sys

out_dir, names = sys.argv[1], sys.argv[2:]
print(f"{'point':<20} {'tokens/s':>12} {'step ms':>9} {'MFU':>7} {'memory GiB':>11}")
for name in names:
    metrics = os.path.join(out_dir, name, "run", "metrics.jsonl")
    if os.path.exists(metrics):  # a train point: its last logged interval
        rows = [json.loads(line) for line in open(metrics)]
        last = [row for row in rows if "step_time_s" in row][-1:] or [{}]
        row = last[0]
        print(f"{name:<20} {row.get('tokens_per_s', 0):>12,.0f} "
              f"{row.get('step_time_s', 0) * 1e3:>9.2f} {'':>7} {'':>11} input wait "
              f"{row.get('input_wait_s', 0) * 1e3:.2f} ms a step (target tokens)")
        continue
    path = os.path.join(out_dir, name, "bench.json")
    points = json.load(open(path)) if os.path.exists(path) else []
    for p in points or [{"error": "no bench.json (see its log.txt)"}]:
        if p.get("error"):
            print(f"{name:<20} {p['error']}")
        else:
            print(f"{name:<20} {p['tokens_per_s']:>12,.0f} {p['step_time_s'] * 1e3:>9.2f} "
                  f"{p['mfu']:>7.1%} {(p['peak_memory_bytes'] or 0) / 2**30:>11.2f}")
PYTHON
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "failed or timed out: ${failed[*]} (logs: $out_dir/NAME/log.txt)" >&2
  exit 1
fi
