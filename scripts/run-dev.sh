#!/usr/bin/env bash
# `make run`: a controller with everything it needs for local development.
# Uses DATABASE_URL when set; otherwise starts (or reuses) a PostgreSQL cluster under ./.data/pg.
# Generates a development API key and certs key under ./.data/ on first use and prints the API key.
set -euo pipefail
cd "$(dirname "$0")/.."

data=./.data
mkdir -p "$data"
port="${CONTROLLER_DEV_PG_PORT:-54320}"

if [ -z "${DATABASE_URL:-}" ]; then
  scripts/pg.sh start "$data/pg" "$port"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
fi

cargo build --quiet --bin expo-controller
bin=target/debug/expo-controller

if [ -z "${CONTROLLER_API_KEY:-}" ]; then
  if [ ! -s "$data/dev-api-key" ]; then
    (umask 077 && "$bin" gen-key > "$data/dev-api-key")
    echo "Generated a development API key (stored in $data/dev-api-key):"
    echo "  X-API-Key: $(cat "$data/dev-api-key")"
  else
    echo "Development API key (from $data/dev-api-key): $(cat "$data/dev-api-key")"
  fi
  export CONTROLLER_API_KEY="$(cat "$data/dev-api-key")"
fi
if [ -z "${CONTROLLER_CERTS_KEY:-}" ]; then
  [ -s "$data/dev-certs-key" ] || (umask 077 && "$bin" gen-key > "$data/dev-certs-key")
  export CONTROLLER_CERTS_KEY="$(cat "$data/dev-certs-key")"
fi
export CONTROLLER_STORAGE_DIR="${CONTROLLER_STORAGE_DIR:-$data/storage}"

exec "$bin" serve "$@"
