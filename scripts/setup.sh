#!/usr/bin/env bash
# Installs every Debian package that building, testing and benchmarking kiln needs.
# Idempotent: packages already present are left as they are. Run as root (or with sudo).
#   bash scripts/setup.sh               build + test + bench
#   bash scripts/setup.sh --build-only  what building needs (the container image's build stage)
set -euo pipefail

packages=(
    build-essential cmake ninja-build pkg-config git
    libdnnl-dev ocl-icd-opencl-dev libopenblas-dev
    libyaml-cpp-dev libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
    libxxhash-dev libzstd-dev zlib1g-dev
    libcpp-httplib-dev libsqlite3-dev libjs-chart.js
    libsentencepiece-dev sentencepiece libgloo-dev
)
if [ "${1:-}" != "--build-only" ]; then
    packages+=(
        libgtest-dev libgmock-dev libbenchmark-dev
        python3 python3-numpy python3-torch
        clang-format-14 chromium wrk curl
        clang-14 libclang-rt-14-dev libomp-14-dev
    )
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#packages[@]} packages present"
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "setup: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
