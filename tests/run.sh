#!/usr/bin/env bash
# The whole Curve-rs test suite, from a fresh machine:
#   1. installs the Debian packages the tests drive (real consumers), when missing;
#   2. checks formatting and lints;
#   3. builds every binary and runs every test tier (unit, in-process, real consumers).
# Fails loudly: any missing tool, lint or test failure stops it with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)       # nbdinfo, nbdcopy
command -v nbdcopy >/dev/null || need+=(libnbd-bin)
command -v qemu-io >/dev/null || need+=(qemu-utils)       # qemu-io, qemu-img
command -v cc >/dev/null || need+=(gcc)                   # builds the libnebd C example
command -v etcd >/dev/null || need+=(etcd-server)         # the MDS's HA store, started by tests
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "== installing ${need[*]}"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

echo "== fmt + clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== build"
cargo build --workspace --locked

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  cargo test --workspace --doc --locked
else
  # Without nextest's test groups, run tests one at a time: the fault-injection tests kill and
  # restart daemons and measure pauses.
  cargo test --workspace --locked --no-fail-fast -- --test-threads=1
fi
echo "== all tests passed"
