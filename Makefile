.PHONY: run test db-stop lint fmt build bench fuzz

run: ## Install what is missing (PostgreSQL 15), then serve on 127.0.0.1:4000 with a local PostgreSQL under ./.data (or DATABASE_URL)
	scripts/setup.sh run
	scripts/run-dev.sh

test: ## Install what is missing (PostgreSQL 15, Node, npm, Chromium, tests/browser packages), then start a throwaway PostgreSQL, run every test, stop it
	scripts/setup.sh test
	scripts/test.sh

db-stop: ## Stop the development PostgreSQL of `make run`
	scripts/pg.sh stop "$$(scripts/pg.sh devdir)"

bench: ## Build release binaries and run the P1–P12 and D1–D4 benchmarks (prints the table; never fails on a time); BENCH_REFERENCE_REV=<rev> adds P12's same-run A/B against that commit
	scripts/bench-tools.sh
	$(if $(BENCH_REFERENCE_REV),scripts/bench-reference.sh $(BENCH_REFERENCE_REV) >/dev/null)
	cargo build --release --features bench --bins
	ulimit -n $$(ulimit -Hn); \
	  $(if $(BENCH_REFERENCE_REV),BENCH_REFERENCE_BIN=$$(scripts/bench-reference.sh $(BENCH_REFERENCE_REV))) \
	  PATH="$$PATH:/usr/sbin" target/release/expo-bench

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

build:
	cargo build --release

fuzz: ## Fuzz the certs-bundle and multipart parsers for 60 s each (libFuzzer, stable toolchain)
	fuzz/run.sh certs_bundle 60
	fuzz/run.sh multipart 60
