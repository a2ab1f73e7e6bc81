#!/usr/bin/env bash
# Sets everything up, then runs the main job: `pylb lab demo`, the churn demo
# on a cluster of network namespaces (docs/lab.md). `pylb demo` is the
# single-balancer job.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/pylb lab demo "$@"
