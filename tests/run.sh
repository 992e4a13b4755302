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
# The QEMU guest tests (tests/src/guest.rs): a Linux guest under TCG with the kernel's own
# virtio-blk (and later ublk, nbd) drivers as consumers.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
ls /boot/vmlinuz-6.12* >/dev/null 2>&1 || need+=(linux-image-6.12-amd64)   # has ublk_drv
[ -x /bin/busybox ] || need+=(busybox-static)               # the guest's userland
command -v xz >/dev/null || need+=(xz-utils)                # unpacks the guest's modules
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  extra=()
  if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
    # qemu-system-x86 needs qemu-utils of its own version: a newer preinstalled qemu-utils
    # is replaced by it (qemu-io, qemu-img and qemu-storage-daemon then come from that version).
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    need=("${need[@]/qemu-utils/}")
    need+=("qemu-utils=$v")
    extra+=(--allow-downgrades)
  fi
  echo "== installing ${need[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${extra[@]}" ${need[@]}
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
