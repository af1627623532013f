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
# the unit part collects only the files that are unit tests as a whole (tests/test_layers.py
# holds every other file to that), so it does not import and rewrite the whole suite
if [ "$#" -eq 0 ]; then
  mapfile -t unit_files < <(grep -l '^pytestmark = pytest.mark.unit$' tests/test_*.py)
  python3 -m pytest -q -p no:cacheprovider -m unit "${unit_files[@]}"
else
  python3 -m pytest -q -p no:cacheprovider -m unit "$@"
fi
echo "unit tests: $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
python3 -m pytest -q -p no:cacheprovider -m "not unit" "$@"
