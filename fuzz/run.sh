#!/usr/bin/env bash
# Builds and runs a fuzz target with libFuzzer on the stable toolchain (coverage instrumentation via
# stable codegen flags; no sanitizer). Usage: fuzz/run.sh [certs_bundle|multipart] [seconds]
set -euo pipefail
cd "$(dirname "$0")"
target="${1:-certs_bundle}"
seconds="${2:-60}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps these flags off build scripts and proc macros.
triple="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bin "$target" --target "$triple" --target-dir target
mkdir -p "corpus/$target"
"target/$triple/release/$target" -max_total_time="$seconds" -rss_limit_mb=2048 "corpus/$target"
