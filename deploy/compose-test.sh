#!/usr/bin/env bash
# make compose-test: the compose deployment run for real, with NATS permissions on.
#   deploy/compose-test.sh [sled] [cluster]     (default: both profiles, one after the other)
# For each profile, under its own compose project name (saga-ct-<profile>-<pid>):
#   build the image (once), up, wait until every container is healthy, run the four demo orders
#   in the compose network (the `demo` service: sagactl demo, which checks each saga's end state),
#   docker kill the JetStream meta-leader NATS node and run the demo orders again, start orders
#   that are in flight (the card gateway slowed to PAYMENT_GATEWAY_LATENCY), docker kill the
#   coordinator and check they all complete: after its restart (sled), or on the other two
#   coordinators while it stays down (cluster); then start the node again, wait for health, one more
#   order, `down -v`. `down -v` also runs on failure or Ctrl-C (trap); logs and the figures are
#   kept in data/compose-test-<time>/. Prints a table of checks and timings, and the peak memory
#   of each service (docker stats, sampled every few seconds).
# Host ports are not used by the test (everything goes through the compose network); they are
# published on ephemeral ports of 127.0.0.1 so that the test runs beside `make up`/`compose-up`.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PROFILES=("$@"); [[ ${#PROFILES[@]} -gt 0 ]] || PROFILES=(sled cluster)
if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose);
else echo "compose-test: docker compose is not installed" >&2; exit 1; fi
docker info >/dev/null 2>&1 || { echo "compose-test: no Docker engine answers (docker info)" >&2; exit 1; }

OUT="$ROOT/data/compose-test-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.tsv"; : >"$SUMMARY"
IN_FLIGHT="${COMPOSE_TEST_IN_FLIGHT:-6}"
export PAYMENT_GATEWAY_LATENCY="${PAYMENT_GATEWAY_LATENCY:-3s}"
# Ephemeral host ports (the test reaches the services inside the network only).
for v in SAGA_GRPC_PORT SAGA_METRICS_PORT SAGA_INVENTORY_PORT SAGA_PAYMENT_PORT SAGA_SHIPPING_PORT \
         SAGA_GRPC_PORT_2 SAGA_METRICS_PORT_2 SAGA_GRPC_PORT_3 SAGA_METRICS_PORT_3; do
  export "$v=127.0.0.1:0"
done

PROJECT=""; PROFILE=""; SAMPLER=""; FAILED=0
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$2"; }
row() { printf '%s\t%s\t%s\t%s\n' "$PROFILE" "$1" "$2" "$3" >>"$SUMMARY"; echo "compose-test [$PROFILE] $1: $2 ${3:+($3)}"; }
fail() { row "$1" FAIL "$2"; FAILED=1; exit 1; }
dc() { "${COMPOSE[@]}" -p "$PROJECT" -f deploy/docker-compose.yml "${PROFILE_ARGS[@]}" "$@"; }
cid() { dc ps -q "$1"; }

stop_sampler() { [[ -n "$SAMPLER" ]] && kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""; }
teardown() {
  [[ -n "$PROJECT" ]] || return 0
  stop_sampler
  dc logs --no-color >"$OUT/$PROFILE.log" 2>&1 || true
  dc down -v --remove-orphans >/dev/null 2>&1 || echo "compose-test: down -v of $PROJECT failed" >&2
  PROJECT=""
}
print_summary() {
  echo; echo "=== compose-test (logs and figures: $OUT) ==="
  python3 - "$SUMMARY" "$OUT/memory.tsv" <<'PY'
import sys, os
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
head = ["profile", "check", "result", "figure"]
w = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r))
print(line(head)); print(line(["-" * x for x in w]))
for r in rows: print(line(r))
if os.path.exists(sys.argv[2]):
    peak = {}
    for l in open(sys.argv[2]):
        prof, name, mib = l.split("\t")
        key = (prof, name)
        peak[key] = max(peak.get(key, 0.0), float(mib))
    print("\npeak memory per service (docker stats, MiB):")
    for (prof, name), mib in sorted(peak.items()):
        print(f"  {prof:<8} {name:<14} {mib:7.1f}")
PY
}
on_exit() {
  local status=$?
  trap - EXIT INT TERM
  teardown
  print_summary
  [[ $status -ne 0 || $FAILED -ne 0 ]] && echo "compose-test: FAILED" || echo "compose-test: passed"
  exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Samples `docker stats` for the project's containers into memory.tsv (profile, service, MiB).
start_sampler() {
  ( while true; do
      docker stats --no-stream --format '{{.Name}}\t{{.MemUsage}}' $(dc ps -q 2>/dev/null) 2>/dev/null |
        python3 -c '
import re, sys
units = {"B": 1/2**20, "KiB": 1/1024, "kB": 1/1024, "MiB": 1, "MB": 1, "GiB": 1024, "GB": 1024}
for line in sys.stdin:
    name, usage = line.rstrip("\n").split("\t")
    m = re.match(r"([\d.]+)\s*([A-Za-z]+)", usage)
    if not m: continue
    service = re.sub(r"([_-]run[_-][0-9a-f]+|[_-]\d+)$", "", name[len(sys.argv[2]) + 1:] if name.startswith(sys.argv[2]) else name)
    print(f"{sys.argv[1]}\t{service}\t{float(m.group(1)) * units.get(m.group(2), 1):.1f}")
 ' "$PROFILE" "$PROJECT" >>"$OUT/memory.tsv" || true
      sleep 3
    done ) &
  SAMPLER=$!
}

# Waits until every running container of the project is healthy (and nats-auth exited 0).
wait_healthy() {
  local what="$1" deadline=$((SECONDS + ${2:-240}))
  while ((SECONDS < deadline)); do
    local bad=0
    for c in $(dc ps -q); do
      local s; s=$(docker inspect -f '{{.Name}} {{.State.Status}} {{.State.ExitCode}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")
      case "$s" in
        *nats-auth*" exited 0 "*) ;;
        *" running "*" healthy") ;;
        *" exited "*) [[ "$s" == *nats-auth* ]] && { echo "$s"; return 1; }; bad=1 ;;
        *) bad=1 ;;
      esac
    done
    ((bad == 0)) && return 0
    sleep 1
  done
  echo "not healthy after ${2:-240} s ($what):"; dc ps
  return 1
}
wait_service_healthy() {
  local c; c=$(cid "$1") deadline=$((SECONDS + ${2:-120}))
  while ((SECONDS < deadline)); do
    [[ "$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")" == healthy ]] && return 0
    sleep 0.5
  done
  return 1
}

# sagactl inside the compose network: exec'd in the inventory container (the image has it), so
# that orders can be placed and followed while a coordinator or a NATS node is down.
ctl() { local addr="$1"; shift; dc exec -T inventory sagactl --addr "http://$addr:50051" --json "$@"; }
saga_state() { ctl "$1" get "$2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }

run_demo() {
  local label="$1" t0; t0=$(now)
  if dc --profile demo run --rm --no-deps demo >"$OUT/$PROFILE-$label.txt" 2>&1; then
    row "$label" ok "4 orders as expected in $(secs "$t0" "$(now)")"
  else
    tail -n 30 "$OUT/$PROFILE-$label.txt"; fail "$label" "see $OUT/$PROFILE-$label.txt"
  fi
}

# The NATS node that is the JetStream meta leader (the hardest one to lose).
meta_leader() {
  for n in nats-1 nats-2 nats-3; do
    local l; l=$(dc exec -T "$n" wget -q -O - http://127.0.0.1:8222/jsz 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin).get("meta_cluster",{}).get("leader",""))' 2>/dev/null || true)
    [[ -n "$l" ]] && { echo "$l"; return; }
  done
  echo "compose-test: no JetStream meta leader reported by /jsz; killing nats-1" >&2
  echo nats-1
}

# Places $IN_FLIGHT orders through coordinator $1 at once (so that all of them are running a
# moment later) without waiting for them; prints their saga ids.
# A refusal ("retry shortly": right after a NATS node's kill a coordinator may hold no partition
# while the leases move) is retried every 0.2 s for 30 s with the order's own idempotency key, as
# a client does; the refusals are in $OUT/<profile>-order-<tag>-<i>.err.
place_orders() {
  local via="$1" tag="$2" pids=()
  for i in $(seq "$IN_FLIGHT"); do
    (
      local deadline=$((SECONDS + 30))
      until ctl "$via" create --customer "c-$tag-$i" --item A-1:1 --amount-cents 1000 --idempotency-key "$tag-$i" \
        >"$OUT/$PROFILE-order-$tag-$i.json" 2>>"$OUT/$PROFILE-order-$tag-$i.err"; do
        ((SECONDS < deadline)) || exit 1
        sleep 0.2
      done
    ) &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || true; done
  for i in $(seq "$IN_FLIGHT"); do
    python3 -c 'import json,sys; print(json.load(sys.stdin)["saga_id"])' <"$OUT/$PROFILE-order-$tag-$i.json" || true
  done
}
# Waits until every saga in $2.. is terminal (read through coordinator $1); fails unless COMPLETED.
wait_completed() {
  local via="$1"; shift
  local deadline=$((SECONDS + 120)) pending=("$@")
  while ((${#pending[@]} > 0 && SECONDS < deadline)); do
    local next=()
    for id in "${pending[@]}"; do
      local s; s=$(saga_state "$via" "$id" 2>/dev/null || echo UNREACHABLE)
      case "$s" in
        COMPLETED) ;;
        COMPENSATED|FAILED) echo "saga $id ended $s"; return 1 ;;
        *) next+=("$id") ;;
      esac
    done
    pending=("${next[@]}")
    ((${#pending[@]} == 0)) || sleep 0.5
  done
  ((${#pending[@]} == 0)) || { echo "not terminal after 120 s: ${pending[*]}"; return 1; }
}
# Places one order, retrying with the same idempotency key until the coordinator accepts it
# (at most 90 s); prints its saga id.
# In the cluster profile it asks the coordinators in turn, as a client behind a balancer does: a
# create whose key landed but whose record did not (the kill in between) can only be finished by
# the coordinator that holds the saga's partition, and the others refuse it until it is.
first_order() {
  local deadline=$((SECONDS + 90)) out n=0 addrs=(coordinator)
  [[ "$PROFILE" == cluster ]] && addrs=(coordinator coordinator-2 coordinator-3)
  while ((SECONDS < deadline)); do
    local addr=${addrs[$((n++ % ${#addrs[@]}))]}
    if out=$(ctl "$addr" create --customer "c-$1" --item A-1:1 --amount-cents 1000 --idempotency-key "$1" 2>"$OUT/probe.err"); then
      python3 -c 'import json,sys; print(json.load(sys.stdin)["saga_id"])' <<<"$out"; return 0
    fi
    echo "$(date +%T.%N | cut -c1-12) $addr $(tail -n 1 "$OUT/probe.err")" >>"$OUT/$PROFILE-probe.txt"
    sleep 0.2
  done
  return 1
}
# The refusals first_order saw in this profile, counted by message ("none" when the first try went through).
refusals() {
  [[ -s "$OUT/$PROFILE-probe.txt" ]] || { echo "no refusal"; return; }
  python3 - "$OUT/$PROFILE-probe.txt" <<'PY'
import collections, re, sys
seen = collections.Counter()
for line in open(sys.argv[1]):
    msg = line.split(" ", 1)[1].strip() if " " in line else line.strip()
    m = re.search(r'message: "([^"]*)"', msg)
    seen[(m.group(1) if m else msg)[:90]] += 1
print(f"{sum(seen.values())} refused: " + "; ".join(f"{n}x {m}" for m, n in seen.most_common(3)))
PY
}
# How many of the sagas $3.. (terminal by now) finished after the moment $2 (epoch seconds),
# i.e. were in flight across the kill; read through coordinator $1.
finished_after() {
  local via="$1" since="$2"; shift 2
  for id in "$@"; do ctl "$via" get "$id"; done | python3 -c '
import json, sys
from datetime import datetime
since, n, dec = float(sys.argv[1]), 0, json.JSONDecoder()
text, i = sys.stdin.read(), 0
while i < len(text):
    while i < len(text) and text[i].isspace(): i += 1
    if i >= len(text): break
    saga, i = dec.raw_decode(text, i)
    at = datetime.fromisoformat(saga["updated_at"].replace("Z", "+00:00")).timestamp()
    n += at > since
print(n)' "$since"
}

run_profile() {
  PROFILE="$1"
  PROJECT="saga-ct-$PROFILE-$$"
  case "$PROFILE" in
    sled) PROFILE_ARGS=(); export COORDINATOR_STORE=sled PARTICIPANT_STORE=sled ;;
    cluster) PROFILE_ARGS=(--profile cluster); export COORDINATOR_STORE=jetstream PARTICIPANT_STORE=jetstream ;;
    *) echo "unknown profile $PROFILE (sled or cluster)" >&2; exit 2 ;;
  esac
  echo; echo "=== compose-test: profile $PROFILE (project $PROJECT) ==="
  local t0; t0=$(now)
  dc up -d >"$OUT/$PROFILE-up.txt" 2>&1 || { cat "$OUT/$PROFILE-up.txt"; fail "up" "see $OUT/$PROFILE-up.txt"; }
  start_sampler
  wait_healthy "after up" || fail "healthy" "after up"
  row "up, all healthy" ok "$(dc ps -q | wc -l) containers in $(secs "$t0" "$(now)")"

  run_demo "demo orders"

  # Lose the JetStream meta leader: orders still complete on the two other nodes.
  local node t1; node=$(meta_leader)
  t1=$(now); docker kill "$(cid "$node")" >/dev/null
  # Until the remaining nodes have a new leader for each stream/bucket, a write can be refused
  # (UNAVAILABLE: "retry with the same idempotency key"); a client retries, and so does this probe.
  local probe t2; probe=$(first_order "$PROFILE-after-kill") || fail "first order after $node killed" "none accepted in 90 s: $(refusals) (see $OUT/$PROFILE-probe.txt)"
  t2=$(now)
  wait_completed coordinator "$probe" || fail "first order after $node killed" "not COMPLETED"
  row "$node (meta leader) killed" ok "first order accepted $(secs "$t1" "$t2") after the kill ($(refusals)), COMPLETED $(secs "$t1" "$(now)") after"
  run_demo "demo, $node down"

  # In-flight sagas, then the coordinator killed.
  local ids
  if [[ "$PROFILE" == sled ]]; then
    mapfile -t ids < <(place_orders coordinator "$PROFILE-crash")
    ((${#ids[@]} == IN_FLIGHT)) || fail "orders placed" "${#ids[@]} of $IN_FLIGHT"
    local tk; tk=$(now); docker kill "$(cid coordinator)" >/dev/null
    dc start coordinator >/dev/null 2>&1
    wait_service_healthy coordinator || fail "coordinator restart" "not healthy again"
    local th; th=$(now)
    wait_completed coordinator "${ids[@]}" || fail "in-flight after coordinator kill" "see $OUT/$PROFILE.log"
    local tc; tc=$(now)
    local running; running=$(finished_after coordinator "$tk" "${ids[@]}")
    row "coordinator killed, restarted" ok "$IN_FLIGHT orders placed, killed at once: $running of them finished after the kill; healthy again $(secs "$tk" "$th"), all COMPLETED $(secs "$tk" "$tc") after the kill"
  else
    # Orders through coordinator-2; coordinator(-1) killed and left down: the others take its partitions.
    mapfile -t ids < <(place_orders coordinator-2 "$PROFILE-crash")
    ((${#ids[@]} == IN_FLIGHT)) || fail "orders placed" "${#ids[@]} of $IN_FLIGHT"
    local tk; tk=$(now); docker kill "$(cid coordinator)" >/dev/null
    wait_completed coordinator-2 "${ids[@]}" || fail "in-flight after coordinator kill" "see $OUT/$PROFILE.log"
    local td; td=$(now)
    local running; running=$(finished_after coordinator-2 "$tk" "${ids[@]}")
    local taken=0 since; since=$(date -u -d "@${tk%.*}" +%Y-%m-%dT%H:%M:%SZ)
    for c in coordinator-2 coordinator-3; do
      taken=$((taken + $(docker logs --since "$since" "$(cid "$c")" 2>&1 | grep -c '"partition taken"' || true)))
    done
    row "coordinator-1 killed, left down" ok "$IN_FLIGHT orders placed, killed at once: $running of them finished after the kill, all COMPLETED on the others $(secs "$tk" "$td") after the kill; partitions taken over by coordinator-2/3: $taken"
    dc start coordinator >/dev/null 2>&1
    wait_service_healthy coordinator || fail "coordinator restart" "not healthy again"
    row "coordinator-1 started again" ok "healthy $(secs "$td" "$(now)") after start"
  fi

  # The node back: healthy, and an order completes with all three nodes.
  local ts; ts=$(now)
  dc start "$node" >/dev/null 2>&1
  wait_healthy "after $node restart" 120 || fail "$node restarted" "not healthy"
  row "$node started again" ok "all healthy $(secs "$ts" "$(now)") after start (down $(secs "$t1" "$ts"))"
  mapfile -t ids < <(IN_FLIGHT=1 place_orders coordinator "$PROFILE-after")
  wait_completed coordinator "${ids[@]}" || fail "order after the node's return" "not COMPLETED"
  row "order after the node's return" ok "COMPLETED"

  local td; td=$(now)
  teardown
  row "down -v" ok "$(secs "$td" "$(now)")"
}

t0=$(now)
PROFILE=image
PROJECT="saga-ct-build-$$"; PROFILE_ARGS=()
if dc build nats-auth >"$OUT/build.txt" 2>&1; then
  row "image built" ok "$(secs "$t0" "$(now)") ($(docker image inspect -f '{{.Size}}' saga-engine:latest | awk '{printf "%.0f MB", $1/1e6}'))"
else
  tail -n 40 "$OUT/build.txt"; fail "image built" "see $OUT/build.txt"
fi
PROJECT=""
for p in "${PROFILES[@]}"; do run_profile "$p"; done
