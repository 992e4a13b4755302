# Live upgrade of a part2 inside the guest that serves a kernel NBD device (--nbd-device, 2
# connections) and a ublk device, each under O_DIRECT writers: `curve upgrade` twice, the second
# time to a copy of the binary. The NBD device's sockets are handed over (the kernel sees
# nothing); the ublk device goes through the kernel's recovery once the old part2 has exited.
# Volumes are files on the guest's tmpfs.
. /scenarios/lib.sh
jobs=$(param jobs 2)
mib=$(param mib 4)
secs=$(param secs 10)
dd if=/dev/zero of=/tmp/k.img bs=1M count=0 seek=32 2> /dev/null
dd if=/dev/zero of=/tmp/u.img bs=1M count=0 seek=32 2> /dev/null
part2_start || exit 1
k=$(curve export add --volume file:/tmp/k.img --nbd-device --connections 2 --io-timeout 30 \
  --name k0) || fail "nbd device"
u=$(curve export add --volume file:/tmp/u.img --ublk --queues 1 --queue-depth 64 --name u0) \
  || fail "ublk device"
wait_dev "$k" || fail "no $k"
wait_dev "$u" || fail "no $u"
echo "CURVE-RESULT devices_before=$k,$u pid_before=$(cat /tmp/run/nebd-server.pid)"
curve-guest-io writers "$k" --jobs "$jobs" --size "${mib}M" --bs 4K --time "$secs" \
  --max-passes 50 > /tmp/k.out 2>&1 &
kp=$!
curve-guest-io writers "$u" --jobs "$jobs" --size "${mib}M" --bs 4K --time "$secs" \
  --max-passes 50 > /tmp/u.out 2>&1 &
upid=$!
sleep 2
curve upgrade --format json > /tmp/up1.json 2>&1 || fail "upgrade 1: $(cat /tmp/up1.json)"
echo "CURVE-UPGRADE $(tr -d ' \n' < /tmp/up1.json)"
sleep 2
cp /bin/nebd-server /tmp/nebd-server-2
curve upgrade --binary /tmp/nebd-server-2 --format json > /tmp/up2.json 2>&1 \
  || fail "upgrade 2: $(cat /tmp/up2.json)"
echo "CURVE-UPGRADE $(tr -d ' \n' < /tmp/up2.json)"
wait $kp
rc=$?
wait $upid || rc=1
sed 's/op=writers/op=k-writers/' /tmp/k.out
sed 's/op=writers/op=u-writers/' /tmp/u.out
devices=$(curve export list --format json | sed -n 's/.*"device": "\(.*\)".*/\1/p' | sort -u | tr '\n' ',')
echo "CURVE-RESULT devices_after=${devices%,} pid_after=$(cat /tmp/run/nebd-server.pid)"
echo "CURVE-RESULT ublk_recovered=$(grep -c 'ublk export recovered' /tmp/part2.log) nbd_taken_over=$(grep -c 'kernel NBD device taken over' /tmp/part2.log)"
total=$((jobs * mib))
echo "CURVE-MD5 k-writers $(md5_range "$k" 0 $total)"
echo "CURVE-MD5 k-file $(dd if=/tmp/k.img bs=1M count=$total 2> /dev/null | md5sum | cut -d' ' -f1)"
echo "CURVE-MD5 u-writers $(md5_range "$u" 0 $total)"
echo "CURVE-MD5 u-file $(dd if=/tmp/u.img bs=1M count=$total 2> /dev/null | md5sum | cut -d' ' -f1)"
grep -E 'took over|recover|paused|offer' /tmp/part2.log | sed 's/^/CURVE-PART2 /'
dmesg | grep -iE 'nbd|ublk' | grep -v 'command line' | sed 's/^/CURVE-KERNEL /'
dmesg_check || rc=1
[ $rc = 0 ] || part2_log
exit $rc
