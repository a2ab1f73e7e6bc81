#!/usr/bin/env bash
# Sets everything up, then runs the main job: `pylb demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/pylb demo "$@"
