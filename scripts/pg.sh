#!/usr/bin/env bash
# A local PostgreSQL 15 cluster for development and tests.
#   scripts/pg.sh start DIR PORT   initialise (once) and start a cluster in DIR on 127.0.0.1:PORT
#   scripts/pg.sh stop DIR         stop it
# Prints nothing on success except what pg_ctl says; the cluster trusts local connections as `postgres`.
set -euo pipefail

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
cmd="${1:?usage: pg.sh start|stop DIR [PORT] [fast]}"
dir="${2:?data directory required}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

as_pg() {
  # initdb refuses to run as root: run the server as the postgres user then.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
  start)
    port="${3:?port required}"
    mode="${4:-durable}"
    if [ "$(id -u)" = 0 ]; then
      id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
      chown postgres "$dir"
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
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 -o "$opts ${PG_EXTRA_OPTS:-}" start >/dev/null
    ;;
  stop)
    if [ -f "$dir/PG_VERSION" ]; then
      as_pg "$PG_BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null 2>&1 || true
    fi
    ;;
  *)
    echo "usage: pg.sh start|stop DIR [PORT] [fast]" >&2
    exit 2
    ;;
esac
