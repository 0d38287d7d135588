#!/usr/bin/env bash
# GPU check of the real-scale paths (issue "Real scale on GPUs"), through train.py's own code:
#   (a) DeepSpeed ZeRO-3 via `accelerate launch` on 2 GPUs (configs/accelerate/zero3.yaml)
#   (b) QLoRA (model.quantization=nf4) on 1 GPU
#   (c) the same model in plain bf16 on 1 GPU (the baseline both are compared with)
# on a real-width, reduced-depth Hunyuan-A13B (DEPTH layers, random weights, bench/verify_scale.py).
#
# Prepare here (network): bash bench/gpu_wheels.sh        -> .whl/ (pinned wheels, < 64 MiB)
# Then on the device machine (2 GPUs; torch preinstalled; the wheels carried):
#   run(kind="nvidia-h200-x2", carry=[".whl"], command="bash bench/verify_multi_gpu.sh")
# Writes bench/results/<GPU>-<date>-scale.{json,md} and keeps the logs in bench/results/<tag>-logs/.
# Knobs (environment): DEPTH=2 STEPS=8 BATCH=4 WHEELS=.whl WORK=/tmp/verify-scale CASES="zero3 qlora bf16" CASE_TIMEOUT=540
# (zero3fast: ZeRO-3 with model.moe_impl=fast; bf16double: one GPU, batch 2 x BATCH = zero3's samples per step;
# fastpacked / fastpacked64: the fast preset's switches on one GPU, lengths as they come / rounded to 64).
# Case names end in -d<DEPTH>: per-layer memory = the difference between two depths. ONE_SAMPLE=1: every
# batch is one record repeated (names end in -onesample), so loss curves compare step by step.
# One device command may run 600 s: split CASES over calls (the model folder in WORK is reused while the
# machine stays warm).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
WORK=${WORK:-/tmp/verify-scale}
DEPTH=${DEPTH:-2}
STEPS=${STEPS:-8}
BATCH=${BATCH:-4}
CASES=${CASES:-zero3 qlora bf16}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" SWANLAB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ---- the pinned stack from the carried wheels (no network on the device) ----------------------------
if [ -d "$WHEELS" ]; then
  $PY -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 2; }
fi
$PY - <<'EOF' || exit 2
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "GPUs", torch.cuda.device_count())
for p in ("transformers", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes"):
    print(p, md.version(p))
EOF
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
# the card's bf16 GEMM rate, measured now (bench/run.py's gemm_rate): the MFU denominator of the table
# (the last line only, and checked: anything an import prints on stdout would otherwise reach summarize's
# --gemm-tflops and fail its argument parsing)
GEMM_TFLOPS=$(PYTHONPATH="$PWD/bench:$PYTHONPATH" CUDA_VISIBLE_DEVICES=0 $PY -c "import torch, run; \
print(round(run.gemm_rate(torch.device('cuda')) / 1e12))" | tail -n 1) || exit 2
GEMM_ARGS=()
if [[ $GEMM_TFLOPS =~ ^[0-9]+(\.[0-9]+)?$ ]]; then GEMM_ARGS=(--gemm-tflops "$GEMM_TFLOPS"); else GEMM_TFLOPS="-"; fi
echo "bf16 GEMM 8192^3: $GEMM_TFLOPS TFLOP/s"
TAG="${GPU}-$(date +%F)-scale"
OUT=bench/results
LOGS="$OUT/$TAG-logs"
mkdir -p "$LOGS" "$WORK"

# ---- model folder (real width, DEPTH layers) + tokenized demo data ---------------------------------
MODEL="$WORK/hunyuan-a13b-depth$DEPTH"
[ -f "$MODEL/config.json" ] || $PY bench/verify_scale.py write-model "$MODEL" --depth "$DEPTH" || exit 2
COMMON=(--config configs/demo.yaml --model-dir "$MODEL"
        --set model.device=cuda --set model.dtype=bfloat16 --set model.device_map=null
        --set swanlab.mode=disabled --set train.resume=never --set train.max_steps="$STEPS"
        --set train.per_device_train_batch_size="$BATCH" --set train.gradient_accumulation_steps=1
        --set train.logging_steps=1 --set train.save_steps=1000 --set train.learning_rate=1e-4)
if [ "${ONE_SAMPLE:-0}" = 1 ]; then
  # every batch the same record: loss curves of different launchers compare step by step, whatever
  # order each one's sampler draws in
  $PY -c "import json,sys; r=json.load(open('src/hunyuan_lora/assets/zhenhuan_sample.json'))[0]; json.dump([r]*64, open(sys.argv[1],'w'), ensure_ascii=False)" "$WORK/one-sample.json" || exit 2
  COMMON+=(--data "$WORK/one-sample.json" --set data.drop_duplicates=false)
fi
$PY scripts/patch.py "${COMMON[@]}" --output-dir "$WORK/data-run" || exit 2

run_case() {  # name, processes, launcher..., -- extra args
  local name=$1-d$DEPTH nproc=$2; shift 2
  [ "${ONE_SAMPLE:-0}" = 1 ] && name+=-onesample
  local launcher=() extra=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done; shift; extra=("$@")
  local dir="$WORK/run-$name"
  rm -rf "$dir"
  $PY scripts/dataset.py "${COMMON[@]}" --output-dir "$dir" >"$LOGS/$name.dataset.log" 2>&1 || return 1
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 250 >"$LOGS/$name.mem.csv" &
  local smi=$!
  local start=$SECONDS status=ok
  timeout "${CASE_TIMEOUT:-540}" "${launcher[@]}" scripts/train.py "${COMMON[@]}" --output-dir "$dir" "${extra[@]}" \
    >"$LOGS/$name.train.log" 2>&1 || status="failed rc=$?"
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  echo "$name: $status in $((SECONDS - start)) s (log: $LOGS/$name.train.log)"
  [ "$status" = ok ] || tail -30 "$LOGS/$name.train.log"
  $PY bench/verify_scale.py summarize --case "$name" --run-dir "$dir" --mem-log "$LOGS/$name.mem.csv" \
    --processes "$nproc" --out-dir "$OUT" --tag "$TAG" --status="$status" "${GEMM_ARGS[@]}"
}

FAST_PRESET=(--set model.moe_impl=fast --set train.packing=true --set train.per_device_train_batch_size=16
             --set train.optim=adamw_torch_fused)
for c in $CASES; do
  case $c in
    zero3) run_case zero3-2gpu 2 $PY -m accelerate.commands.launch --config_file configs/accelerate/zero3.yaml \
             --num_processes 2 -- ;;
    zero3fast) run_case zero3-fast-2gpu 2 $PY -m accelerate.commands.launch --config_file configs/accelerate/zero3.yaml \
             --num_processes 2 -- --set model.moe_impl=fast ;;
    qlora) CUDA_VISIBLE_DEVICES=0 run_case qlora-nf4-1gpu 1 $PY -- --set model.quantization=nf4 ;;
    bf16)  CUDA_VISIBLE_DEVICES=0 run_case bf16-1gpu 1 $PY -- ;;
    # the samples of zero3's optimizer step (2 processes x BATCH) on one GPU: the loss curve to compare with
    bf16double) CUDA_VISIBLE_DEVICES=0 run_case bf16-1gpu-batch$((2 * BATCH)) 1 $PY -- \
             --set train.per_device_train_batch_size=$((2 * BATCH)) ;;
    # configs/huanhuan_fast.yaml's switches through the Trainer, without and with rounded lengths: every
    # packed step brings a new length (cuDNN attention builds a graph per length; the bench pre-warms)
    fastpacked) CUDA_VISIBLE_DEVICES=0 run_case fast-packed-1gpu 1 $PY -- "${FAST_PRESET[@]}" ;;
    fastpacked64) CUDA_VISIBLE_DEVICES=0 run_case fast-packed-pad64-1gpu 1 $PY -- "${FAST_PRESET[@]}" \
             --set train.pad_to_multiple_of=64 ;;
    *) echo "unknown case $c (zero3, zero3fast, qlora, bf16, bf16double, fastpacked, fastpacked64)" >&2 ;;
  esac
done
cat "$OUT/$TAG.md"
