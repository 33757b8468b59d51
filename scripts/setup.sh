#!/usr/bin/env bash
# What `make run` and `make test` need on this machine, installed when missing.
#
#   scripts/setup.sh run|test [--dry-run]
#
# run:  PostgreSQL 15 server binaries (unless DATABASE_URL points at a server) and a Rust toolchain.
# test: the same, plus Node.js and npm, Debian's Chromium and the npm packages of tests/browser (the
#       dashboard's browser tests and the OpenAPI contract test).
#
# As root on Debian/Ubuntu it installs what is missing with apt-get, saying what and why; otherwise it
# prints the exact command to run and stops (exit 1). --dry-run (or SETUP_DRY_RUN=1) only prints what it
# would do. SETUP_PRETEND_MISSING="nodejs chromium …" treats those packages as missing (to check this
# script on a machine that has them). Nothing is printed when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-}"
dry_run="${SETUP_DRY_RUN:-}"
[ "${2:-}" = "--dry-run" ] && dry_run=1
case "$target" in
  run | test) ;;
  *) echo "usage: scripts/setup.sh run|test [--dry-run]" >&2; exit 2 ;;
esac

pretend=" ${SETUP_PRETEND_MISSING:-} "
pretends() { [[ "$pretend" == *" $1 "* ]]; }
have_cmd() { ! pretends "$2" && command -v "$1" >/dev/null 2>&1; }

packages=()
reasons=()
need() { packages+=("$1"); reasons+=("  $1: $2"); }

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
if [ -z "${DATABASE_URL:-}" ] && { pretends postgresql-15 || [ ! -x "$PG_BIN/initdb" ]; }; then
  need postgresql-15 "the PostgreSQL 15 server the controller stores its queue in (make run, make test)"
fi
if [ "$target" = test ]; then
  have_cmd node nodejs || need nodejs "runs the dashboard's browser tests and the OpenAPI contract test"
  have_cmd npm npm || need npm "installs their packages (tests/browser/package-lock.json)"
  { ! pretends chromium && [ -x /usr/bin/chromium ]; } || need chromium "the browser the dashboard tests drive (/usr/bin/chromium)"
fi
if ! have_cmd cargo rust; then
  echo "cargo is missing: install a Rust toolchain (stable >= 1.88) with" >&2
  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
  exit 1
fi

debian() { [ -r /etc/debian_version ] && command -v apt-get >/dev/null 2>&1; }
if [ ${#packages[@]} -gt 0 ]; then
  command_line="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ${packages[*]}"
  echo "make $target needs: ${packages[*]}" >&2
  printf '%s\n' "${reasons[@]}" >&2
  if [ -n "$dry_run" ]; then
    if [ "$(id -u)" = 0 ] && debian; then
      echo "would run: $command_line" >&2
    else
      echo "would ask for: sudo sh -c '$command_line'" >&2
    fi
  elif [ "$(id -u)" = 0 ] && debian; then
    echo "installing: ${packages[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
  else
    if debian; then
      echo "install them as root, then run make $target again:" >&2
      echo "  sudo sh -c '$command_line'" >&2
    else
      echo "this is not Debian/Ubuntu: install the equivalents of those packages (or set PG_BIN /" >&2
      echo "DATABASE_URL for PostgreSQL), then run make $target again." >&2
    fi
    exit 1
  fi
fi

# playwright-core needs Node.js >= 20; Debian 12's nodejs is 18. An older node is joined by Node.js 20 from
# the npm registry (the `node` package, whose binary comes from the registry too) in npm's global prefix.
node_major() { node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/'; }
if [ "$target" = test ] && [ -z "$dry_run" ] && command -v node >/dev/null 2>&1 \
    && [ "$(node_major)" -lt 20 ] 2>/dev/null; then
  echo "make test needs Node.js >= 20 for playwright-core; this node is $(node --version)" >&2
  if [ "$(id -u)" = 0 ]; then
    echo "installing: Node.js 20 from the npm registry (npm install -g node@20)" >&2
    npm install -g --no-audit --no-fund --loglevel=error node@20 >/dev/null
    hash -r
    echo "node is now $(command -v node) $(node --version)" >&2
  else
    echo "install it, then run make test again:  sudo npm install -g node@20" >&2
    exit 1
  fi
fi

# The npm packages of the browser and contract tests, from the lockfile (once).
if [ "$target" = test ] && { pretends npm-packages || [ ! -d tests/browser/node_modules/playwright-core ] \
    || [ ! -d tests/browser/node_modules/openapi-client-axios ]; }; then
  echo "installing the npm packages of tests/browser (playwright-core, the OpenAPI validator and client)" >&2
  if [ -n "$dry_run" ]; then
    echo "would run: npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error" >&2
  else
    npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
  fi
fi
