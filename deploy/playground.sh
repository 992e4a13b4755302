#!/usr/bin/env bash
# The single-machine playground: builds the binaries, then runs
#   curve playground up --dir DIR [ARGS...]
# which starts an MDS (embedded store), 3 raft chunkservers (one zone each) and nebd-server
# as separate processes in DIR, creates a 10 GiB volume /vol0, exports it over NBD on a Unix
# socket, prints its nbd+unix:// URI and how to attach, and supervises the daemons in the
# foreground. Ctrl-C (or `curve playground down --dir DIR`) stops everything.
#
#   deploy/playground.sh [DIR] [--size 10G] [--port 6700] [--name vol0]
#                                           (default DIR: /tmp/curve-playground)
#
# CURVE_BIN_DIR=DIR uses the binaries there instead of building release ones (the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=/tmp/curve-playground
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  dir=$1
  shift
fi
if [ -n "${CURVE_BIN_DIR:-}" ]; then
  bin=$CURVE_BIN_DIR
else
  cargo build --release --bins -q
  bin=target/release
fi
export CURVE_BIN_DIR=$bin
exec "$bin/curve" playground up --dir "$dir" "$@"
