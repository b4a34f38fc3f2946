#!/usr/bin/env bash
# Renders an mmsp report (and a campaign page) in headless Chromium and saves PNG screenshots,
# to look at the pages as a user would. Not part of CI: it needs Debian's `chromium` package
# (installed here with apt-get when run as root).
#
# Usage: scripts/screenshot.sh [OUT_DIR]   (default: target/screenshots)
# Writes OUT_DIR/report/ (mmsp report with defaults), OUT_DIR/campaign/ (examples/campaign.toml)
# and OUT_DIR/report.png, OUT_DIR/campaign.png.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/screenshots}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is needed (Debian: apt-get install chromium)" >&2
    exit 1
  fi
fi

cargo build --release -q -p mmsp-planner
./target/release/mmsp report --quiet --out "$out/report"
./target/release/mmsp campaign examples/campaign.toml --out "$out/campaign" >/dev/null

shot() { # shot PAGE PNG HEIGHT
  local profile
  profile="$(mktemp -d)"
  chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
    --hide-scrollbars --screenshot="$2" --window-size="1400,$3" "file://$1" >/dev/null 2>&1
  rm -rf "$profile"
  echo "wrote $2"
}
shot "$out/report/report.html" "$out/report.png" 3000
shot "$out/campaign/campaign.html" "$out/campaign.png" 1100
