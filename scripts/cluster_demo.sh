#!/usr/bin/env bash
# make cluster-demo: a local NATS server with JetStream and three statecast nodes on it,
# the trading-desk demo producers on the first (docs/cluster.md). Ctrl-C stops them all.
set -euo pipefail
BIN=${BIN:-.venv/bin}
NATS_PORT=${NATS_PORT:-14222}   # not 4222: a machine's own NATS may be there
dir=$(mktemp -d)
pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap stop INT TERM EXIT
command -v nats-server >/dev/null || { echo "needs Debian's nats-server (make services, as root)"; exit 1; }
nats-server -js -sd "$dir/nats" -a 127.0.0.1 -p "$NATS_PORT" >"$dir/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do (echo >"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.1; done
store="nats://127.0.0.1:$NATS_PORT"
"$BIN/statecast" serve --store "$store" --port 8989 --http-port 8990 --demo &
pids+=($!)
sleep 2   # the first node creates the streams
"$BIN/statecast" serve --store "$store" --port 9989 --http-port 9990 --log-level warning &
pids+=($!)
"$BIN/statecast" serve --store "$store" --port 10989 --http-port 10990 --log-level warning &
pids+=($!)
cat <<MSG
three nodes on one JetStream stream ($store):
  dashboards  http://127.0.0.1:8990/  http://127.0.0.1:9990/  http://127.0.0.1:10990/
  watch, moving between nodes when one stops:
    $BIN/statecast watch --url tcp://127.0.0.1:9989,tcp://127.0.0.1:10989,tcp://127.0.0.1:8989
MSG
wait "${pids[1]}"
