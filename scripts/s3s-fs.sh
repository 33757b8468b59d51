#!/usr/bin/env bash
# Prints the path of the S3-compatible test server (s3s-fs from crates.io), installing it first when it
# is missing. The S3 storage tests start it themselves on loopback; they find it through S3S_FS_BIN.
# Installed under ~/.cache/expo-controller-tools (override with EXPO_TOOLS_ROOT), once per machine.
set -euo pipefail

version="0.14.1" # 0.14 is the newest line that builds with the project's toolchain (rustc 1.95)
root="${EXPO_TOOLS_ROOT:-$HOME/.cache/expo-controller-tools}"
bin="$root/bin/s3s-fs"
if [ ! -x "$bin" ] || ! grep -q "s3s-fs $version" "$root/.crates.toml" 2>/dev/null; then
  echo "installing s3s-fs $version into $root (first run only; a few minutes on 2 cores)" >&2
  cargo install --quiet --locked --root "$root" s3s-fs --version "$version" --features binary >&2
fi
echo "$bin"
