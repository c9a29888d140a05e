#!/usr/bin/env bash
# Builds the fuzz targets (tests/fuzz) with clang, libFuzzer and ASan/UBSan in build-fuzz/ and
# runs each for SECONDS (default 60), one after another, printing each target's execution count.
# A crash, sanitizer report, hang or memory blow-up stops with the report and the saved input.
#   bash scripts/fuzz.sh [SECONDS]
# Needs clang-14, libclang-rt-14-dev and libomp-14-dev (scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 -DKILN_FUZZ=ON -DKILN_CUDA=OFF \
    -DKILN_FUZZ_SLOW_SECONDS="$seconds" >/dev/null
cmake --build build-fuzz --target fuzz -j "$(nproc)"
cd build-fuzz
rm -f fuzz/*.summary
status=0
ctest -L slow -R '^fuzz_' --output-on-failure || status=$?
cat fuzz/*.summary
exit $status
