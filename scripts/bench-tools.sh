#!/usr/bin/env bash
# Installs what `make bench` measures against, when missing: nginx (Debian's nginx-light, the static file
# server reference of P10) and the s3s-fs S3 test server (P8). Installing nginx needs root and apt; without
# them the bench still runs and reports the reference as not measured, with this hint.
set -euo pipefail

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing nginx-light (the P10 reference; first run only)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; } \
      || echo "could not install nginx-light; P10 runs without its reference" >&2
  else
    echo "nginx is missing (P10's reference): run 'apt-get install nginx-light' as root to measure it" >&2
  fi
fi
scripts/s3s-fs.sh >/dev/null
