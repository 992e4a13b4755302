# Parallel O_DIRECT writers on a ublk device while part2 (inside the guest) is killed -9 and
# restarted: the new part2 recovers the same device, the writers see a pause, no error.
. /scenarios/lib.sh
jobs=$(param jobs 4)
mib=$(param mib 4)
secs=$(param secs 10)
part2_start || exit 1
path=$(ublk_add u0) || fail "export add"
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
grep -q "recovering ublk device" /tmp/part2.log && echo "CURVE-RESULT recovered=yes"
echo "CURVE-MD5 writers $(md5_range "$path" 0 $((jobs * mib)))"
dmesg_check || rc=1
[ $rc = 0 ] || part2_log
exit $rc
