#!/usr/bin/env bash
# System packages the test suite uses beyond the locked venv: Debian's Chromium + ChromeDriver for
# the dashboard's browser test. Installed when missing and possible (root with apt-get); otherwise
# the browser test skips and says why. Idempotent: nothing happens when they are there.
set -uo pipefail
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && exit 0
skip() { echo "WARNING: $1; the dashboard browser test (tests/test_dashboard.py) will SKIP" >&2; exit 0; }
{ [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; } || skip "installing chromium needs root and apt-get"
export DEBIAN_FRONTEND=noninteractive
echo "installing chromium + chromium-driver with apt-get for the dashboard browser test (once; about 300 MB)" >&2
apt-get update -qq >/dev/null \
  && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null \
  || skip "apt-get could not install chromium chromium-driver"
