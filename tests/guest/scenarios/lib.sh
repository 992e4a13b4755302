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

# exported_device: the device `curve export list` shows (the one export of a *_writers scenario).
exported_device() {
  curve export list --format json | sed -n 's/.*"device": "\(.*\)".*/\1/p'
}

# writers_across_kill9 DEV JOBS MIB SECS: O_DIRECT writers on DEV (a volume on /tmp/w.img); two
# seconds in part2 is killed -9 and started again. Reports the writers, the device before and
# after, and md5s of the device and of the file; sets writers_rc.
writers_across_kill9() {
  curve-guest-io writers "$1" --jobs "$2" --size "${3}M" --bs 4K --time "$4" \
    --max-passes 50 > /tmp/writers.out 2>&1 &
  wpid=$!
  sleep 2
  kill -9 "$part2_pid"
  echo "CURVE-RESULT killed=yes"
  sleep 1
  part2_start || fail "restart"
  wait $wpid
  writers_rc=$?
  cat /tmp/writers.out
  echo "CURVE-RESULT path_before=$1 path_after=$(exported_device)"
  echo "CURVE-MD5 writers $(md5_range "$1" 0 $(($2 * $3)))"
  echo "CURVE-MD5 file $(dd if=/tmp/w.img bs=1M count=$(($2 * $3)) 2> /dev/null | md5sum | cut -d' ' -f1)"
}

# term_restart DEV MIB: a planned restart (SIGTERM, then a new part2); reports the device and the
# md5 of its first MIB MiB after it.
term_restart() {
  kill -TERM "$part2_pid"
  i=0
  while kill -0 "$part2_pid" 2> /dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
  part2_start || fail "start after SIGTERM"
  echo "CURVE-RESULT path_after_term=$(exported_device)"
  echo "CURVE-MD5 after-term $(md5_range "$1" 0 "$2")"
}

# fio_4k DEV RW QD SECS: one fio run (4K, O_DIRECT, io_uring) on DEV; prints "IOPS LAT_US" of its
# reads or writes, or fails.
fio_4k() {
  out=$(fio --name=b --filename="$1" --direct=1 --ioengine=io_uring --rw="$2" --bs=4k \
    --iodepth="$3" --size=64M --time_based --runtime="$4" --output-format=terse \
    --terse-version=3 2> /tmp/fio.err) || { cat /tmp/fio.err; return 1; }
  # terse v3: 8 read iops, 40 read clat mean (us); 49 write iops, 81 write clat mean.
  if [ "$2" = randread ]; then
    echo "$(echo "$out" | cut -d';' -f8) $(echo "$out" | cut -d';' -f40)"
  else
    echo "$(echo "$out" | cut -d';' -f49) $(echo "$out" | cut -d';' -f81)"
  fi
}
