#!/usr/bin/env bash
# README command 1: install what is missing, then start the engine, prepare the bundled example,
# start an instance and show a query result through its DSN (host runtime, no Docker needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-runtime.sh
exec python3 scripts/demo.py "$@"
