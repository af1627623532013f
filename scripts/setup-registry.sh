#!/usr/bin/env bash
# Prepare local Docker registries for sqlrs-engine's image-pull tests (tests/test_registry.py):
#   1. install Debian's docker-registry and skopeo packages when missing,
#   2. start a registry on 127.0.0.1:5000 without auth (no systemd here: a setsid'd background
#      process; config /etc/docker/registry/sqlrs-test.yml, storage /var/lib/docker-registry,
#      log /var/log/docker-registry-sqlrs.log),
#   3. start a second registry on 127.0.0.1:5001 with htpasswd basic auth (realm "sqlrs-test"):
#        user      sqlrs-test
#        password  sqlrs-test-secret
#      config /etc/docker/registry/sqlrs-test-auth.yml, password file
#      /etc/docker/registry/sqlrs-test.htpasswd (bcrypt), storage
#      /var/lib/docker-registry-sqlrs-test-auth, log /var/log/docker-registry-sqlrs-test-auth.log;
#      GET /v2/ answers 401 without credentials and 200 with them,
#   4. put a copy of the test image in the first one as 127.0.0.1:5000/sqlrs-test/postgres:15
#      (the second one starts empty; fill it with e.g. `skopeo copy --src-tls-verify=false
#      --dest-tls-verify=false --dest-creds sqlrs-test:sqlrs-test-secret SRC DST`).
# Both serve plain HTTP on loopback only (no TLS) and have deletes enabled (storage.delete), so
# tests may delete manifests. The credentials are test fixtures, not secrets.
# Idempotent: each phase is skipped when its result already exists. Needs scripts/setup-docker.sh
# (dockerd running, image sqlrs-test/postgres:15 built) first.
#
# The bcrypt hash is made with python3's crypt module when it can (libxcrypt; Python <= 3.12);
# otherwise with htpasswd, installing apache2-utils for it.
#
# The copy is a LABEL-only child of the test image (same layers, its own image id), not a second
# tag of it: pushing records a RepoDigest on the pushed image id, and a RepoDigest on
# sqlrs-test/postgres:15 itself would change how the engine resolves that image for every other
# Docker test.
#
# Environment overrides:
#   SQLRS_TEST_IMAGE           source image (default sqlrs-test/postgres:15)
#   SQLRS_REGISTRY_TIMEOUT     seconds to wait for each registry to answer (default 30)
set -euo pipefail

SOURCE=${SQLRS_TEST_IMAGE:-sqlrs-test/postgres:15}
ADDR=127.0.0.1:5000
REPO=${SOURCE%%@*}
TAG=latest
if [[ ${REPO##*/} == *:* ]]; then TAG=${REPO##*:}; REPO=${REPO%:*}; fi
TARGET=$ADDR/$REPO:$TAG  # what tests/test_registry.py pulls
# Debian's /etc/docker/registry/config.yml (a dpkg conffile) listens on :5000 (all interfaces)
# and enables htpasswd auth with a directory as the password file, so every request gets a 401.
# We leave it untouched and serve our own configs instead.
CONFIG=/etc/docker/registry/sqlrs-test.yml
STORAGE=/var/lib/docker-registry
LOG=/var/log/docker-registry-sqlrs.log
# The second registry, with basic auth.
AUTH_ADDR=127.0.0.1:5001
AUTH_CONFIG=/etc/docker/registry/sqlrs-test-auth.yml
AUTH_STORAGE=/var/lib/docker-registry-sqlrs-test-auth
AUTH_LOG=/var/log/docker-registry-sqlrs-test-auth.log
AUTH_REALM=sqlrs-test
AUTH_USER=sqlrs-test
AUTH_PASSWORD=sqlrs-test-secret
HTPASSWD=/etc/docker/registry/sqlrs-test.htpasswd
# bcrypt cost: the registry checks the password on every request, and 5 (htpasswd -B's
# default) keeps that at about a millisecond.
BCRYPT_COST=5
TIMEOUT=${SQLRS_REGISTRY_TIMEOUT:-30}
BASE_LABEL=org.sqlrs.test.base-image

log() { printf '[setup-registry] %s\n' "$*"; }
die() { printf '[setup-registry] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v docker >/dev/null 2>&1 || die "docker missing: run scripts/setup-docker.sh first"
docker image inspect "$SOURCE" >/dev/null 2>&1 ||
  die "image $SOURCE missing: run scripts/setup-docker.sh first"

# Serialize concurrent runs (fd 9 is closed for the registry processes).
exec 9>/var/lock/sqlrs-setup-registry.lock
flock -w 300 9 || die "another setup-registry.sh run holds /var/lock/sqlrs-setup-registry.lock"

# bcrypt with python3's crypt module: py_bcrypt PASSWORD [SETTING] prints the hash (SETTING: a
# salt or an existing hash to check against; default a new salt). Fails when the module is gone
# (Python 3.13) or libcrypt can't do bcrypt.
py_bcrypt() {
  python3 -W ignore::DeprecationWarning - "$BCRYPT_COST" "$@" 2>/dev/null <<'EOF'
import crypt, sys
cost, password = int(sys.argv[1]), sys.argv[2]
setting = sys.argv[3] if len(sys.argv) > 3 else crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=2**cost)
hashed = crypt.crypt(password, setting)
if not (hashed or "").startswith("$2"):
    sys.exit(1)
print(hashed)
EOF
}

# --- 1. packages --------------------------------------------------------------
BCRYPT_TOOL=python
py_bcrypt probe >/dev/null || BCRYPT_TOOL=htpasswd
packages=()
[[ -x /usr/bin/docker-registry ]] || packages+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || packages+=(skopeo)
if [[ $BCRYPT_TOOL == htpasswd ]] && ! command -v htpasswd >/dev/null 2>&1; then
  packages+=(apache2-utils)  # python3 can't make bcrypt hashes here
fi
if ((${#packages[@]} == 0)); then
  log "skip apt: docker-registry and skopeo already installed (bcrypt via $BCRYPT_TOOL)"
else
  log "installing ${packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${packages[@]}"
fi
command -v curl >/dev/null 2>&1 || die "curl missing"
command -v skopeo >/dev/null 2>&1 || die "skopeo missing after apt"

# --- 2.-3. registries ------------------------------------------------------------
# http_code URL [CURL_ARGS...]: the status of GET URL ('000' when nothing answers).
http_code() {
  local url=$1
  shift
  curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "$@" "$url" 2>/dev/null || true
}
registry_answers() { [[ $(http_code "http://$ADDR/v2/") == 200 ]]; }
auth_registry_answers() {
  [[ $(http_code "http://$AUTH_ADDR/v2/") == 401 &&
    $(http_code "http://$AUTH_ADDR/v2/" -u "$AUTH_USER:$AUTH_PASSWORD") == 200 ]]
}

# write_config CONFIG ADDR STORAGE DESCRIPTION [AUTH_YAML]: (re)write CONFIG when it differs.
write_config() {
  local config=$1 addr=$2 storage=$3 description=$4 auth=${5:-} tmp
  tmp=$(mktemp "$config.XXXXXX")
  {
    cat <<EOF
# Written by sqlrs-engine's scripts/setup-registry.sh: Debian's config.yml $description,
# listening on loopback only.
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: $storage
  delete:
    enabled: true
http:
  addr: $addr
  headers:
    X-Content-Type-Options: [nosniff]
EOF
    [[ -z $auth ]] || printf '%s\n' "$auth"
    cat <<EOF
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
EOF
  } >"$tmp"
  chmod 644 "$tmp"
  if cmp -s "$tmp" "$config"; then rm -f "$tmp"; else mv "$tmp" "$config"; fi
}

# start_registry ADDR CONFIG STORAGE LOG READY_FN: serve CONFIG in the background and wait until
# READY_FN succeeds.
start_registry() {
  local addr=$1 config=$2 storage=$3 logfile=$4 ready=$5 pid deadline
  install -d -o docker-registry -g docker-registry "$storage"
  log "starting docker-registry serve $config (log: $logfile)"
  printf '\n=== %s setup-registry.sh ===\n' "$(date -Is)" >>"$logfile"
  # As the systemd unit does: run as the package's docker-registry user. 9>&-: the long-lived
  # process must not keep our lock.
  setsid nohup setpriv --reuid=docker-registry --regid=docker-registry --init-groups \
    /usr/bin/docker-registry serve "$config" </dev/null >>"$logfile" 2>&1 9>&- &
  pid=$!
  deadline=$((SECONDS + TIMEOUT))
  until "$ready"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 15 "$logfile" | sed 's/^/    /' >&2
      die "docker-registry exited early (see $logfile)"
    fi
    ((SECONDS < deadline)) ||
      die "registry did not answer on $addr within ${TIMEOUT}s (see $logfile)"
    sleep 0.2
  done
  log "registry answers on $addr (pid $pid)"
}

# 2. 127.0.0.1:5000, no auth.
if registry_answers; then
  log "skip registry start: a registry already answers on $ADDR"
else
  [[ $(http_code "http://$ADDR/") == 000 ]] ||
    die "something on $ADDR answers HTTP but not as an anonymous registry (GET /v2/ failed)"
  write_config "$CONFIG" "$ADDR" "$STORAGE" "without auth"
  start_registry "$ADDR" "$CONFIG" "$STORAGE" "$LOG" registry_answers
fi

# 3. 127.0.0.1:5001, htpasswd auth. The password file first: a running registry rereads it
# when it changes.
htpasswd_valid() {  # $HTPASSWD has a bcrypt entry for $AUTH_USER with $AUTH_PASSWORD
  local hash
  [[ -f $HTPASSWD ]] || return 1
  hash=$(awk -F: -v user="$AUTH_USER" '$1 == user { print $2; exit }' "$HTPASSWD")
  [[ $hash == '$2'* ]] || return 1
  if [[ $BCRYPT_TOOL == python ]]; then
    [[ $(py_bcrypt "$AUTH_PASSWORD" "$hash") == "$hash" ]]
  else
    htpasswd -vb "$HTPASSWD" "$AUTH_USER" "$AUTH_PASSWORD" >/dev/null 2>&1
  fi
}
if htpasswd_valid; then
  log "skip $HTPASSWD: it has $AUTH_USER"
else
  log "writing $HTPASSWD (user $AUTH_USER, bcrypt via $BCRYPT_TOOL)"
  tmp=$(mktemp "$HTPASSWD.XXXXXX")
  if [[ $BCRYPT_TOOL == python ]]; then
    printf '%s:%s\n' "$AUTH_USER" "$(py_bcrypt "$AUTH_PASSWORD")" >"$tmp"
  else
    htpasswd -nbB -C "$BCRYPT_COST" "$AUTH_USER" "$AUTH_PASSWORD" | sed '/^$/d' >"$tmp"
  fi
  chown root:docker-registry "$tmp"
  chmod 640 "$tmp"
  mv "$tmp" "$HTPASSWD"
  htpasswd_valid || die "$HTPASSWD does not verify after writing it"
fi
if auth_registry_answers; then
  log "skip registry start: a registry with basic auth for $AUTH_USER answers on $AUTH_ADDR"
else
  [[ $(http_code "http://$AUTH_ADDR/") == 000 ]] || die "something on $AUTH_ADDR answers HTTP" \
    "but not as a registry with basic auth for $AUTH_USER (GET /v2/: 401 without credentials," \
    "200 with them)"
  write_config "$AUTH_CONFIG" "$AUTH_ADDR" "$AUTH_STORAGE" "with htpasswd auth" "auth:
  htpasswd:
    realm: $AUTH_REALM
    path: $HTPASSWD"
  start_registry "$AUTH_ADDR" "$AUTH_CONFIG" "$AUTH_STORAGE" "$AUTH_LOG" auth_registry_answers
fi

# --- 4. image -----------------------------------------------------------------
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
