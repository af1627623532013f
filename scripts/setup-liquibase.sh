#!/usr/bin/env bash
# Install Liquibase for sqlrs-engine's lb (Liquibase) prepare tests on this
# (Debian bookworm, root) machine, without internet access to liquibase.org:
#   1. Java 17 from Debian (default-jre-headless) when `java` is missing,
#   2. the npm package `liquibase` (4.28.x) into a fixed prefix; it ships the
#      whole Liquibase distribution (core 4.28.0 + PostgreSQL JDBC 42.7.3 in
#      internal/lib/postgresql.jar),
#   3. a stable symlink <prefix>/bin/liquibase -> the real launcher script,
#   4. verify `liquibase --version`.
# Idempotent: each phase is skipped when its result already exists.
#
# The executable to use as `liquibase_exec` is printed at the end
# (default /opt/sqlrs-test/liquibase/bin/liquibase).
#
# Environment overrides:
#   SQLRS_LIQUIBASE_PREFIX   install prefix   (default /opt/sqlrs-test/liquibase)
#   SQLRS_LIQUIBASE_NPM_SPEC npm version spec (default 4.28; must resolve to 4.28.x)
set -euo pipefail

PREFIX=${SQLRS_LIQUIBASE_PREFIX:-/opt/sqlrs-test/liquibase}
NPM_SPEC=${SQLRS_LIQUIBASE_NPM_SPEC:-4.28}
PKG_DIR=$PREFIX/node_modules/liquibase
LB_HOME=$PKG_DIR/dist/liquibase
LAUNCHER=$LB_HOME/liquibase
LINK=$PREFIX/bin/liquibase

log() { printf '[setup-liquibase] %s\n' "$*"; }
die() { printf '[setup-liquibase] ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root"

# --- 1. Java ------------------------------------------------------------------
if command -v java >/dev/null 2>&1; then
  log "java present: $(java -version 2>&1 | head -n1)"
else
  log "installing default-jre-headless (Java 17) from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends default-jre-headless
  command -v java >/dev/null 2>&1 || die "java still missing after apt-get install"
  log "java installed: $(java -version 2>&1 | head -n1)"
fi

# --- 2. Liquibase from npm --------------------------------------------------
command -v npm >/dev/null 2>&1 || die "npm not found"
installed_version() {
  [[ -f $PKG_DIR/package.json ]] || return 1
  node -e 'process.stdout.write(require(process.argv[1]).version)' "$PKG_DIR/package.json"
}
have=$(installed_version || true)
if [[ $have == 4.28.* && -f $LAUNCHER && -f $LB_HOME/internal/lib/liquibase-core.jar \
      && -f $LB_HOME/internal/lib/postgresql.jar ]]; then
  log "liquibase npm package $have already installed in $PREFIX"
else
  log "npm install liquibase@$NPM_SPEC into $PREFIX (currently: ${have:-none})"
  mkdir -p "$PREFIX"
  # The package has no dependencies and no install scripts; --ignore-scripts
  # keeps it that way.
  npm install --prefix "$PREFIX" --ignore-scripts --no-audit --no-fund \
    --no-update-notifier --omit=dev --save-exact "liquibase@$NPM_SPEC"
  have=$(installed_version) || die "package.json missing after npm install"
  [[ $have == 4.28.* ]] || die "npm resolved liquibase@$NPM_SPEC to $have, expected 4.28.x"
  [[ -f $LAUNCHER ]] || die "launcher not found at $LAUNCHER"
fi
chmod 0755 "$LAUNCHER"
# Readable for the unprivileged user Liquibase runs as (never root, §14.15).
chmod -R a+rX "$PREFIX"

# --- 3. Stable path --------------------------------------------------------
# The launcher resolves symlinks to find LIQUIBASE_HOME, so a symlink works.
mkdir -p "$PREFIX/bin"
if [[ $(readlink "$LINK" 2>/dev/null || true) != "$LAUNCHER" ]]; then
  ln -sfn "$LAUNCHER" "$LINK"
  log "linked $LINK -> $LAUNCHER"
fi

# --- 4. Verify -------------------------------------------------------------
out=$(cd /tmp && LIQUIBASE_SHOW_BANNER=false "$LINK" --version 2>&1) \
  || { printf '%s\n' "$out" >&2; die "liquibase --version failed"; }
ver=$(printf '%s\n' "$out" | sed -n 's/^Liquibase Version: //p')
[[ $ver == 4.28.* ]] || { printf '%s\n' "$out" >&2; die "unexpected liquibase version '$ver'"; }
printf '%s\n' "$out" | grep -q 'internal/lib/postgresql.jar: PostgreSQL JDBC Driver' \
  || die "PostgreSQL JDBC driver not listed by liquibase --version"
log "liquibase --version: $ver (npm package $have), $(printf '%s\n' "$out" | grep 'postgresql.jar' | sed 's/^- //')"
log "liquibase_exec=$LINK"
