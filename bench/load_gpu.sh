#!/usr/bin/env bash
# bench/load.py on the device machine (issue 22), from a checkout with the pinned wheels in .whl/:
#   bash bench/gpu_wheels.sh                                        # here, once (.whl is git-ignored)
#   run(carry=[".whl"], command="bash bench/load_gpu.sh")           # there; results in $OUT (else bench/results)
#   run(carry=[".whl"], command="bash bench/load_gpu.sh --merge-only 8")   # only the merge, without and with the GPU
# The work folder goes on the filesystem with the most free space of /tmp and the checkout's.
set -uo pipefail
cd "$(dirname "$0")/.."
git log -1 --oneline
PY=${PY:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH="/tmp/site:$PWD/src" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
df -h /tmp "$PWD" /dev/shm 2>/dev/null; nproc; free -g | head -2
WORK=${WORK:-$(df --output=avail,target /tmp "$PWD" | tail -n +2 | sort -n | tail -1 | awk '{print $2}')/loadbench}
echo "work folder: $WORK"
$PY bench/load.py --work "$WORK" --out "${OUT:-bench/results}" "$@"
rc=$?
rm -rf "$WORK"
exit $rc
