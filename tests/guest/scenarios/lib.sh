# Helpers shared by the guest scenarios (sourced).

# param NAME DEFAULT: the value of curve.NAME=VALUE on the kernel command line.
param() {
  v=$(tr ' ' '\n' < /proc/cmdline | sed -n "s/^curve\.$1=//p" | tail -n 1)
  echo "${v:-$2}"
}

# wait_dev DEV: waits up to 20 s for a block device node.
wait_dev() {
  i=0
  while [ ! -b "$1" ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
  [ -b "$1" ] || { echo "CURVE-FAIL no $1"; return 1; }
}

# md5_range DEV SKIP_MIB COUNT_MIB: md5 of a range read with O_DIRECT.
md5_range() {
  dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}

# dmesg_check: reports the kernel's I/O complaints; fails when there are any.
dmesg_check() {
  bad=$(dmesg | grep -iE 'I/O error|blk_update_request|critical|timeout|virtio_blk.*(err|fail)|Buffer I/O' )
  if [ -n "$bad" ]; then
    echo "$bad" | sed 's/^/CURVE-DMESG /'
    echo "CURVE-RESULT dmesg=dirty"
    return 1
  fi
  echo "CURVE-RESULT dmesg=clean"
}

# part2 inside the guest (ublk disks: the guest kernel has ublk_drv, the host's has not).
export CURVE_RUN_DIR=/tmp/run

# part2_start: starts nebd-server on /tmp/run (restoring what its metafile holds) and waits
# until its control socket answers; sets part2_pid.
part2_start() {
  mkdir -p /tmp/run
  CURVE_NBD_POLL_US=$(param poll_us 50) RUST_LOG=${RUST_LOG:-info} \
    nebd-server --run-dir /tmp/run >> /tmp/part2.log 2>&1 &
  part2_pid=$!
  i=0
  until curve export list > /dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -ge 300 ] || ! kill -0 "$part2_pid" 2> /dev/null; then
      echo "CURVE-FAIL nebd-server did not come up"
      part2_log
      return 1
    fi
    sleep 0.1
  done
}

# part2_log: part2's log on the console.
part2_log() {
  sed 's/^/PART2 /' /tmp/part2.log
}

# ublk_add NAME [ARGS...]: a ublk export of the disk's volume (curve.ublk_volume, _queues,
# _depth); prints the device path `curve export add` printed.
ublk_add() {
  name=$1
  shift
  curve export add --volume "$(param ublk_volume mem:64M)" --ublk \
    --queues "$(param ublk_queues 1)" --queue-depth "$(param ublk_depth 128)" --name "$name" "$@"
}

# fail MESSAGE: reports a failure with part2's log and exits.
fail() {
  echo "CURVE-FAIL $*"
  part2_log
  exit 1
}
