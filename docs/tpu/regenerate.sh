#!/usr/bin/env bash
# Recompiles every row of docs/tpu.md on this machine (libtpu from the test extras; no TPU),
# writing docs/tpu/NAME/compile.{json,md}. Hours on 2 CPU cores; a finished NAME is skipped.
# Run from the repository root: bash docs/tpu/regenerate.sh
set -uo pipefail
run() {  # NAME, then the arguments of t2t-jax compile
  local name=$1
  shift
  [[ -f docs/tpu/$name/compile.json ]] && return
  echo "== $name" >&2
  .venv/bin/t2t-jax compile "$@" --output "docs/tpu/$name" || echo "$name failed" >&2
}
bf16=--config.model.dtype=bfloat16
for model in base big xl; do
  for slice in v5e:16x16 v5e:4x4 v4-8 v5p:4x4x4; do
    run "${model}_${slice/:/_}_x1" --config "configs/wmt14_ende_$model.py" --topology "$slice" \
      --rows_per_chip 4 "$bf16"
  done
  run "${model}_v5e_16x16_x2" --config "configs/wmt14_ende_$model.py" --topology v5e:16x16 \
    --num_slices 2 --rows_per_chip 4 "$bf16"
done
run splash_vs_einsum --config configs/wmt14_ende_base.py --topology v5e:4x4 --rows_per_chip 1 \
  --seq_lens 4096,16384,32768 --attention auto,xla "$bf16"
for model in base big; do
  run "decode_$model" --config "configs/wmt14_ende_$model.py" --topology v5e:4x4 --mode decode \
    "$bf16" --config.data.max_source_length=64
done
for model in base big xl; do
  run "search_${model}_v5e_4x4" --config "configs/wmt14_ende_$model.py" --topology v5e:4x4 \
    --rows_per_chip 4 --search "$bf16"
done
run search_big_v5e_16x16 --config configs/wmt14_ende_big.py --topology v5e:16x16 \
  --rows_per_chip 4 --search "$bf16"
# What `CONFIG=configs/wmt14_ende_big.py ACCELERATOR=v4-32 launch/tpu_pod.sh check` compiles.
run tpu_pod_check_big_v4-32 --config configs/wmt14_ende_big.py --topology v4-32
