#!/usr/bin/env bash
# Builds the controller of an earlier commit for P12's same-run A/B and prints the binary's path:
#   scripts/bench-reference.sh <rev>   → target/bench-reference/expo-controller-<short sha>
# The commit is exported (git archive) to a directory of its own, its files stamped now, and built with
# the same features into a target directory of its own (target/bench-reference/target), seeded once with a
# copy of target/release so that the dependencies are not compiled again. Never into target/ itself: the
# package's unit would be the same as this checkout's, and cargo would take one for the other (git archive's
# files carry the commit's time, older than this checkout's binary, so the old sources would look built).
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
find "$src" -type f -exec touch {} +
target="$PWD/target/bench-reference/target"
if [ ! -d "$target/release" ] && [ -d "$PWD/target/release" ]; then
  mkdir -p "$target"
  cp -a "$PWD/target/release" "$target/release"
fi
cargo build --release --features bench --bin expo-controller \
  --manifest-path "$src/Cargo.toml" --target-dir "$target" >&2
cp "$target/release/expo-controller" "$out.tmp"
mv "$out.tmp" "$out"
rm -rf "$src"
echo "$out"
