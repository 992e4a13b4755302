# Parallel O_DIRECT writers for the part2 crash tests: the host kills part2 once
# CURVE-WRITERS-STARTED shows; the writers must finish without an I/O error and verify.
. /scenarios/lib.sh
dev=$(param dev /dev/vda)
jobs=$(param jobs 4)
mib=$(param mib 4)
secs=$(param secs 8)
wait_dev "$dev" || exit 1
curve-guest-io writers "$dev" --jobs "$jobs" --size "${mib}M" --bs 4K --time "$secs" --max-passes 50
rc=$?
echo "CURVE-MD5 writers $(md5_range "$dev" 0 $((jobs * mib)))"
dmesg_check || rc=1
exit $rc
