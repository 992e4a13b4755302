# Parallel O_DIRECT writers on a ublk device while part2 (inside the guest) is killed -9 and
# restarted: the new part2 recovers the same device, the writers see a pause, no error. Then a
# planned restart (SIGTERM, start again): the same device again, the same bytes.
# The volume (curve.ublk_volume) should keep its data across part2 restarts: a file volume on
# the guest's tmpfs (/tmp/w.img, created here).
. /scenarios/lib.sh
jobs=$(param jobs 4)
mib=$(param mib 4)
secs=$(param secs 10)
dd if=/dev/zero of=/tmp/w.img bs=1M count=0 seek=64 2> /dev/null
part2_start || exit 1
path=$(ublk_add u0) || fail "export add"
wait_dev "$path" || fail "no $path"
writers_across_kill9 "$path" "$jobs" "$mib" "$secs"
rc=$writers_rc
grep -q "recovering ublk device" /tmp/part2.log && echo "CURVE-RESULT recovered=yes"
# A planned restart: SIGTERM leaves the device to the kernel, the next part2 recovers it.
term_restart "$path" $((jobs * mib))
dmesg_check || rc=1
[ $rc = 0 ] || part2_log
exit $rc
