#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite. pytest's "no tests ran"
# (exit 5) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
