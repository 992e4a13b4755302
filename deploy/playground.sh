#!/usr/bin/env bash
# Single-machine playground (until the cluster playground lands): builds the binaries,
# starts nebd-server in DIR, exports a 1 GiB RAM volume over NBD on a Unix socket, prints
# how to attach, and stays in the foreground. Ctrl-C (or SIGTERM) stops everything.
#
#   deploy/playground.sh [DIR]        (default DIR: /tmp/curve-playground)
#
# CURVE_BIN_DIR=DIR uses the binaries there instead of building release ones (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/curve-playground}
if [ -n "${CURVE_BIN_DIR:-}" ]; then
  bin=$CURVE_BIN_DIR
else
  cargo build --release --bins -q
  bin=target/release
fi
mkdir -p "$dir"
# Supervise part2: if it dies it is restarted at once, and restores its exports from its
# metafile (a mem: volume comes back empty: it is RAM).
supervise() {
  trap 'exit 0' TERM
  while true; do
    $bin/nebd-server --run-dir "$dir/run" 2>>"$dir/nebd-server.log" &
    echo $! >"$dir/nebd-server.pid.current"
    wait $! || true
    echo "nebd-server exited; restarting" >>"$dir/nebd-server.log"
  done
}
supervise &
sup=$!
stop() {
  trap - INT TERM
  kill -TERM $sup 2>/dev/null || true          # first the supervisor, so it restarts nothing
  wait $sup 2>/dev/null || true
  kill -TERM "$(cat "$dir/nebd-server.pid.current" 2>/dev/null)" 2>/dev/null || true
  wait 2>/dev/null || true
  exit 0
}
trap stop INT TERM
for _ in $(seq 100); do
  $bin/curve --run-dir "$dir/run" export list >/dev/null 2>&1 && break
  sleep 0.1
done
if $bin/curve --run-dir "$dir/run" export list | grep -q '^vol0 '; then
  uri=$($bin/curve --run-dir "$dir/run" export list --format json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["uri"])')
else
  uri=$($bin/curve --run-dir "$dir/run" export add --volume mem:1G \
        --nbd "unix:$dir/run/nbd.sock" --name vol0)
fi
cat <<MSG
nebd-server (supervised) serves vol0, 1 GiB of RAM, at:
  $uri

Attach with:
  nbdinfo '$uri'
  qemu-io --image-opts 'driver=nbd,server.type=unix,server.path=$dir/run/nbd.sock,export=vol0' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  fio --name=t --ioengine=nbd --uri='$uri' --rw=randrw --bs=4k --iodepth=32 --time_based --runtime=10
  qemu-system-x86_64 ... -drive driver=nbd,server.type=unix,server.path=$dir/run/nbd.sock,export=vol0,if=virtio
  curve --run-dir $dir/run export list
  libnebd (part1): socket $dir/run/nebd.sock
Logs: $dir/nebd-server.log. Ctrl-C stops.
MSG
wait $sup || true
stop
