#!/usr/bin/env bash
# Builds the shim and its cffi module into a private directory, for working on
# native/ while others use the main build:
#   scripts/build-native.sh /tmp/mybuild && PYLB_BUILD_DIR=/tmp/mybuild .venv/bin/python -m pytest ...
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(realpath -m "${1:?usage: build-native.sh DIR}")
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release ${PYLB_CMAKE_ARGS:-} >/dev/null
cmake --build "$dir" -j "$(nproc)" 2>&1 | grep -Ev '^\[|^-- ' || true
test -f "$dir/libpylb_native.so"
.venv/bin/python pylb/_build_ffi.py "$dir" "$dir"
