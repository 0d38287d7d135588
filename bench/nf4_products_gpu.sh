#!/usr/bin/env bash
# The two device calls that decide model.nf4_products (issues 23 and 25), back to back (the machine stays warm
# between them only briefly). Here first: bash bench/gpu_wheels.sh; cp ../shared/data/huanhuan_token_lengths.json
# .bench_data/ (and, for grouped-nf4-gemm in the comparison, .venv/bin/python -m pip download --no-deps
# grouped-nf4-gemm==0.51.0 -d .whl). Then:
#   run(carry=[".whl", ".bench_data"], command="git log -1 --oneline; bash bench/nf4_products_gpu.sh kernels")
#   run(carry=[".whl", ".bench_data"], command="git log -1 --oneline; bash bench/nf4_products_gpu.sh probes")
# kernels (~5 min): the CUDA tests (GPU_TESTS), the 8-step loss comparison at 2 layers (the tutorial QLoRA
#   config on the fast path, lora.dropout 0, as probe-NVIDIA-H200-2026-12-01-loss-fast-d2-v3) with
#   nf4_products dequantize and triton, then bench/nf4_products_bench.py (products at the model's shapes).
# probes (~5 min): make probe at 32 layers, NF4, training and generation (batch 1 and 64), dequantize and triton.
# A device call returns at most 8 files: the probes' markdown comes back as one archive.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE_OUT=${OUT:-}
LOSS=configs/huanhuan_qlora_tutorial.yaml:8:2::model.moe_impl=fast,lora.dropout=0
QLORA=configs/huanhuan_qlora.yaml:3:32
case "${1:-}" in
  kernels)
    GPU_TESTS=1 PROBES="loss-fast-d2:$LOSS loss-fast-d2-nf4triton:$LOSS,model.nf4_products=triton" \
      bash bench/probe_gpu.sh
    PYTHONPATH=/tmp/site:src timeout 300 python3 bench/nf4_products_bench.py \
      --out "${DEVICE_OUT:-bench/results}/nf4-products-$(date +%F).json"
    ;;
  probes)
    PROBES="qlora-gen-d32:$QLORA qlora-gen-d32-nf4triton:$QLORA::model.nf4_products=triton" bash bench/probe_gpu.sh
    ;;
  *)
    echo "usage: bash bench/nf4_products_gpu.sh kernels|probes" >&2
    exit 2
    ;;
esac
if [ -n "$DEVICE_OUT" ] && ls "$DEVICE_OUT"/*.md >/dev/null 2>&1; then
  (cd "$DEVICE_OUT" && tar czf "probe-md-$1.tgz" ./*.md && rm -f ./*.md)
fi
