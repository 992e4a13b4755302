# ublk devices of a part2 inside the guest: the path `curve export add --ublk` prints, the
# device's geometry, an O_DIRECT pattern at 4 KiB and 1 MiB, the same bytes read through an NBD
# export of the same volume (nbdcopy), discard and flush reaching the volume, a read-only device,
# bad input, and `export remove` while writers run.
. /scenarios/lib.sh
part2_start || exit 1

# 1. The disk's volume (a RAM volume): path, geometry, listing, pattern.
path=$(ublk_add u0) || fail "export add u0"
echo "CURVE-RESULT path=$path"
wait_dev "$path" || fail "no $path"
d=${path#/dev/}
echo "CURVE-RESULT size=$(blockdev --getsize64 "$path") ro=$(blockdev --getro "$path") \
queues=$(ls "/sys/block/$d/mq" | wc -l) \
discard_max=$(cat "/sys/block/$d/queue/discard_max_bytes") \
write_cache=$(tr ' ' '_' < "/sys/block/$d/queue/write_cache") \
max_hw_kb=$(cat "/sys/block/$d/queue/max_hw_sectors_kb") \
lbs=$(cat "/sys/block/$d/queue/logical_block_size")"
curve export list --format json > /tmp/list.json
if grep -q '"type": "ublk"' /tmp/list.json && grep -q "\"device\": \"$path\"" /tmp/list.json; then
  echo "CURVE-RESULT listed=yes"
else
  cat /tmp/list.json
  fail "export list"
fi
curve-guest-io write "$path" --offset 0 --size 8M --bs 4K --seed 3 || fail "4K write"
curve-guest-io write "$path" --offset 8M --size 8M --bs 1M --seed 5 || fail "1M write"
curve-guest-io verify "$path" --offset 0 --size 8M --bs 1M --seed 3 || fail "verify 4K pattern"
curve-guest-io verify "$path" --offset 8M --size 8M --bs 4K --seed 5 || fail "verify 1M pattern"

# 2. A file volume exported twice, over ublk and NBD: the same bytes through both.
dd if=/dev/zero of=/tmp/vol.img bs=1M count=0 seek=32 2> /dev/null
f=$(curve export add --volume file:/tmp/vol.img --ublk --name f0) || fail "export add f0"
wait_dev "$f" || fail "no $f"
curve export add --volume file:/tmp/vol.img --nbd unix:/tmp/nbd.sock --name n0 > /dev/null \
  || fail "export add n0"
nbd="nbd+unix:///n0?socket=/tmp/nbd.sock"
curve-guest-io write "$f" --offset 0 --size 8M --bs 4K --seed 11 || fail "f0 4K write"
curve-guest-io write "$f" --offset 8M --size 8M --bs 1M --seed 12 || fail "f0 1M write"
echo "CURVE-MD5 ublk $(md5_range "$f" 0 16)"
echo "CURVE-MD5 nbd $(nbdcopy "$nbd" - | head -c 16777216 | md5sum | cut -d' ' -f1)"
# Discard the second half, flush through fsync of the block device.
blkdiscard -o 8388608 -l 8388608 "$f" || fail "blkdiscard"
sync "$f" || fail "sync"
echo "CURVE-MD5 ublk-discarded $(md5_range "$f" 8 8)"
echo "CURVE-MD5 nbd-discarded $(nbdcopy "$nbd" - | head -c 16777216 | tail -c 8388608 | md5sum | cut -d' ' -f1)"
echo "CURVE-MD5 zeros $(dd if=/dev/zero bs=1M count=8 2> /dev/null | md5sum | cut -d' ' -f1)"
echo "CURVE-RESULT file_blocks=$(du -k /tmp/vol.img | cut -f1)"

# 3. Read-only: writes refused, reads served.
r=$(curve export add --volume file:/tmp/vol.img --ublk --read-only --name r0) || fail "export add r0"
wait_dev "$r" || fail "no $r"
if dd if=/dev/zero of="$r" bs=4096 count=1 oflag=direct 2> /tmp/ro.err; then
  fail "a write to the read-only $r succeeded"
fi
echo "CURVE-RESULT ro_write=refused ro_dev=$(blockdev --getro "$r") ro_error=$(tr ' ' '_' < /tmp/ro.err | head -c 80)"
echo "CURVE-MD5 ro $(md5_range "$r" 0 8)"
echo "CURVE-MD5 rw $(md5_range "$f" 0 8)"

# 4. Bad input: each a clear message, part2 serving on.
if curve export add --volume mem:16M --ublk --queue-depth 5000 --name big 2> /tmp/err; then
  fail "queue depth 5000 accepted"
fi
echo "CURVE-ERROR depth $(cat /tmp/err)"
if curve export add --volume mem:16M --ublk --name u0 2> /tmp/err; then
  fail "a second u0 accepted"
fi
echo "CURVE-ERROR name $(cat /tmp/err)"
curve-guest-io verify "$path" --offset 0 --size 8M --bs 64K --seed 3 || fail "u0 after bad input"
dmesg_check || fail "dmesg"

# 5. export remove while writers run: their I/O fails, nothing else does.
w=$(curve export add --volume mem:64M --ublk --name w0) || fail "export add w0"
wait_dev "$w" || fail "no $w"
curve-guest-io writers "$w" --jobs 2 --size 4M --bs 4K --time 20 --max-passes 1000 > /tmp/w.out 2>&1 &
wpid=$!
sleep 2
curve export remove w0 || fail "export remove w0 while writers run"
wait $wpid
echo "CURVE-RESULT removed_writers_rc=$? removed_dev_gone=$([ -b "$w" ] && echo no || echo yes)"
curve export list --format json | grep -q '"name": "w0"' && fail "w0 still listed"
curve-guest-io verify "$path" --offset 8M --size 8M --bs 64K --seed 5 || fail "u0 after the removal"
echo "CURVE-RESULT still_serving=yes"
