# Tegmen: the README's two commands are `make demo` and `make test`.
# Both install what is missing, build, and build the guest image first.

CARGO ?= cargo
TARGET_DIR := target/debug

.PHONY: all setup build guest-image demo test unit-test e2e-test fuzz fuzz-smoke bench clippy fmt clean

all: build

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

guest-image: setup
	guest-image/build.sh all

# Boots a throwaway sandbox VM and shows what the guest reports, then runs a
# busybox container in its own microVM with `tegmen run`.
demo: build guest-image
	scripts/demo.sh

unit-test: build
	$(CARGO) test --workspace --exclude tegmen-tests

# End-to-end tests boot real guests; they run one at a time (a test that
# needs several VMs at once starts them itself).
e2e-test: build guest-image
	$(CARGO) test -p tegmen-tests -- --test-threads=1

test: unit-test e2e-test fuzz-smoke

# Every fuzz target under libFuzzer, FUZZ_TIME seconds each (default 600),
# FUZZ_JOBS at a time (default 1: each alone); `make test` runs each for
# 30 s, two at a time. The checked-in corpus and every crash input found
# also run as a unit test (fuzz-targets/tests/corpus.rs).
FUZZ_TIME ?= 600
fuzz: setup
	scripts/fuzz.sh --time $(FUZZ_TIME) --record

fuzz-smoke: setup
	scripts/fuzz.sh --time 30 --jobs 2

bench: build guest-image
	scripts/bench.sh

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf build
