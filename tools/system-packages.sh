#!/usr/bin/env bash
# The system packages the test suite needs, installed when missing: chromium (the HTML report is rendered in
# headless Chromium). As root (or with passwordless sudo) on a system with apt-get they are installed; otherwise
# this says which command to run and fails.
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "make test needs: ${missing[*]} (not found on PATH). Install it with your system's package manager." >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo"
else
    echo "make test needs: ${missing[*]}. Install it with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "installing ${missing[*]} (apt-get)" >&2
$SUDO apt-get update -qq >/dev/null
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
