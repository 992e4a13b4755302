# O_DIRECT pattern on a vhost-user-blk disk, read back and hashed in the guest; discard and flush
# from the guest (blkdiscard, sync). The host compares the hashes with the volume read through
# another frontend.
. /scenarios/lib.sh
dev=$(param dev /dev/vda)
mib=$(param mib 16)
wait_dev "$dev" || exit 1
echo "CURVE-RESULT size=$(blockdev --getsize64 "$dev") ro=$(blockdev --getro "$dev") \
queues=$(ls /sys/block/${dev#/dev/}/mq | wc -l) \
discard_max=$(cat /sys/block/${dev#/dev/}/queue/discard_max_bytes) \
write_cache=$(tr ' ' '_' < /sys/block/${dev#/dev/}/queue/write_cache)"
curve-guest-io write "$dev" --size "${mib}M" --bs 64K --seed 7 || exit 1
curve-guest-io verify "$dev" --size "${mib}M" --bs 4K --seed 7 || exit 1
echo "CURVE-MD5 pattern $(md5_range "$dev" 0 "$mib")"
# Discard the second half of the pattern, then flush through the block device's fsync.
half=$((mib / 2))
blkdiscard -o $((half << 20)) -l $((half << 20)) "$dev" || { echo "CURVE-FAIL blkdiscard"; exit 1; }
sync "$dev" || { echo "CURVE-FAIL sync"; exit 1; }
echo "CURVE-MD5 after-discard $(md5_range "$dev" 0 "$mib")"
echo "CURVE-MD5 discarded $(md5_range "$dev" "$half" "$half")"
echo "CURVE-MD5 zeros $(dd if=/dev/zero bs=1M count="$half" 2>/dev/null | md5sum | cut -d' ' -f1)"
dmesg_check
