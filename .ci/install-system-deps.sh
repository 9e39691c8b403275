#!/usr/bin/env bash
# Install the system packages the tests need: QEMU, static busybox, gdb, makedumpfile for the
# real-guest tests; chromium to render the HTML report headless; gcc to build the compiled
# kernels (ksm_analyze/hashing/_compiled.c), which the tests check; the compressors libvirt
# pipes save images through (the compressed-wrapper and libvirt tests call the real CLIs).
# Idempotent: does nothing when all are installed; runs apt-get update only when one is missing.
set -euo pipefail

packages=(qemu-system-x86 busybox-static gdb makedumpfile chromium gcc libc6-dev
          gzip bzip2 xz-utils zstd lzop)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
echo "install-system-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
