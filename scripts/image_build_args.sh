#!/usr/bin/env bash
# The image's build args, one KEY=VALUE a line (no spaces in any value), computed from the repo:
#   LOCK_SHA256      sha256 of requirements.lock (the one list of versions; the image label ties an
#                    image to the exact lock it was installed from)
#   PINNED_VERSIONS  the lock's versions of the direct dependencies in requirements.in, comma-joined
#   VERSION          IMAGE_VERSION, else `git describe --tags --always --dirty`, else pyproject's version
#   REVISION         IMAGE_REVISION, else the git commit
#   SOURCE           IMAGE_SOURCE, else the origin remote as an https URL
# Used by `make docker-build`, scripts/buildah_build.sh and .github/workflows/image.yml, so every
# build of the image carries the same labels.
set -euo pipefail
cd "$(dirname "$0")/.."

lock_sha=$(sha256sum requirements.lock | cut -d' ' -f1)

# Direct dependency names from requirements.in (drop comments, extras, specifiers), normalised.
mapfile -t names < <(sed -E 's/#.*//; s/[[:space:]]//g; /^$/d; s/[][<>=!~;].*//' requirements.in |
  tr 'A-Z_.' 'a-z--' | sort -u)
pins=()
for n in "${names[@]}"; do
  # Lock lines look like "torch==2.11.0 \"; match the name PEP 503-normalised.
  v=$(awk -v want="$n" '
    /^[A-Za-z0-9]/ && /==/ { split($1, a, "=="); k = tolower(a[1]); gsub(/[_.]/, "-", k);
                            if (k == want) { print a[2]; exit } }' requirements.lock)
  [[ -n $v ]] && pins+=("$n==$v")
done
pinned=$(IFS=,; echo "${pins[*]}")

version=${IMAGE_VERSION:-$(git describe --tags --always --dirty 2>/dev/null ||
  sed -nE 's/^version *= *"([^"]+)".*/v\1/p' pyproject.toml)}
revision=${IMAGE_REVISION:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
source=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null |
  sed -E 's#^git@([^:]+):#https://\1/#; s#\.git$##' || true)}

echo "LOCK_SHA256=$lock_sha"
echo "PINNED_VERSIONS=$pinned"
echo "VERSION=${version:-dev}"
echo "REVISION=$revision"
echo "SOURCE=${source:-unknown}"
