#!/usr/bin/env bash
# A local PostgreSQL 15 cluster for development and tests.
#   scripts/pg.sh start DIR PORT [fast]  initialise (once) and start a cluster in DIR on 127.0.0.1:PORT
#   scripts/pg.sh stop DIR               stop it
#   scripts/pg.sh devdir                 the directory `make run` keeps its cluster in (see below)
# Prints nothing on success except what pg_ctl says; the cluster trusts local connections as `postgres`.
#
# As root the server runs as the `postgres` user (initdb refuses root), which must be able to enter DIR.
# A root user's checkout often sits in a 0700 home directory: `devdir` then answers a directory under
# /var/tmp named after the checkout instead of ./.data/pg.
set -euo pipefail

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
cmd="${1:?usage: pg.sh start|stop DIR [PORT] [fast] | pg.sh devdir}"

is_root() { [ "$(id -u)" = 0 ]; }

# Runs a command as the cluster's owner; as root, from / (the caller's directory may be private to root).
as_pg() {
  if is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

ensure_postgres_user() {
  if is_root && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
}

require_binaries() {
  if [ ! -x "$PG_BIN/initdb" ] || [ ! -x "$PG_BIN/pg_ctl" ]; then
    cat >&2 <<MSG
PostgreSQL 15 server binaries were not found in $PG_BIN.
  Install them (Debian/Ubuntu: apt-get install postgresql-15), or
  point PG_BIN at a PostgreSQL 15 bin directory, or
  set DATABASE_URL to an existing database and run again.
MSG
    exit 1
  fi
}

# Whether the postgres user can reach DIR (always true when not root).
reachable() {
  ! is_root || (cd / && runuser -u postgres -- test -x "$1") 2>/dev/null
}

case "$cmd" in
  devdir)
    repo="$(cd "$(dirname "$0")/.." && pwd)"
    mkdir -p "$repo/.data"
    ensure_postgres_user
    if reachable "$repo/.data"; then
      echo "$repo/.data/pg"
    else
      # Owned by root and enterable (not listable) by others; the cluster inside belongs to postgres.
      base="/var/tmp/expo-controller-dev-$(printf '%s' "$repo" | sha256sum | cut -c1-12)"
      mkdir -p "$base" && chmod 711 "$base"
      echo "$base/pg"
    fi
    ;;
  start)
    dir="${2:?data directory required}"
    port="${3:?port required}"
    mode="${4:-durable}"
    require_binaries
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    ensure_postgres_user
    if is_root; then
      chown postgres "$dir"
      chmod 700 "$dir"
      if ! reachable "$dir"; then
        echo "The postgres user cannot enter $dir (a parent directory is private)." >&2
        echo "Choose a directory it can reach, e.g. under /var/tmp." >&2
        exit 1
      fi
    fi
    if [ ! -f "$dir/PG_VERSION" ]; then
      as_pg "$PG_BIN/initdb" -D "$dir" -U postgres -E UTF8 --locale=C.UTF-8 --auth=trust >/dev/null
    fi
    if as_pg "$PG_BIN/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
      exit 0
    fi
    opts="-p $port -c listen_addresses=127.0.0.1 -k $dir -c max_connections=300 -c shared_buffers=256MB"
    if [ "$mode" = fast ]; then
      # Throwaway clusters (tests, benchmarks): durability is not needed, speed is.
      opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    fi
    # PG_EXTRA_OPTS: more server options for investigations (e.g. pg_stat_statements).
    if ! as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 -o "$opts ${PG_EXTRA_OPTS:-}" start >/dev/null; then
      echo "PostgreSQL did not start on port $port; its log:" >&2
      tail -n 20 "$dir/server.log" >&2 || true
      exit 1
    fi
    ;;
  stop)
    dir="${2:?data directory required}"
    if [ -f "$dir/PG_VERSION" ]; then
      as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
    fi
    ;;
  *)
    echo "usage: pg.sh start|stop DIR [PORT] [fast] | pg.sh devdir" >&2
    exit 2
    ;;
esac
