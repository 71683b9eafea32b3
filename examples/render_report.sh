#!/usr/bin/env bash
# Render an HTML report to a PNG in headless Chromium (Debian: apt-get install chromium),
# to check what a browser shows, with no server and no network.
#   bash examples/render_report.sh outputs/callback_demo/report/report.html report.png
set -euo pipefail
page="$(realpath "$1")"
png="$(realpath -m "${2:-${page%.html}.png}")"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --hide-scrollbars --window-size=1300,2400 \
  --screenshot="$png" "file://$page" 2>/dev/null
echo "rendered $page -> $png"
