#!/usr/bin/env bash
# Kaelix beside NATS and a raw TCP relay, on this machine, in one run.
#
#   benches/compare.sh            # the standard matrix, 5 runs each (about 30 minutes)
#   RUNS=1 DURATION=2 benches/compare.sh   # a quick look
#
# Installs Debian's nats-server if it is missing, builds release binaries,
# runs every scenario against each target under two placements (default, and
# everything pinned to CPU 0), and writes the medians table with Kaelix/NATS
# ratios between the compare markers of docs/performance.md. Raw results are
# kept in target/compare/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-5}
DURATION=${DURATION:-5}
TOPICS=${TOPICS:-1000000}
CONNECTIONS=${CONNECTIONS:-10000}
KAELIX_PORT=${KAELIX_PORT:-18080}
NATS_PORT=${NATS_PORT:-14222}
OUT=target/compare
RESULTS=$OUT/results.jsonl

if ! command -v nats-server >/dev/null 2>&1; then
    echo "installing nats-server (Debian package)"
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq nats-server
fi
NATS_BIN=$(command -v nats-server)

cargo build --release -q --bin kaelix-broker -p kaelix-broker
cargo build --release -q -p kaelix-bench
BENCH=target/release/kaelix-bench
BROKER=target/release/kaelix-broker
mkdir -p "$OUT"
: > "$RESULTS"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# shellcheck source=benches/common.sh
source benches/common.sh

start_kaelix() {
    KAELIX_NETWORK_HOST=127.0.0.1 KAELIX_NETWORK_PORT=$KAELIX_PORT KAELIX_TELEMETRY_METRICS_PROMETHEUS_PORT=0 \
    KAELIX_NETWORK_MAX_CONNECTIONS=$((CONNECTIONS * 2)) \
    KAELIX_LIMITS_MAX_SUBSCRIPTIONS_PER_CONNECTION=$((TOPICS * 2)) \
    RUST_LOG=warn $(prefix "$1") "$BROKER" >"$OUT/kaelix.log" 2>&1 &
    KAELIX_PID=$!
    PIDS+=("$KAELIX_PID")
    wait_port "$KAELIX_PORT"
}

start_nats() {
    $(prefix "$1") "$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" >"$OUT/nats.log" 2>&1 &
    NATS_PID=$!
    PIDS+=("$NATS_PID")
    wait_port "$NATS_PORT"
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# run PLACEMENT LABEL SCENARIO ARGS...: one run against Kaelix, then NATS.
run_pair() {
    local placement=$1 label=$2 scenario=$3; shift 3
    local p; p=$(prefix "$placement")
    $p "$BENCH" "$scenario" --target "kaelix://127.0.0.1:$KAELIX_PORT" --pid "$KAELIX_PID" \
        --label "$label" --json "$@" >>"$RESULTS"
    $p "$BENCH" "$scenario" --target "nats://127.0.0.1:$NATS_PORT" --pid "$NATS_PID" \
        --label "$label" --json "$@" >>"$RESULTS"
}

median_rate() { # median msgs_per_s of LABEL SCENARIO TARGET-KIND from the results so far
    python3 - "$RESULTS" "$1" "$2" "$3" <<'PY' 2>/dev/null || echo 0
import json, sys, statistics
path, label, scenario, kind = sys.argv[1:]
rates = [r["msgs_per_s"] for r in map(json.loads, open(path))
         if r["label"] == label and r["scenario"] == scenario and r["target"].startswith(kind) and r["payload_bytes"] == 16]
print(int(statistics.median(rates)) if rates else 0)
PY
}

for placement in default pinned; do
    echo "== placement: $placement"
    start_kaelix "$placement"
    start_nats "$placement"
    for run in $(seq 1 "$RUNS"); do
        echo "   run $run/$RUNS: throughput"
        for size in 16 128 1024; do
            run_pair "$placement" "$placement" pubsub --payload "$size" --duration "$DURATION"
        done
        $(prefix "$placement") "$BENCH" pubsub --target relay --label "$placement" --json --duration "$DURATION" >>"$RESULTS"
        run_pair "$placement" "$placement" fanout --subscribers 4 --duration "$DURATION"
        run_pair "$placement" "$placement" fanin --publishers 4 --duration "$DURATION"
        run_pair "$placement" "$placement" queue --subscribers 4 --duration "$DURATION"
        echo "   run $run/$RUNS: latency"
        run_pair "$placement" "$placement idle" latency --duration "$DURATION"
        $(prefix "$placement") "$BENCH" latency --target relay --label "$placement idle" --json --duration "$DURATION" >>"$RESULTS"
    done
    # 50% load: half the lower of the two brokers' 16 B 1→1 medians, the same rate for both.
    k=$(median_rate "$placement" pubsub kaelix); n=$(median_rate "$placement" pubsub nats)
    rate=$(( (k < n ? k : n) / 2 ))
    echo "   latency at 50% load: $rate msgs/s"
    for run in $(seq 1 "$RUNS"); do
        run_pair "$placement" "$placement 50% load" latency --rate "$rate" --duration "$DURATION"
    done
    stop "$KAELIX_PID"; stop "$NATS_PID"

    echo "   in-process latency"
    for run in $(seq 1 "$RUNS"); do
        $(prefix "$placement") "$BENCH" inprocess --label "$placement" --json --duration "$DURATION" >>"$RESULTS"
    done

    echo "   memory"
    for run in $(seq 1 "$RUNS"); do
        # Fresh brokers for each memory run, so that freed memory is not reused.
        start_kaelix "$placement"; start_nats "$placement"
        run_pair "$placement" "$placement" topics --count "$TOPICS"
        stop "$KAELIX_PID"; stop "$NATS_PID"
        start_kaelix "$placement"; start_nats "$placement"
        run_pair "$placement" "$placement" connections --count "$CONNECTIONS"
        stop "$KAELIX_PID"; stop "$NATS_PID"
    done
done

TABLE=$OUT/table.md
"$BENCH" report "$RESULTS" >"$TABLE"
cat "$TABLE"

DOC=docs/performance.md
if grep -q '<!-- compare:begin -->' "$DOC"; then
    python3 - "$DOC" "$TABLE" "$RUNS" "$DURATION" <<'PY'
import sys, datetime
doc, table, runs, duration = sys.argv[1:]
text = open(doc).read()
begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
head, rest = text.split(begin, 1)
_, tail = rest.split(end, 1)
body = (f"\n_Written by `benches/compare.sh` on {datetime.date.today()}: medians of {runs} runs of "
        f"{duration} s each._\n\n" + open(table).read())
open(doc, "w").write(head + begin + body + end + tail)
PY
    echo "updated $DOC"
fi
