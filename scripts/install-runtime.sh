#!/usr/bin/env bash
# Installs what the engine needs at run time on Debian (as root): PostgreSQL 15 server binaries
# and the engine's Python libraries. Skips whatever is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold \
    postgresql-15 >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e .
