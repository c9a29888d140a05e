#!/usr/bin/env bash
# Sets up, builds and runs the test suite (every CTest label except `slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
cd build
ctest --output-on-failure -j 2 -LE slow "$@"
