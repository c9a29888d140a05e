#!/usr/bin/env bash
# Installs every Debian package that building, testing and benchmarking kiln needs.
# Idempotent: packages already present are left as they are. Run as root (or with sudo).
#   bash scripts/setup.sh               build + test + bench
#   bash scripts/setup.sh --build-only  what building needs (the container image's build stage)
# Testing also installs llama.cpp, through node-llama-cpp's prebuilt linux-x64 binary from the
# npm registry, into tests/export/llama_cpp/node_modules (pinned by its package-lock.json; 3.6.0
# is the newest release that runs on Debian 12's node 18): tests/export/test_gguf.cpp loads
# kiln's GGUF files in it.
set -euo pipefail
cd "$(dirname "$0")/.."

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
        iproute2 ca-certificates
    )
    # Debian's node 18 and npm, unless a node is already installed (from elsewhere).
    command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
fi

# The llama.cpp check's packages (not for --build-only): the registry's, no install scripts.
install_llama_cpp() {
    [ "${1:-}" != "--build-only" ] || return 0
    if [ "$(uname -m)" != x86_64 ]; then
        echo "setup: node-llama-cpp ships linux-x64 only; the llama.cpp test will skip"
        return 0
    fi
    local dir=tests/export/llama_cpp
    if [ -f $dir/node_modules/node-llama-cpp/package.json ] &&
       [ -f $dir/node_modules/@node-llama-cpp/linux-x64/package.json ]; then
        echo "setup: node-llama-cpp present in $dir"
        return 0
    fi
    echo "setup: installing node-llama-cpp into $dir"
    # node trusts only its own built-in authorities; the system's bundle also holds those a
    # network that inspects TLS adds to /usr/local/share/ca-certificates.
    local ca=/etc/ssl/certs/ca-certificates.crt
    [ -n "${NODE_EXTRA_CA_CERTS:-}" ] || [ ! -f $ca ] || export NODE_EXTRA_CA_CERTS=$ca
    (cd $dir && npm ci --ignore-scripts --omit=optional --no-audit --no-fund --loglevel=error)
}

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#packages[@]} packages present"
else
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
install_llama_cpp "${1:-}"
