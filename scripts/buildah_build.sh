#!/usr/bin/env bash
# Daemonless build of ./Dockerfile: `make buildah-build`.
#
# For machines without a Docker daemon (CI sandboxes, this project's dev boxes). It builds the very
# same Dockerfile with buildah (vfs storage, chroot isolation: no daemon, no overlay, no user
# namespaces needed) on a LOCAL base instead of the CUDA base: a Debian bookworm minbase rootfs made
# with debootstrap (bookworm's python3 is 3.11, like the Ubuntu 22.04 CUDA base's python3.11), so
# every RUN step of the Dockerfile really executes, including the full
# `pip install --require-hashes -r requirements.lock` (~3 GB of torch/CUDA wheels from PyPI).
# It needs only PyPI and the Debian archive.
#
# Steps: 1 base image (debootstrap, cached as $BASE in buildah's storage; BASE_REBUILD=1 redoes it)
#        2 buildah bud of ./Dockerfile with the same build args as `make docker-build`
#        3 smoke test of the built image (as its non-root user: make help, import torch, venv stamp;
#          as an arbitrary uid: the volumes and the tree are writable; BUILDAH_SMOKE_DEMO=1: make demo)
# A timed log of every step goes to $LOG and a summary to $SUMMARY (default in
# $BUILDAH_OUT=/var/tmp/hunyuan-lora-buildah: outside the tree, which other stages clean).
#
# Variables: BUILDAH_IMAGE (default localhost/hunyuan-lora:buildah), BUILDAH_BASE
# (localhost/debian-bookworm-minbase:latest), DEBIAN_MIRROR, BUILDAH_STORAGE_DRIVER (vfs),
# BUILDAH_KEEP=1 keeps the built image (default: kept; BUILDAH_KEEP=0 removes it after the smoke test).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${BUILDAH_IMAGE:-localhost/hunyuan-lora:buildah}
BASE=${BUILDAH_BASE:-localhost/debian-bookworm-minbase:latest}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DRIVER=${BUILDAH_STORAGE_DRIVER:-vfs}
OUT=${BUILDAH_OUT:-/var/tmp/hunyuan-lora-buildah}
LOG=${LOG:-$OUT/build.log}
SUMMARY=${SUMMARY:-$OUT/summary.txt}
mkdir -p "$OUT"
: >"$LOG"

B=(buildah --storage-driver "$DRIVER")
T0=$(date +%s)
note() { printf '[%s +%4ds] %s\n' "$(date -u +%H:%M:%S)" "$(($(date +%s) - T0))" "$*" | tee -a "$LOG" >&2; }
die() { note "FAILED: $*"; exit 1; }

for tool in buildah debootstrap; do
  if ! command -v "$tool" >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      note "installing $tool (apt-get)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >>"$LOG" 2>&1
    else
      die "$tool is missing: apt-get install buildah debootstrap (as root)"
    fi
  fi
done
[[ $(id -u) == 0 ]] || die "run as root (debootstrap and vfs/chroot buildah need it)"

# --- 1. the local base: Debian bookworm minbase + the archive's updates and security suites -------
if [[ ${BASE_REBUILD:-0} != 1 ]] && "${B[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
  note "step 1/3 base: $BASE already in buildah storage (BASE_REBUILD=1 to remake it)"
else
  note "step 1/3 base: debootstrap --variant=minbase bookworm from $MIRROR"
  work=$(mktemp -d /var/tmp/hunyuan-rootfs.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >>"$LOG" 2>&1 || die "debootstrap (see $LOG)"
  cat >"$work/rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOF
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  note "rootfs: $(du -sh "$work/rootfs" | cut -f1); importing into buildah as $BASE"
  ctr=$("${B[@]}" from scratch)
  mnt=$("${B[@]}" mount "$ctr")
  tar -C "$work/rootfs" -cf - . | tar -C "$mnt" -xf -
  "${B[@]}" umount "$ctr" >/dev/null
  "${B[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash --label org.opencontainers.image.description="debootstrap bookworm minbase" "$ctr"
  "${B[@]}" commit --quiet --format docker "$ctr" "$BASE" >>"$LOG"
  "${B[@]}" rm "$ctr" >/dev/null
  rm -rf "$work"
  trap - EXIT
  note "base ready: $BASE"
fi

# --- 2. the Dockerfile, unchanged, with `make docker-build`'s build args ------------------------
mapfile -t ARGS < <(scripts/image_build_args.sh)
# This machine's way out to PyPI, for the build only (the Dockerfile's build-time ARGs): a mirror,
# and the CA bundle of a TLS-intercepting proxy, bind-mounted read-only into the RUN steps.
EXTRA=()
[[ -n ${PIP_INDEX_URL:-} ]] && ARGS+=("PIP_INDEX_URL=$PIP_INDEX_URL")
if [[ -n ${PIP_CERT:-} && -f $PIP_CERT ]]; then
  EXTRA+=(--volume "$(realpath "$PIP_CERT"):/run/build-ca.crt:ro")
  ARGS+=("PIP_CERT=/run/build-ca.crt")
fi
note "step 2/3 buildah bud --isolation chroot --build-arg BASE_IMAGE=$BASE ${ARGS[*]}"
t_bud=$(date +%s)
set +e
"${B[@]}" bud --isolation chroot --format docker --layers=false \
  --build-arg "BASE_IMAGE=$BASE" "${ARGS[@]/#/--build-arg=}" "${EXTRA[@]}" \
  -f Dockerfile -t "$IMAGE" . 2>&1 |
  while IFS= read -r line; do printf '[+%4ds] %s\n' "$(($(date +%s) - t_bud))" "$line"; done |
  tee -a "$LOG" | grep --line-buffered -E '^\[\+ *[0-9]+s\] (STEP|COMMIT|Successfully|Error|error)' >&2
rc=${PIPESTATUS[0]}
set -e
bud_s=$(($(date +%s) - t_bud))
[[ $rc == 0 ]] || die "buildah bud exited $rc after ${bud_s}s (last step: $(grep -E 'STEP [0-9]+' "$LOG" | tail -1))"
note "bud done in ${bud_s}s"

# --- 3. smoke test: the image runs as its non-root user with the locked environment -------------
note "step 3/3 smoke test"
ctr=$("${B[@]}" from "$IMAGE")
run() { "${B[@]}" run --isolation chroot "$ctr" -- "$@"; }
{
  echo "user: $(run id)"
  echo "workdir: $(run pwd)"
  echo "python: $(run python --version 2>&1)"
  run python -c 'import torch, transformers, peft, hunyuan_lora; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__)'
  echo "make help:"; run make help
  echo "make setup (must be a no-op):"; run make setup
  echo "volumes: $(run ls -ld /models /data /outputs | tr '\n' ';')"
  echo "as an arbitrary uid (docker run --user): $("${B[@]}" run --isolation chroot --user 4242:4242 "$ctr" -- \
    sh -c 'mkdir -p artifacts/probe outputs/probe /models/probe && rm -r artifacts outputs/probe /models/probe && make -s setup && echo writable, make ok')"
  if [[ ${BUILDAH_SMOKE_DEMO:-0} == 1 ]]; then
    echo "make demo (the whole pipeline on the stand-in model, CPU):"
    run make demo
    echo "make watch as docker-watch runs it (dashboard on 0.0.0.0:5092 inside):"
    run sh -c 'timeout 45 make watch CONFIG=configs/demo.yaml "SET=swanlab.host=0.0.0.0 swanlab.port=5092" & sleep 25;
      python -c "import urllib.request as u; print(\"dashboard: HTTP\", u.urlopen(\"http://127.0.0.1:5092/\").status)"; rc=$?; wait; exit $rc'
  fi
} 2>&1 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} == 0 ]] || die "smoke test (see $LOG)"
"${B[@]}" rm "$ctr" >/dev/null

size=$("${B[@]}" images --format '{{.Size}}' "$IMAGE" | head -1)
{
  echo "image: $IMAGE ($size, storage driver $DRIVER)"
  echo "base: $BASE"
  echo "total: $(($(date +%s) - T0))s, bud: ${bud_s}s"
  echo "steps (seconds since bud start):"
  grep -E '^\[\+ *[0-9]+s\] (STEP|COMMIT)' "$LOG"
  echo "labels:"
  "${B[@]}" inspect --type image --format '{{range $k, $v := .Docker.Config.Labels}}  {{$k}}={{$v}}{{"\n"}}{{end}}' "$IMAGE"
} >"$SUMMARY"
if [[ ${BUILDAH_KEEP:-1} == 0 ]]; then "${B[@]}" rmi "$IMAGE" >/dev/null; fi
note "done: $SUMMARY"
cat "$SUMMARY"
