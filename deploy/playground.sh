#!/usr/bin/env bash
# Single-machine playground (until the cluster playground lands): builds the binaries,
# starts nebd-server in DIR, exports a 1 GiB RAM volume over NBD on a Unix socket, prints
# how to attach, and stays in the foreground. Ctrl-C (or SIGTERM) stops everything.
#
#   deploy/playground.sh [DIR]        (default DIR: /tmp/curve-playground)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp/curve-playground}
cargo build --release --bins -q
mkdir -p "$dir"
target/release/nebd-server --run-dir "$dir/run" 2>>"$dir/nebd-server.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; exit 0' INT TERM
for _ in $(seq 100); do [ -S "$dir/run/control.sock" ] && break; sleep 0.1; done
uri=$(target/release/curve --run-dir "$dir/run" export add --volume mem:1G \
      --nbd "unix:$dir/run/nbd.sock" --name vol0)
cat <<MSG
nebd-server (pid $pid) serves vol0, 1 GiB of RAM, at:
  $uri

Attach with:
  nbdinfo '$uri'
  qemu-io --image-opts 'driver=nbd,server.type=unix,server.path=$dir/run/nbd.sock,export=vol0' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  fio --name=t --ioengine=nbd --uri='$uri' --rw=randrw --bs=4k --iodepth=32 --time_based --runtime=10
  qemu-system-x86_64 ... -drive driver=nbd,server.type=unix,server.path=$dir/run/nbd.sock,export=vol0,if=virtio
  curve --run-dir $dir/run export list
Logs: $dir/nebd-server.log. Ctrl-C stops.
MSG
wait $pid
