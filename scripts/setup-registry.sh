#!/usr/bin/env bash
# Prepare a local Docker registry for sqlrs-engine's image-pull tests (tests/test_registry.py):
#   1. install Debian's docker-registry package when missing,
#   2. start a registry on 127.0.0.1:5000 (no systemd here: a setsid'd background process),
#   3. put a copy of the test image in it as 127.0.0.1:5000/sqlrs-test/postgres:15.
# Idempotent: each phase is skipped when its result already exists. Needs scripts/setup-docker.sh
# (dockerd running, image sqlrs-test/postgres:15 built) first.
#
# The copy is a LABEL-only child of the test image (same layers, its own image id), not a second
# tag of it: pushing records a RepoDigest on the pushed image id, and a RepoDigest on
# sqlrs-test/postgres:15 itself would change how the engine resolves that image for every other
# Docker test.
#
# Environment overrides:
#   SQLRS_TEST_IMAGE           source image (default sqlrs-test/postgres:15)
#   SQLRS_REGISTRY_TIMEOUT     seconds to wait for the registry to answer (default 30)
set -euo pipefail

SOURCE=${SQLRS_TEST_IMAGE:-sqlrs-test/postgres:15}
ADDR=127.0.0.1:5000
REPO=${SOURCE%%@*}
TAG=latest
if [[ ${REPO##*/} == *:* ]]; then TAG=${REPO##*:}; REPO=${REPO%:*}; fi
TARGET=$ADDR/$REPO:$TAG  # what tests/test_registry.py pulls
# Debian's /etc/docker/registry/config.yml (a dpkg conffile) listens on :5000 (all interfaces)
# and enables htpasswd auth with a directory as the password file, so every request gets a 401.
# We leave it untouched and serve our own config instead.
CONFIG=/etc/docker/registry/sqlrs-test.yml
STORAGE=/var/lib/docker-registry
LOG=/var/log/docker-registry-sqlrs.log
TIMEOUT=${SQLRS_REGISTRY_TIMEOUT:-30}
BASE_LABEL=org.sqlrs.test.base-image

log() { printf '[setup-registry] %s\n' "$*"; }
die() { printf '[setup-registry] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v docker >/dev/null 2>&1 || die "docker missing: run scripts/setup-docker.sh first"
docker image inspect "$SOURCE" >/dev/null 2>&1 ||
  die "image $SOURCE missing: run scripts/setup-docker.sh first"

# Serialize concurrent runs (fd 9 is closed for the registry process).
exec 9>/var/lock/sqlrs-setup-registry.lock
flock -w 300 9 || die "another setup-registry.sh run holds /var/lock/sqlrs-setup-registry.lock"

# --- 1. package ---------------------------------------------------------------
if [[ -x /usr/bin/docker-registry ]]; then
  log "skip apt: docker-registry already installed"
else
  log "installing docker-registry"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends docker-registry
fi
command -v curl >/dev/null 2>&1 || die "curl missing"

# --- 2. registry --------------------------------------------------------------
registry_answers() { curl -fsS --max-time 5 "http://$ADDR/v2/" >/dev/null 2>&1; }

write_config() {
  local tmp
  tmp=$(mktemp "$CONFIG.XXXXXX")
  cat >"$tmp" <<EOF
# Written by sqlrs-engine's scripts/setup-registry.sh: Debian's config.yml without auth,
# listening on loopback only.
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: $STORAGE
  delete:
    enabled: true
http:
  addr: $ADDR
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
EOF
  chmod 644 "$tmp"
  if cmp -s "$tmp" "$CONFIG"; then rm -f "$tmp"; else mv "$tmp" "$CONFIG"; fi
}

if registry_answers; then
  log "skip registry start: a registry already answers on $ADDR"
else
  if curl -sS --max-time 5 -o /dev/null "http://$ADDR/" 2>/dev/null; then
    die "something on $ADDR answers HTTP but not as an anonymous registry (GET /v2/ failed)"
  fi
  write_config
  install -d -o docker-registry -g docker-registry "$STORAGE"
  log "starting docker-registry serve $CONFIG (log: $LOG)"
  printf '\n=== %s setup-registry.sh ===\n' "$(date -Is)" >>"$LOG"
  # As the systemd unit does: run as the package's docker-registry user. 9>&-: the long-lived
  # process must not keep our lock.
  setsid nohup setpriv --reuid=docker-registry --regid=docker-registry --init-groups \
    /usr/bin/docker-registry serve "$CONFIG" </dev/null >>"$LOG" 2>&1 9>&- &
  pid=$!
  deadline=$((SECONDS + TIMEOUT))
  until registry_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 15 "$LOG" | sed 's/^/    /' >&2
      die "docker-registry exited early (see $LOG)"
    fi
    ((SECONDS < deadline)) || die "registry did not answer on $ADDR within ${TIMEOUT}s (see $LOG)"
    sleep 0.2
  done
  log "registry answers on $ADDR (pid $pid)"
fi

# --- 3. image -----------------------------------------------------------------
source_id=$(docker image inspect --format '{{.Id}}' "$SOURCE")

# The base image id the registry's copy was built from ('' when there is no copy).
registry_copy_base() {
  local accept=application/vnd.docker.distribution.manifest.v2+json manifest config
  manifest=$(curl -fsS --max-time 10 -H "Accept: $accept" \
    "http://$ADDR/v2/$REPO/manifests/$TAG" 2>/dev/null) || return 0
  config=$(printf '%s' "$manifest" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["config"]["digest"])') || return 0
  curl -fsS --max-time 10 "http://$ADDR/v2/$REPO/blobs/$config" 2>/dev/null |
    python3 -c 'import json, sys
labels = json.load(sys.stdin).get("config", {}).get("Labels") or {}
print(labels.get(sys.argv[1], ""))' "$BASE_LABEL" || true
}

if [[ $(registry_copy_base) == "$source_id" ]]; then
  log "skip push: $TARGET is in the registry (built from $SOURCE $source_id)"
else
  local_base=$(docker image inspect --format "{{index .Config.Labels \"$BASE_LABEL\"}}" \
    "$TARGET" 2>/dev/null) || local_base=''
  if [[ $local_base != "$source_id" ]]; then
    log "building $TARGET: $SOURCE + LABEL $BASE_LABEL=$source_id"
    # The classic builder needs no registry for a local FROM image (its deprecation notice on
    # stderr is only shown when the build fails).
    if ! out=$(printf 'FROM %s\nLABEL %s=%s\n' "$SOURCE" "$BASE_LABEL" "$source_id" |
      DOCKER_BUILDKIT=0 docker build -q -t "$TARGET" - 2>&1); then
      printf '%s\n' "$out" >&2
      die "docker build of $TARGET failed"
    fi
  fi
  log "docker push $TARGET"
  docker push "$TARGET" >/dev/null
  [[ $(registry_copy_base) == "$source_id" ]] || die "push of $TARGET did not reach the registry"
fi
log "source image $SOURCE keeps RepoDigests $(docker image inspect --format '{{json .RepoDigests}}' "$SOURCE")"
echo "registry ready; $TARGET present in http://$ADDR"
