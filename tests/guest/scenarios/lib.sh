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
