#!/usr/bin/env bash
# Builds the controller of an earlier commit for P12's same-run A/B and prints the binary's path:
#   scripts/bench-reference.sh <rev>   → target/bench-reference/expo-controller-<short sha>
# The commit is exported (git archive) to a directory of its own and built with the same features into
# this checkout's target directory, so the compiled dependencies are shared; the binary is copied out
# before anything else is built. A later `cargo build` links this checkout's own binaries back in place.
set -euo pipefail
rev=${1:?usage: scripts/bench-reference.sh <rev>}
cd "$(dirname "$0")/.."
sha=$(git rev-parse --short=12 "$rev^{commit}")
out="$PWD/target/bench-reference/expo-controller-$sha"
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi
src="$PWD/target/bench-reference/src-$sha"
rm -rf "$src"
mkdir -p "$src"
git archive "$sha" | tar -x -C "$src"
cargo build --release --features bench --bin expo-controller \
  --manifest-path "$src/Cargo.toml" --target-dir "$PWD/target" >&2
cp "$PWD/target/release/expo-controller" "$out.tmp"
mv "$out.tmp" "$out"
rm -rf "$src"
echo "$out"
