#!/usr/bin/env bash
# Sets up, checks formatting, builds and runs the test suite (every CTest label but `slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/format.sh
bash scripts/build.sh
cd build
ctest --output-on-failure -j 2 -LE slow "$@"
