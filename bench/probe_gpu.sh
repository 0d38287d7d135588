#!/usr/bin/env bash
# GPU runs of `make probe` for the published figures (issues 13 and 14), on the device machine:
#   bash bench/gpu_wheels.sh; cp ../shared/data/huanhuan_token_lengths.json .bench_data/   # here
#   run(carry=[".whl", ".bench_data"], command="PROBES='...' bash bench/probe_gpu.sh")       # there
# PROBES: space-separated what:config:steps:layers[:profile[:key=value,key=value]] (config overrides), e.g.
#   "qlora-fast-d32:configs/huanhuan_qlora.yaml:20:32 qlora-tutorial-d4:configs/huanhuan_qlora_tutorial.yaml:3:4"
# Each probe's probe.json / probe.md land in $OUT (or bench/results) as probe-<card>-<date>-<what>.{json,md};
# A probe that runs out of memory is run again 4 layers shallower. PROBE_GENERATION=0: training only (no second
# model build, init_s ~25 s at 32 layers, and no generation). GPU_TESTS=1 first runs the CUDA tests of the fast
# and NF4 MoE paths. Lengths: the real tokenizer's
# (.bench_data/huanhuan_token_lengths.json, a copy of ../shared/data's), 16 samples per optimizer step.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${OUT:-bench/results}
LENGTHS=${LENGTHS:-.bench_data/huanhuan_token_lengths.json}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" SWANLAB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${GPU_TESTS:-0}" = 1 ]; then
  $PY -m pytest -q -m gpu tests/test_nf4_moe.py tests/test_nf4_products.py tests/test_fast_moe.py tests/test_fast_linear.py tests/test_step_graphs.py tests/test_layer_checkpoint.py -p no:cacheprovider 2>&1 | tail -40 | tee "$DEST/gpu-tests.log"
fi
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
for p in ${PROBES:-}; do
  IFS=: read -r what config steps layers profile sets <<<"$p"
  SETS=()
  IFS=, read -r -a pairs <<<"${sets:-}"
  for kv in "${pairs[@]}"; do SETS+=(--set "$kv"); done
  start=$SECONDS
  PROBE_PROFILE=$([ "${profile:-}" = profile ] && echo 1) timeout "${PROBE_TIMEOUT:-540}" $PY scripts/probe.py \
    --config "$config" --output-dir "/tmp/probe-$what" --steps "$steps" --layers "$layers" --lengths "$LENGTHS" \
    "${SETS[@]}" >"/tmp/probe-$what.log" 2>&1
  rc=$?
  if [ $rc != 0 ] && grep -q "out of memory" "/tmp/probe-$what.log" && [ "$layers" -gt 4 ]; then
    echo "== $what: out of memory at $layers layers, again at $((layers - 4))"  # the largest depth that fits
    PROBE_PROFILE=$([ "${profile:-}" = profile ] && echo 1) timeout "${PROBE_TIMEOUT:-540}" $PY scripts/probe.py \
      --config "$config" --output-dir "/tmp/probe-$what" --steps "$steps" --layers "$((layers - 4))" --lengths "$LENGTHS" \
      "${SETS[@]}" >"/tmp/probe-$what.log" 2>&1
    rc=$?
  fi
  echo "== $what: rc=$rc in $((SECONDS - start)) s"
  if [ -f "/tmp/probe-$what/probe/probe.json" ]; then
    cp "/tmp/probe-$what/probe/probe.json" "$DEST/probe-$CARD-$(date +%F)-$what.json"
    cp "/tmp/probe-$what/probe/probe.md" "$DEST/probe-$CARD-$(date +%F)-$what.md"
    grep -E "steady state|samples/s|tokens/s|MFU|peak memory|Profile" "/tmp/probe-$what/probe/probe.md"
  else
    tail -25 "/tmp/probe-$what.log"
  fi
done
