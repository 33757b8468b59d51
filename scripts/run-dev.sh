#!/usr/bin/env bash
# `make run`: a controller with everything it needs for local development.
# Uses DATABASE_URL when set; otherwise starts (or reuses) a PostgreSQL 15 cluster of its own
# (`scripts/pg.sh devdir`: ./.data/pg, or a directory under /var/tmp when the postgres user cannot enter
# this checkout, e.g. root's 0700 home). Generates a development API key and certs key under ./.data/
# on first use, builds the binary (with progress), serves, and prints where everything is once it answers.
set -euo pipefail
cd "$(dirname "$0")/.."

data=./.data
mkdir -p "$data"
port="${CONTROLLER_DEV_PG_PORT:-54320}"
listen="${CONTROLLER_LISTEN:-127.0.0.1:4000}"
base_url="http://$listen"

if [ -z "${DATABASE_URL:-}" ]; then
  pg_dir="$(scripts/pg.sh devdir)"
  [ "$pg_dir" = "$PWD/.data/pg" ] || echo "PostgreSQL data directory: $pg_dir (the postgres user cannot enter this checkout)"
  scripts/pg.sh start "$pg_dir" "$port"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
fi

bin=target/debug/expo-controller
if [ ! -x "$bin" ]; then
  echo "Building expo-controller (the first build takes a few minutes on a small machine)..."
fi
cargo build --bin expo-controller

if [ -z "${CONTROLLER_API_KEY:-}" ]; then
  [ -s "$data/dev-api-key" ] || (umask 077 && "$bin" gen-key > "$data/dev-api-key")
  export CONTROLLER_API_KEY="$(cat "$data/dev-api-key")"
  key_note="(stored in $data/dev-api-key)"
else
  key_note="(from CONTROLLER_API_KEY)"
fi
if [ -z "${CONTROLLER_CERTS_KEY:-}" ]; then
  [ -s "$data/dev-certs-key" ] || (umask 077 && "$bin" gen-key > "$data/dev-certs-key")
  export CONTROLLER_CERTS_KEY="$(cat "$data/dev-certs-key")"
fi
export CONTROLLER_STORAGE_DIR="${CONTROLLER_STORAGE_DIR:-$data/storage}"

# Refuse early when something else answers there: the banner below must describe this server.
if (exec 3<>"/dev/tcp/${listen%:*}/${listen##*:}") 2>/dev/null; then
  echo "Something is already listening on $listen: stop it, or set CONTROLLER_LISTEN=127.0.0.1:<another port>." >&2
  exit 1
fi

"$bin" serve "$@" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' INT TERM

# Redacts the password of a URL for printing.
redact() { sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$1"; }

for _ in $(seq 1 300); do
  if ! kill -0 "$server" 2>/dev/null; then
    wait "$server"
    exit $?
  fi
  if curl -fsS -o /dev/null "$base_url/health" 2>/dev/null; then
    cat <<BANNER

  expo-controller is serving on $base_url
    API key (X-API-Key)   $CONTROLLER_API_KEY  $key_note
    Dashboard             $base_url/dashboard
    API docs (Swagger)    $base_url/docs      OpenAPI: $base_url/api/v2/openapi.json
    Metrics               $base_url/metrics   (Authorization: Bearer <API key>)
    Operator CLI          DATABASE_URL=$(redact "$DATABASE_URL") $bin builds list
                          CONTROLLER_URL=$base_url CONTROLLER_API_KEY=\$(cat $data/dev-api-key) $bin workers list
    Walk-through          README.md, "A whole build by hand" (uses fixtures/)
  Stop with Ctrl-C; \`make db-stop\` stops the development PostgreSQL.

BANNER
    break
  fi
  sleep 0.2
done

wait "$server"
