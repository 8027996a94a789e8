#!/usr/bin/env bash
# Install what the real-browser test needs, idempotently: Debian's Chromium (/usr/bin/chromium) and
# playwright-core (pinned in tests/browser/package-lock.json) into tests/browser/node_modules.
# Runs unattended (CI: root, no stdin). A second run only checks and takes about a second.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
browser_dir="$repo/tests/browser"

log() { echo "[setup_browser] $*" >&2; }

if [ ! -x /usr/bin/chromium ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "no /usr/bin/chromium and no apt-get: install Chromium with your package manager"
    exit 1
  fi
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    sudo_cmd=(sudo -n)
  fi
  log "installing Debian's chromium"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
/usr/bin/chromium --version >&2

if ! command -v npm >/dev/null 2>&1; then
  log "npm not found: install Node.js >= 20 and npm"
  exit 1
fi
if [ ! -f "$browser_dir/node_modules/playwright-core/package.json" ]; then
  log "installing playwright-core into tests/browser/node_modules"
  # The package's own browser download is never used: the test drives Debian's Chromium.
  (cd "$browser_dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >&2)
fi
node -e "console.error('[setup_browser] playwright-core ' + require('$browser_dir/node_modules/playwright-core/package.json').version)"
