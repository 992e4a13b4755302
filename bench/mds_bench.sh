#!/usr/bin/env bash
# MDS metadata rates on the embedded store and on etcd, measured the same way in one run:
# create + open + close of N volumes and GetOrAllocateSegment (see
# cluster/mds/examples/mds_bench.rs). Each MDS gets 3 real chunkservers so that its pool's
# copysets exist and segments can be allocated.
#
#   bench/mds_bench.sh [--volumes 10000] [--concurrency 32] [--segments 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p curve-mds -p curve-chunkserver --bins --example mds_bench
BIN=target/release
TMP=$(mktemp -d /tmp/curve-mds-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

# run_one LABEL MDS_PORT [MDS ARGS...]
run_one() {
    local label=$1 port=$2
    shift 2
    "$BIN/curve-mds" --listen "127.0.0.1:$port" --data-dir "$TMP/$label/mds" "$@" \
        2>"$TMP/$label-mds.log" &
    PIDS+=($!)
    wait_port "$port"
    for i in 1 2 3; do
        "$BIN/curve-chunkserver" --data-dir "$TMP/$label/cs$i" --listen "127.0.0.1:$((port + 10 + i))" \
            --mds "127.0.0.1:$port" --zone "zone$i" --server "server$i" --pool-target 2 \
            2>"$TMP/$label-cs$i.log" &
        PIDS+=($!)
    done
    # The pool's copysets are created once the three chunkservers registered.
    for _ in $(seq 1 100); do
        grep -q "copysets created" "$TMP/$label-mds.log" && break
        sleep 0.2
    done
    "$BIN/examples/mds_bench" --mds "127.0.0.1:$port" --label "$label" "${BENCH_ARGS[@]}"
}

BENCH_ARGS=("$@")
mkdir -p "$TMP/embedded" "$TMP/etcd"
run_one embedded 16700

command -v etcd >/dev/null || { echo "etcd not installed (apt-get install etcd-server)"; exit 1; }
etcd --name bench --data-dir "$TMP/etcd/data" \
    --listen-client-urls http://127.0.0.1:16379 --advertise-client-urls http://127.0.0.1:16379 \
    --listen-peer-urls http://127.0.0.1:16380 --initial-advertise-peer-urls http://127.0.0.1:16380 \
    --initial-cluster bench=http://127.0.0.1:16380 --log-level warn 2>"$TMP/etcd.log" &
PIDS+=($!)
wait_port 16379
run_one etcd 16800 --etcd 127.0.0.1:16379
