#!/usr/bin/env bash
# Prepare this (root) machine for the tests that run the engine as an ordinary user, as a
# developer runs it on a laptop: the account `sqlrs-dev` (in the `docker` group when Docker is
# installed) and a virtual environment it can read, /opt/sqlrs-dev-venv, built on Debian's
# python3 with the engine's three run-time dependencies (root's interpreter may live in /root,
# which other users cannot enter). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
USER_NAME=${SQLRS_DEV_USER:-sqlrs-dev}
VENV=${SQLRS_DEV_VENV:-/opt/sqlrs-dev-venv}
log() { printf '[setup-nonroot] %s\n' "$*"; }

[[ $(id -u) -eq 0 ]] || { log "must run as root"; exit 1; }
if ! /usr/bin/python3 -m venv --help >/dev/null 2>&1 || ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
  log "installing python3-venv"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
fi
if ! id "$USER_NAME" >/dev/null 2>&1; then
  log "creating user $USER_NAME"
  useradd --create-home --shell /bin/bash "$USER_NAME"
fi
if getent group docker >/dev/null; then
  usermod -a -G docker "$USER_NAME"
fi
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import docker, psycopg2, typing_extensions' 2>/dev/null; then
  log "building $VENV"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'docker>=7.0' 'psycopg2-binary>=2.9' 'typing-extensions>=4.7'
fi
chmod -R a+rX "$VENV"
log "ready: $USER_NAME ($(id -nG "$USER_NAME")), $VENV ($("$VENV/bin/python" --version))"
