#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels bench/verify_multi_gpu.sh installs on the GPU machine, which
# has torch (2.11.0+cu130: the lock's torch, whose wheel is far over what a device run carries) but no
# network: the versions of requirements.lock, for CPython $PYVER on x86_64 Linux.
#   bash bench/gpu_wheels.sh            # then run(..., carry=[".whl"], command="bash bench/verify_multi_gpu.sh")
# Must stay under the 64 MiB a device run carries: bitsandbytes' wheel (57 MiB, every CUDA version) is
# repacked with only the library for the device's CUDA (BNB_CUDA, torch.version.cuda without the dot).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
BNB_CUDA=${BNB_CUDA:-130}
DEST=${DEST:-.whl}
PY=${PY:-.venv/bin/python}
mkdir -p "$DEST"
pin() { grep -E "^$1==" requirements.lock | sed -E 's/ .*//'; }
# Pure-Python or abi3 / manylinux wheels; --no-deps: torch and its CUDA libraries are on the device.
PKGS=(transformers peft accelerate tokenizers huggingface-hub safetensors hjson msgpack py-cpuinfo ninja
      nvidia-ml-py einops pydantic pydantic-core annotated-types typing-inspection
      datasets dill multiprocess fsspec)  # datasets: scripts/dataset.py and train.py's load_from_disk
$PY -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  $(for p in "${PKGS[@]}"; do pin "$p"; done)
# deepspeed: PyPI has only an sdist; its wheel is pure Python (ops are JIT-compiled on first use).
$PY -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DEST" "$(pin deepspeed)"
# bitsandbytes, slimmed to one CUDA library (+ the CPU one).
BNB=$(pin bitsandbytes)
TMP=$(mktemp -d)
$PY -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$TMP" "$BNB"
$PY - "$TMP" "$DEST" "$BNB_CUDA" <<'EOF'
import sys, zipfile
from pathlib import Path
tmp, dest, cuda = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
(src,) = tmp.glob("bitsandbytes-*.whl")
keep = lambda n: not (n.startswith("bitsandbytes/libbitsandbytes_") and n.endswith(".so")) \
    or n.endswith(("_cpu.so", f"_cuda{cuda}.so"))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    assert f"bitsandbytes/libbitsandbytes_cuda{cuda}.so" in zin.namelist(), f"{src.name} has no CUDA {cuda} library"
    for info in zin.infolist():
        if not keep(info.filename):
            continue
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):  # drop the removed libraries' lines
            data = "".join(l for l in data.decode().splitlines(True) if keep(l.split(",")[0])).encode()
        zout.writestr(info, data)
print(dest / src.name)
EOF
rm -rf "$TMP"
du -sh "$DEST"; ls "$DEST"
