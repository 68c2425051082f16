#!/usr/bin/env bash
# Publishing on one node of a three-node cluster and subscribing on another,
# against publishing and subscribing on one node of the same cluster, in one
# run: the cost of the hop between nodes.
#
#   benches/cluster.sh
#
# Three release brokers on 127.0.0.1 form a cluster (plain TCP links, or
# mutual TLS with CLUSTER_TLS=1 and certificates made by openssl here). For
# each of RUNS runs, every scenario runs once on one node ("local": publisher
# and subscriber on node 1) and once across ("cross": publisher on node 1,
# subscriber on node 2). The table gives medians and cross/local ratios;
# broker CPU is node 1's (the publishing node) in both. Raw results go to
# target/cluster-bench/results.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-5}
PORT=${PORT:-18280}
LOAD_RATE=${LOAD_RATE:-50000}
SIZES=${SIZES:-"16 128 1024"}
CLUSTER_TLS=${CLUSTER_TLS:-0}
OUT=target/cluster-bench
RESULTS=$OUT/results.jsonl

cargo build --release -q -p kaelix-bench -p kaelix-broker
BENCH=target/release/kaelix-bench
BROKER=$(realpath target/release/kaelix-broker)
CLI=target/release/kaelix
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

# shellcheck source=benches/common.sh
source benches/common.sh

TLS_ENV=()
if [ "$CLUSTER_TLS" = 1 ]; then
    pki=$OUT/pki
    mkdir -p "$pki"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench-ca -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=node \
        -keyout "$pki/node.key" -out "$pki/node.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$pki/ext"
    openssl x509 -req -in "$pki/node.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 2 -extfile "$pki/ext" -out "$pki/node.pem" 2>/dev/null
    TLS_ENV=(KAELIX_CLUSTER_TLS_ENABLED=true KAELIX_CLUSTER_TLS_CERT_PATH="$pki/node.pem"
        KAELIX_CLUSTER_TLS_KEY_PATH="$pki/node.key" KAELIX_CLUSTER_TLS_CA_PATH="$pki/ca.pem")
fi

SEEDS="[\"127.0.0.1:$((PORT + 10))\",\"127.0.0.1:$((PORT + 11))\",\"127.0.0.1:$((PORT + 12))\"]"
NODE_PIDS=()
for i in 0 1 2; do
    dir=$OUT/node$((i + 1))
    mkdir -p "$dir"
    (cd "$dir" && exec env KAELIX_TELEMETRY_METRICS_PROMETHEUS_PORT=0 RUST_LOG=warn \
        KAELIX_NETWORK_HOST=127.0.0.1 KAELIX_NETWORK_PORT=$((PORT + i)) \
        KAELIX_CLUSTER_ENABLED=true KAELIX_CLUSTER_NODE_ID=$((i + 1)) \
        KAELIX_CLUSTER_LISTEN=127.0.0.1:$((PORT + 10 + i)) KAELIX_CLUSTER_SEEDS="$SEEDS" \
        KAELIX_CLUSTER_DATA_DIR="$dir/data" "${TLS_ENV[@]}" "$BROKER") >"$dir/log" 2>&1 &
    NODE_PIDS+=($!); PIDS+=($!)
done
for i in 0 1 2; do wait_port $((PORT + i)); done
for _ in $(seq 1 200); do
    if "$CLI" --server 127.0.0.1:$PORT cluster status 2>/dev/null | grep -q "3 of 3 members up"; then
        break
    fi
    sleep 0.1
done
"$CLI" --server 127.0.0.1:$PORT cluster status

run_both() { # name scenario args...
    local name=$1 scenario=$2; shift 2
    "$BENCH" "$scenario" --target "kaelix://127.0.0.1:$PORT" --pid "${NODE_PIDS[0]}" \
        --label "local|$name" --json "$@" >>"$RESULTS"
    "$BENCH" "$scenario" --target "kaelix://127.0.0.1:$PORT" \
        --subscribe-to "kaelix://127.0.0.1:$((PORT + 1))" --pid "${NODE_PIDS[0]}" \
        --label "cross|$name" --json "$@" >>"$RESULTS"
}

for run in $(seq 1 "$RUNS"); do
    echo "   run $run/$RUNS"
    for size in $SIZES; do
        run_both "pubsub $size B" pubsub --payload "$size" --duration "$DURATION"
    done
    run_both "fanout 1→4" fanout --subscribers 4 --duration "$DURATION"
    run_both "latency idle" latency --duration "$DURATION"
    run_both "latency at ${LOAD_RATE}/s" latency --rate "$LOAD_RATE" --duration "$DURATION"
done

python3 - "$RESULTS" <<'PY'
import json, sys, statistics
from collections import defaultdict
rows, order = defaultdict(list), []
for r in map(json.loads, open(sys.argv[1])):
    where, kind = r["label"].split("|")
    rows[(kind, where)].append(r)
    if kind not in order:
        order.append(kind)
def med(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None
fmt = lambda x: "–" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.2f}")
print("| scenario | metric | one node | across nodes | across/one |")
print("|---|---|---|---|---|")
for kind in order:
    metrics = ["p50_us", "p99_us", "broker_cpu_s_per_m"] if kind.startswith("latency") \
        else ["msgs_per_s", "broker_cpu_s_per_m"]
    for m in metrics:
        a, b = med(rows[(kind, "local")], m), med(rows[(kind, "cross")], m)
        if a is None:
            continue
        ratio = "–" if (b is None or not a) else f"{b / a:.2f}×"
        print(f"| {kind} | {m} | {fmt(a)} | {fmt(b)} | {ratio} |")
lost = sum(r.get("lost", 0) for rs in rows.values() for r in rs)
print(f"\nmessages lost across all runs: {lost}")
PY
