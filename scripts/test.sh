#!/usr/bin/env bash
# `make test`: a throwaway PostgreSQL on its own port and directory, every test, then stop it
# (also when tests fail).
set -euo pipefail
cd "$(dirname "$0")/.."

# The S3-compatible server the storage tests start on loopback (installed on first use).
if [ -z "${S3S_FS_BIN:-}" ]; then
  S3S_FS_BIN="$(scripts/s3s-fs.sh)"
  export S3S_FS_BIN
fi

port="${TEST_PG_PORT:-54329}"
dir="$(mktemp -d /tmp/expo-controller-test-pg.XXXXXX)"
chmod 755 "$dir"
cleanup() {
  scripts/pg.sh stop "$dir"
  rm -rf "$dir"
}
trap cleanup EXIT

scripts/pg.sh start "$dir" "$port" fast
export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
unset DATABASE_URL
cargo test --all-targets "$@"
