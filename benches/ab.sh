#!/usr/bin/env bash
# Two or more Kaelix brokers side by side in one run: a build before a change
# against the build after it, or one build under different settings.
#
#   benches/ab.sh before=/tmp/old/kaelix-broker after=target/release/kaelix-broker
#   benches/ab.sh off=target/release/kaelix-broker "spin=target/release/kaelix-broker KAELIX_RUNTIME_IDLE_SPIN_US=100"
#
# Each argument is LABEL=BINARY followed by optional KAELIX_* settings (and
# BENCH_TLS_CA=FILE, which makes the load tool connect over TLS trusting
# FILE; the broker then needs KAELIX_SECURITY_TLS_* settings;
# CONFIG=FILE, the broker's configuration file; and BENCH=FILE, a load tool
# of the variant's own build, to compare client crates too). For
# each placement (default, and everything pinned to CPU 0) and each of RUNS
# runs, every scenario runs once against each variant in turn; the table
# gives medians and each variant's ratio to the first. Raw results go to
# target/ab/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
PLACEMENTS=${PLACEMENTS:-"default pinned"}
PORT=${PORT:-18180}
LOAD_RATE=${LOAD_RATE:-200000}
# Payload sizes of the 1→1 scenarios; ONLY_PUBSUB=1 skips the others.
SIZES=${SIZES:-"16 128 1024"}
ONLY_PUBSUB=${ONLY_PUBSUB:-0}
# ONLY_LATENCY=1 runs the two latency scenarios alone.
ONLY_LATENCY=${ONLY_LATENCY:-0}
OUT=target/ab
RESULTS=$OUT/results.jsonl
[ $# -ge 2 ] || { echo "usage: $0 LABEL=BINARY [KAELIX_X=V ...] LABEL=BINARY ..." >&2; exit 2; }

cargo build --release -q -p kaelix-bench
BENCH=target/release/kaelix-bench
mkdir -p "$OUT" "$OUT/run"
RUNDIR=$(realpath "$OUT/run")
: > "$RESULTS"

# shellcheck source=benches/common.sh
source benches/common.sh

LABELS=(); PORTS=(); BROKER_PIDS=(); BENCH_EXTRA=(); BENCHES=()
start_all() {
    local placement=$1 i=0 spec label bin word
    LABELS=(); PORTS=(); BROKER_PIDS=(); BENCH_EXTRA=(); BENCHES=()
    for spec in "${VARIANTS[@]}"; do
        read -r -a words <<<"$spec"
        label=${words[0]%%=*}; bin=$(realpath "${words[0]#*=}")
        local port=$((PORT + i)) settings=() extra="" args=() bench=$BENCH
        for word in "${words[@]:1}"; do
            case $word in
                BENCH_TLS_CA=*) extra="--tls-ca $(realpath "${word#*=}")" ;;
                BENCH=*) bench=$(realpath "${word#*=}") ;;
                CONFIG=*) args=(--config "$(realpath "${word#*=}")") ;;
                *) settings+=("$word") ;;
            esac
        done
        BENCH_EXTRA+=("$extra"); BENCHES+=("$bench")
        # From an empty directory: a kaelix.toml here is not the variant's.
        (cd "$RUNDIR" && exec env KAELIX_TELEMETRY_METRICS_PROMETHEUS_PORT=0 "${settings[@]}" KAELIX_NETWORK_HOST=127.0.0.1 \
            KAELIX_NETWORK_PORT=$port RUST_LOG=warn $(prefix "$placement") "$bin" "${args[@]}") \
            >"$OUT/$label.log" 2>&1 &
        BROKER_PIDS+=($!); PIDS+=($!); LABELS+=("$label"); PORTS+=("$port")
        wait_port "$port"
        i=$((i + 1))
    done
}
stop_all() { for p in "${BROKER_PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }

VARIANTS=("$@")
run_all() { # placement name scenario args...
    local placement=$1 name=$2 scenario=$3; shift 3
    local i
    for i in "${!LABELS[@]}"; do
        $(prefix "$placement") "${BENCHES[$i]}" "$scenario" --target "kaelix://127.0.0.1:${PORTS[$i]}" \
            --pid "${BROKER_PIDS[$i]}" --label "${LABELS[$i]}|$placement|$name" --json ${BENCH_EXTRA[$i]} "$@" >>"$RESULTS"
    done
}

for placement in $PLACEMENTS; do
    echo "== placement: $placement"
    start_all "$placement"
    for run in $(seq 1 "$RUNS"); do
        echo "   run $run/$RUNS"
        if [ "$ONLY_LATENCY" != 1 ]; then
            for size in $SIZES; do
                run_all "$placement" "pubsub $size B" pubsub --payload "$size" --duration "$DURATION"
            done
            [ "$ONLY_PUBSUB" = 1 ] && continue
            run_all "$placement" "fanout 1→4" fanout --subscribers 4 --duration "$DURATION"
            run_all "$placement" "fanin 4→1" fanin --publishers 4 --duration "$DURATION"
            run_all "$placement" "queue of 4" queue --subscribers 4 --duration "$DURATION"
        fi
        run_all "$placement" "latency idle" latency --duration "$DURATION"
        run_all "$placement" "latency at ${LOAD_RATE}/s" latency --rate "$LOAD_RATE" --duration "$DURATION"
    done
    stop_all
done

python3 - "$RESULTS" "${VARIANTS[@]}" <<'PY'
import json, sys, statistics
from collections import defaultdict
path = sys.argv[1]
variants = [v.split()[0].split("=")[0] for v in sys.argv[2:]]
rows, order = defaultdict(list), []
for r in map(json.loads, open(path)):
    label, placement, kind = r["label"].split("|")
    rows[(placement, kind, label)].append(r)
    if (placement, kind) not in order:
        order.append((placement, kind))
def med(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None
fmt = lambda x: "–" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.2f}")
print("| placement | scenario | metric | " + " | ".join(variants) + " | "
      + " | ".join(f"{v}/{variants[0]}" for v in variants[1:]) + " |")
print("|---" * (3 + 2 * len(variants) - 1) + "|")
for placement, kind in order:
    metrics = ["p50_us", "p99_us", "broker_cpu_s_per_m"] if kind.startswith("latency") \
        else ["msgs_per_s", "broker_cpu_s_per_m"]
    for m in metrics:
        vals = [med(rows.get((placement, kind, v), []), m) for v in variants]
        if vals[0] is None:
            continue
        ratios = ["–" if (x is None or not vals[0]) else f"{x / vals[0]:.2f}×" for x in vals[1:]]
        print(f"| {placement} | {kind} | {m} | " + " | ".join(map(fmt, vals)) + " | " + " | ".join(ratios) + " |")
PY
