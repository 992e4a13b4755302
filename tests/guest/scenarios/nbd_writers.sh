# Parallel O_DIRECT writers on a kernel NBD device that a part2 inside the guest attached
# (`--nbd-device`, 2 connections) while part2 is killed -9 and restarted: the new part2 finds
# the device in its metafile, checks its backend cookie and gives the kernel new sockets
# (NBD_CMD_RECONFIGURE); the kernel resends what the dead part2 held. The writers see a pause,
# no error. Then SIGTERM and a new part2: the same device and bytes. The volume
# (curve.nbd_volume) is a file on the guest's tmpfs (/tmp/w.img).
. /scenarios/lib.sh
jobs=$(param jobs 4)
mib=$(param mib 4)
secs=$(param secs 10)
dd if=/dev/zero of=/tmp/w.img bs=1M count=0 seek=64 2> /dev/null
part2_start || exit 1
path=$(curve export add --volume "$(param nbd_volume file:/tmp/w.img)" --nbd-device \
  --connections 2 --io-timeout "$(param io_timeout 5)" --name k0) || fail "export add"
wait_dev "$path" || fail "no $path"
writers_across_kill9 "$path" "$jobs" "$mib" "$secs"
rc=$writers_rc
grep -q "kernel NBD device reattached" /tmp/part2.log && echo "CURVE-RESULT reattached=yes"
# A planned restart: SIGTERM closes the sockets, the next part2 reattaches the device.
term_restart "$path" $((jobs * mib))
dmesg | grep -i nbd | grep -v 'command line' | sed 's/^/CURVE-KERNEL /'
dmesg_check || rc=1
[ $rc = 0 ] || part2_log
exit $rc
