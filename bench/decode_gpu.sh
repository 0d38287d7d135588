#!/usr/bin/env bash
# GPU runs of bench/decode_bench.py (issue 23), on the device machine:
#   here:  bash bench/gpu_wheels.sh; bitsandbytes 0.50.2 slimmed the same way into .bench_data/bnb050/
#   there: run(carry=[".whl", ".bench_data"], command="bash bench/decode_gpu.sh")
# KERNELS=1: the 4-bit products at the model's shapes under bitsandbytes 0.48.2 (the lock) and 0.50.2, same run.
# MODEL_CASES / MODEL_PROFILE: decode_bench.py model --cases / --profile. GPU_TESTS=1: the CUDA tests first.
# SRC: where hunyuan_lora comes from (default src; a carried copy for code not yet on main).
set -uo pipefail
cd "${ROOT:-$(dirname "$0")/..}"
PY=${PY:-python3}
DEST=${OUT:-bench/results}
SRC=${SRC:-src}
BENCH=${BENCH:-bench/decode_bench.py}
$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 2
if ls .bench_data/bnb050/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site50 .bench_data/bnb050/*.whl || exit 2
fi
export PYTHONPATH="/tmp/site:$PWD/$SRC" SWANLAB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
STAMP="$CARD-$(date +%F)"
if [ "${GPU_TESTS:-0}" = 1 ]; then
  $PY -m pytest -q -m gpu ${TESTS:-tests/test_decode.py} -p no:cacheprovider 2>&1 | tail -15 | tee "$DEST/decode-gpu-tests.log"
fi
if [ "${KERNELS:-0}" = 1 ]; then
  timeout 120 $PY $BENCH kernels --out "$DEST/decode-kernels-$STAMP-bnb048.json" 2>&1 | grep -v Warning
  [ -d /tmp/site50 ] && PYTHONPATH="/tmp/site50:$PYTHONPATH" timeout 120 $PY $BENCH kernels \
    --out "$DEST/decode-kernels-$STAMP-bnb050.json" 2>&1 | grep -v Warning
fi
if [ -n "${MODEL_CASES:-}" ]; then
  timeout "${MODEL_TIMEOUT:-360}" $PY $BENCH model --config "${CONFIG:-configs/huanhuan_qlora.yaml}" \
    --layers "${LAYERS:-32}" --cases "$MODEL_CASES" --profile "${MODEL_PROFILE:-}" \
    --out "$DEST/decode-model-$STAMP-${WHAT:-nf4-d32}.json" 2>&1 | grep -v -i warn
fi
ls -la "$DEST" | tail -5
