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
curve-guest-io writers "$path" --jobs "$jobs" --size "${mib}M" --bs 4K --time "$secs" \
  --max-passes 50 > /tmp/writers.out 2>&1 &
wpid=$!
sleep 2
kill -9 "$part2_pid"
echo "CURVE-RESULT killed=yes"
sleep 1
part2_start || fail "restart"
wait $wpid
rc=$?
cat /tmp/writers.out
after=$(curve export list --format json | sed -n 's/.*"device": "\(.*\)".*/\1/p')
echo "CURVE-RESULT path_before=$path path_after=$after"
grep -q "kernel NBD device reattached" /tmp/part2.log && echo "CURVE-RESULT reattached=yes"
echo "CURVE-MD5 writers $(md5_range "$path" 0 $((jobs * mib)))"
echo "CURVE-MD5 file $(dd if=/tmp/w.img bs=1M count=$((jobs * mib)) 2> /dev/null | md5sum | cut -d' ' -f1)"

# A planned restart: SIGTERM closes the sockets, the next part2 reattaches the device.
kill -TERM "$part2_pid"
i=0
while kill -0 "$part2_pid" 2> /dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
part2_start || fail "start after SIGTERM"
again=$(curve export list --format json | sed -n 's/.*"device": "\(.*\)".*/\1/p')
echo "CURVE-RESULT path_after_term=$again"
echo "CURVE-MD5 after-term $(md5_range "$path" 0 $((jobs * mib)))"
dmesg | grep -i nbd | grep -v 'command line' | sed 's/^/CURVE-KERNEL /'
dmesg_check || rc=1
[ $rc = 0 ] || part2_log
exit $rc
