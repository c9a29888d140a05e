#!/usr/bin/env bash
# Checks (or with --fix, applies) the project's C++ formatting with the pinned clang-format-14.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.cpp' '*.h' '*.cu')
if [ "${1:-}" = "--fix" ]; then
    clang-format-14 -i "${files[@]}"
else
    clang-format-14 --dry-run --Werror "${files[@]}"
    echo "format: ${#files[@]} files clean"
fi
