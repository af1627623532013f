#!/usr/bin/env bash
# Prepare this (Debian bookworm, root) machine for sqlrs-engine's Docker tests:
#   1. install Debian's docker.io + debootstrap when missing,
#   2. start dockerd in the background when no daemon answers,
#   3. build the local image sqlrs-test/postgres:15 from a debootstrapped
#      rootfs (no Docker registry needed),
#   4. verify the image and loopback port publishing.
# Idempotent: each phase is skipped when its result already exists.
#
# Environment overrides:
#   SQLRS_TEST_IMAGE               image tag        (default sqlrs-test/postgres:15)
#   SQLRS_TEST_ROOTFS              rootfs cache dir (default /var/cache/sqlrs-test/rootfs-bookworm-pg15)
#   SQLRS_TEST_ROOTFS_TAR          rootfs tarball   (default $SQLRS_TEST_ROOTFS.tar)
#   SQLRS_DEBIAN_MIRROR            debootstrap mirror (default: read from apt sources)
#   SQLRS_DOCKER_STORAGE_DRIVER    force a storage driver (default: probe overlay2, else vfs)
#   SQLRS_DOCKER_IPTABLES          true|false (default: probe iptables)
#   SQLRS_DOCKERD_TIMEOUT          seconds to wait for dockerd (default 60)
#   SQLRS_SKIP_PORT_CHECK=1        skip the published-port check
set -euo pipefail

IMAGE=${SQLRS_TEST_IMAGE:-sqlrs-test/postgres:15}
ROOTFS=${SQLRS_TEST_ROOTFS:-/var/cache/sqlrs-test/rootfs-bookworm-pg15}
ROOTFS_TAR=${SQLRS_TEST_ROOTFS_TAR:-$ROOTFS.tar}
ROOTFS_MARKER=$ROOTFS.complete # sibling file, so it never ends up in the image
SUITE=bookworm
PG_BIN=/usr/lib/postgresql/15/bin
DOCKERD_LOG=/var/log/dockerd.log
DOCKERD_TIMEOUT=${SQLRS_DOCKERD_TIMEOUT:-60}
DOCKER_DATA_ROOT=/var/lib/docker

log() { printf '[setup-docker] %s\n' "$*"; }
die() { printf '[setup-docker] ERROR: %s\n' "$*" >&2; exit 1; }

# --- phase timing -----------------------------------------------------------
declare -a TIMINGS=()
PHASE_NAME='' PHASE_T0=''
phase_begin() { PHASE_NAME=$1; PHASE_T0=$EPOCHREALTIME; }
phase_end() { # $1: note (e.g. "skipped")
  local dt
  dt=$(awk -v a="$PHASE_T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  TIMINGS+=("$(printf '%-16s %7ss  %s' "$PHASE_NAME" "$dt" "${1:-}")")
}

[[ $(id -u) -eq 0 ]] || die "must run as root"

# Serialize concurrent runs (fd 9 is closed for dockerd, see start_dockerd).
exec 9>/var/lock/sqlrs-setup-docker.lock
flock -w 900 9 || die "another setup-docker.sh run holds /var/lock/sqlrs-setup-docker.lock"

# --- 1. packages --------------------------------------------------------------
phase_begin apt
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
[[ -r /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
if ((${#missing[@]})); then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  phase_end "installed ${missing[*]}"
else
  log "skip apt: dockerd and debootstrap already installed"
  phase_end skipped
fi

# --- 2. dockerd ---------------------------------------------------------------
docker_answers() { timeout 5 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# Can overlayfs (with several lower dirs, as overlay2 needs) be mounted on the
# filesystem holding Docker's data root? Fails e.g. for overlay-on-overlay.
overlay_works() {
  local d rc=1
  mkdir -p "$DOCKER_DATA_ROOT" && chmod 710 "$DOCKER_DATA_ROOT"
  d=$(mktemp -d "$DOCKER_DATA_ROOT/.sqlrs-overlay-probe.XXXXXX")
  mkdir "$d"/{l1,l2,upper,work,merged}
  touch "$d/l1/probe"
  if mount -t overlay overlay \
      -o "lowerdir=$d/l1:$d/l2,upperdir=$d/upper,workdir=$d/work" "$d/merged" 2>/dev/null; then
    [[ -e $d/merged/probe ]] && rc=0
    umount "$d/merged"
  fi
  rm -rf --one-file-system "$d"
  return $rc
}

# Does iptables (nft or legacy backend, whatever the alternative points to) work?
iptables_works() {
  command -v iptables >/dev/null 2>&1 &&
    iptables -t nat -S >/dev/null 2>&1 && iptables -t filter -S >/dev/null 2>&1
}

# start_dockerd DRIVER IPTABLES(true|false): start and wait until it answers.
start_dockerd() {
  local driver=$1 ipt=$2 pid deadline
  local -a args=(--storage-driver="$driver")
  # Without iptables, docker-proxy (userland proxy, the default) still serves
  # -p 127.0.0.1::PORT; only container egress NAT is lost, which we don't need.
  [[ $ipt == true ]] || args+=(--iptables=false --ip-masq=false)
  log "starting dockerd ${args[*]} (log: $DOCKERD_LOG)"
  printf '\n=== %s setup-docker.sh: dockerd %s ===\n' "$(date -Is)" "${args[*]}" >>"$DOCKERD_LOG"
  # 9>&-: the long-lived daemon must not inherit (and keep) our lock.
  setsid nohup dockerd "${args[@]}" </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
  pid=$!
  deadline=$((SECONDS + DOCKERD_TIMEOUT))
  until docker_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "dockerd exited early; last log lines:"
      tail -n 15 "$DOCKERD_LOG" | sed 's/^/    /'
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "dockerd did not answer within ${DOCKERD_TIMEOUT}s; stopping it"
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
  log "dockerd answers (pid $pid, storage driver $driver, iptables $ipt)"
}

phase_begin dockerd-start
if docker_answers; then
  log "skip dockerd start: a daemon already answers"
  phase_end "skipped (already running)"
else
  if [[ -n ${SQLRS_DOCKER_STORAGE_DRIVER:-} ]]; then
    driver=$SQLRS_DOCKER_STORAGE_DRIVER
  elif overlay_works; then
    driver=overlay2
  else
    log "overlayfs mount probe failed under $DOCKER_DATA_ROOT; using vfs"
    driver=vfs
  fi
  if [[ -n ${SQLRS_DOCKER_IPTABLES:-} ]]; then
    ipt=$SQLRS_DOCKER_IPTABLES
  elif iptables_works; then
    ipt=true
  else
    log "iptables does not work here; starting dockerd with --iptables=false"
    ipt=false
  fi
  # Probed settings first, then progressively more conservative fallbacks.
  attempts=("$driver $ipt")
  [[ $ipt == true ]] && attempts+=("$driver false")
  [[ $driver != vfs ]] && attempts+=("vfs false")
  started=false
  for a in "${attempts[@]}"; do
    # shellcheck disable=SC2086
    if start_dockerd $a; then started=true; break; fi
  done
  $started || die "could not start dockerd (see $DOCKERD_LOG)"
  phase_end "started: ${a}"
fi
log "docker server $(docker version --format '{{.Server.Version}}'), storage driver $(docker info --format '{{.Driver}}')"

# --- 3. image -----------------------------------------------------------------
# First bookworm (non-security) URI from apt's sources, one-line or deb822.
detect_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -r $f ]] || continue
    sed -E 's/\[[^]]*\]//' "$f" |
      awk -v s="$SUITE" '$1 == "deb" && $3 == s { print $2; exit }'
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -r $f ]] || continue
    awk -v s="$SUITE" '
      function flush() {
        if (u != "" && (" " t " ") ~ / deb / && (" " su " ") ~ (" " s " ")) { print u; found = 1; exit }
        u = t = su = ""
      }
      /^[[:space:]]*#/ { next }
      /^[[:space:]]*$/ { flush(); next }
      tolower($1) == "uris:"   { u = $2 }
      tolower($1) == "types:"  { $1 = ""; t = $0 }
      tolower($1) == "suites:" { $1 = ""; su = $0 }
      END { if (!found) flush() }' "$f"
  done
}

# Unmount anything left mounted below the rootfs (e.g. /proc after an
# interrupted debootstrap) before deleting it.
umount_below() {
  local m
  awk -v r="$1/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
    while read -r m; do umount -l "$m" || true; done
}

build_rootfs() {
  local mirror=${SQLRS_DEBIAN_MIRROR:-}
  [[ -n $mirror ]] || mirror=$(detect_mirror | head -n1)
  [[ -n $mirror ]] || mirror=http://deb.debian.org/debian
  log "debootstrap $SUITE (minbase + postgresql-15) from $mirror into $ROOTFS"
  if [[ -e $ROOTFS ]]; then
    log "removing incomplete rootfs $ROOTFS"
    umount_below "$ROOTFS"
    rm -rf --one-file-system "$ROOTFS"
  fi
  mkdir -p "$(dirname "$ROOTFS")"
  debootstrap --variant=minbase --include=postgresql-15 "$SUITE" "$ROOTFS" "$mirror"

  # No default cluster: sqlrs-engine runs its own initdb.
  rm -rf "$ROOTFS/var/lib/postgresql/15/main" "$ROOTFS/etc/postgresql/15/main"
  rm -f "$ROOTFS/var/log/postgresql/postgresql-15-main.log"
  # Socket dir. Use chroot: /var/run is an absolute symlink to /run.
  chroot "$ROOTFS" install -d -o postgres -g postgres -m 2775 /var/run/postgresql
  # Trim caches and docs to keep the image small.
  chroot "$ROOTFS" apt-get clean
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
  find "$ROOTFS/usr/share/locale" -name '*.mo' -delete # message translations

  # Sanity checks before marking the rootfs complete.
  chroot "$ROOTFS" id postgres >/dev/null || die "rootfs lacks user postgres"
  local b
  for b in initdb pg_ctl postgres psql pgbench; do
    [[ -x $ROOTFS$PG_BIN/$b ]] || die "rootfs lacks $PG_BIN/$b"
  done
  touch "$ROOTFS_MARKER"
}

phase_begin debootstrap
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "skip debootstrap: image $IMAGE already exists"
  phase_end skipped
elif [[ -f $ROOTFS_TAR ]]; then
  log "skip debootstrap: cached rootfs tarball $ROOTFS_TAR"
  phase_end "skipped (cached tarball)"
elif [[ -f $ROOTFS_MARKER && -d $ROOTFS ]]; then
  log "skip debootstrap: cached rootfs $ROOTFS (marker $ROOTFS_MARKER)"
  phase_end "skipped (cached rootfs)"
else
  rm -f "$ROOTFS_MARKER"
  build_rootfs
  phase_end "built $(du -sh "$ROOTFS" | cut -f1)"
fi

phase_begin import
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "skip import: image $IMAGE already exists"
  phase_end skipped
else
  if [[ ! -f $ROOTFS_TAR ]]; then
    # Write to a temp file and rename, so an existing tarball is always complete.
    log "packing $ROOTFS -> $ROOTFS_TAR"
    tar --numeric-owner -C "$ROOTFS" -cf "$ROOTFS_TAR.tmp" .
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
  fi
  log "docker import $ROOTFS_TAR -> $IMAGE"
  docker import \
    --change "ENV PATH=$PG_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'USER root' \
    --change 'WORKDIR /' \
    --change 'EXPOSE 5432' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap $SUITE minbase + postgresql-15 (scripts/setup-docker.sh)" \
    "$ROOTFS_TAR" "$IMAGE" >/dev/null
  phase_end "imported"
fi

# --- 4. verification ----------------------------------------------------------
phase_begin verify
version=$(docker run --rm "$IMAGE" "$PG_BIN/postgres" --version)
[[ $version =~ \(PostgreSQL\)\ 15\. ]] || die "unexpected postgres version output: $version"
log "image: $version"

# Run postgres with a port published on 127.0.0.1 and speak to it from the
# host: an SSLRequest must be answered with 'N' (or 'S').
check_published_port() {
  local cid hostport reply='' deadline rc=1
  cid=$(docker run -d --rm --user postgres -p 127.0.0.1::5432 "$IMAGE" bash -c \
    'initdb -D /tmp/pgdata -A trust -U postgres >/dev/null &&
     exec postgres -D /tmp/pgdata -c listen_addresses="*"')
  hostport=$(docker port "$cid" 5432/tcp | grep -m1 '^127\.0\.0\.1:' | cut -d: -f2) || true
  if [[ -z $hostport ]]; then
    docker rm -f "$cid" >/dev/null 2>&1 || true
    log "no 127.0.0.1 mapping for 5432/tcp"
    return 1
  fi
  deadline=$((SECONDS + 60))
  while ((SECONDS < deadline)); do
    reply=$(
      exec 2>/dev/null # "connection reset" while postgres is still starting
      exec 3<>"/dev/tcp/127.0.0.1/$hostport" || exit 0
      printf '\x00\x00\x00\x08\x04\xd2\x16\x2f' >&3
      IFS= read -r -n1 -t 5 r <&3 || true
      printf '%s' "${r:-}"
    ) || true
    if [[ $reply == N || $reply == S ]]; then rc=0; break; fi
    sleep 0.2
  done
  ((rc == 0)) || docker logs "$cid" 2>&1 | tail -n 10 | sed 's/^/    /'
  docker rm -f "$cid" >/dev/null 2>&1 || true
  ((rc == 0)) && log "published port 127.0.0.1:$hostport -> 5432 answered the SSLRequest ('$reply')"
  return $rc
}
if [[ ${SQLRS_SKIP_PORT_CHECK:-0} == 1 ]]; then
  log "skip port check (SQLRS_SKIP_PORT_CHECK=1)"
else
  check_published_port || die "port publishing on 127.0.0.1 does not work (see $DOCKERD_LOG)"
fi
phase_end ok

log "phase timings:"
printf '    %s\n' "${TIMINGS[@]}"
log "image id: $(docker image inspect --format '{{.Id}}' "$IMAGE")"
echo "docker ready; image $IMAGE present"
