# MetaStore: every command a newcomer needs. `make` lists them.
#
# One release profile serves the binaries, the tests and the benchmarks, so RocksDB's C++ is
# compiled once. The target directory lives outside the clone so CI and sessions share it.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/metastore/target
BIN := $(CARGO_TARGET_DIR)/release
PYTHON ?= python3

.PHONY: help run build test unit e2e verify fix generate chart-sync image bench bench-smoke compare deps build-deps test-deps

help: ## list the commands
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

run: build-deps ## start a single-node MetaStore on 127.0.0.1:2379 (RocksDB, data in ./default.metastore)
	cargo run --release --bin metastore --

build: build-deps ## build every binary, test and benchmark (release profile)
	cargo build --release --workspace --all-targets

test: test-deps build unit e2e ## the whole test suite (what CI runs)

unit: ## Rust unit and integration tests (nextest)
	cargo nextest run --release --workspace --no-tests=fail

e2e: ## end-to-end tests against real binaries and a real etcd (pytest)
	METASTORE_BIN=$(BIN)/metastore $(PYTHON) -m pytest -q e2e

verify: ## formatting, clippy -D warnings, rustdoc -D warnings
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --release --workspace --no-deps

fix: ## apply rustfmt and clippy's automatic fixes
	cargo fmt --all
	cargo clippy --release --workspace --all-targets --fix --allow-dirty --allow-staged

generate: build-deps ## regenerate the checked-in CRD from the Rust types (a test fails when it is stale)
	cargo run --release -p metastore-operator --bin crdgen > crds/metastoreclusters.metastore.io.yaml
	@$(MAKE) --no-print-directory chart-sync

chart-sync: ## copy crds/ into the Helm chart (e2e/test_chart.py fails when they differ)
	cp crds/metastoreclusters.metastore.io.yaml charts/metastore-operator/files/crds/

image: ## build the metastore:dev image from the release binaries, without a registry (e2e/images.sh)
	cargo build --release --bin metastore --bin metastore-ctl --bin metastore-operator
	e2e/images.sh

bench: ## criterion benchmarks of the hot paths
	cargo bench --workspace --bench '*'

bench-smoke: ## compile the benchmarks and run each once (seconds)
	cargo bench --workspace --bench '*' -- --test

compare: test-deps ## MetaStore against etcd, same workloads (bench/compare; COMPARE_ARGS="--quick", "--members 3", ...)
	cargo build --release -p metastore-server -p metastore-bench --bins
	$(PYTHON) bench/compare $(COMPARE_ARGS)

# Install what is missing (on Debian, as root), or say exactly what to install.
build-deps:
	@command -v protoc >/dev/null && ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || $(MAKE) --no-print-directory deps

test-deps: build-deps
	@command -v etcd >/dev/null && command -v etcdctl >/dev/null && command -v debootstrap >/dev/null && command -v valgrind >/dev/null && $(PYTHON) -c 'import pytest, helm_python' 2>/dev/null || $(MAKE) --no-print-directory deps

deps: ## install the system and Python packages the build and tests need (Debian, as root)
	@[ "$$(id -u)" = 0 ] || { echo "run as root, or: sudo apt-get install -y etcd-server etcd-client protobuf-compiler libclang-dev debootstrap iproute2 valgrind && pip install -r e2e/requirements.txt"; exit 1; }
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client protobuf-compiler libclang-dev debootstrap iproute2 valgrind
	$(PYTHON) -m pip install -q -r e2e/requirements.txt
