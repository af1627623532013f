#!/usr/bin/env bash
# README command 2: install the test dependencies and run the whole test suite (CI calls this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-runtime.sh
bash scripts/setup-liquibase.sh  # Java 17 and Liquibase 4.28 for the lb tests
if [ "${SQLRS_SKIP_DOCKER_TESTS:-}" != "1" ]; then
  bash scripts/setup-docker.sh
  bash scripts/setup-registry.sh
fi
bash scripts/setup-nonroot.sh  # the sqlrs-dev account and its venv: the engine as yourself
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
ruff check .
mypy
started=$EPOCHREALTIME
python3 -m pytest -q -p no:cacheprovider -m unit "$@"
echo "unit tests: $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
python3 -m pytest -q -p no:cacheprovider -m "not unit" "$@"
