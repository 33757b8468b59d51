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

# The first free port from TEST_PG_PORT (default 54329) on, so a cluster already there is no obstacle.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port="${TEST_PG_PORT:-54329}"
for _ in $(seq 1 50); do
  port_in_use "$port" || break
  port=$((port + 1))
done
dir="$(mktemp -d /tmp/expo-controller-test-pg.XXXXXX)"
chmod 755 "$dir"
cleanup() {
  scripts/pg.sh stop "$dir"
  rm -rf "$dir"
}
trap cleanup EXIT

# The browser tests (tests/api/dashboard.rs: Chromium with playwright-core) and the OpenAPI contract test
# (tests/api/openapi_contract.rs: validator and generated client) run node packages from tests/browser.
if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -d tests/browser/node_modules/openapi-client-axios ]; then
  command -v npm >/dev/null || { echo "npm is missing: apt-get install nodejs npm (the browser tests need it)" >&2; exit 1; }
  npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
fi

scripts/pg.sh start "$dir" "$port" fast
export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
unset DATABASE_URL
cargo test --all-targets "$@"
