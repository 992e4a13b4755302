# Kernel NBD devices that a part2 inside the guest attaches itself (`--nbd-device`, netlink
# NBD_CMD_CONNECT over socket pairs): the path printed, geometry, 2 connections, an O_DIRECT
# pattern whose bytes equal the volume file's, discard and flush reaching the volume, a read-only
# device, bad input, and `export remove` while writers run.
. /scenarios/lib.sh
part2_start || exit 1

# 1. A file volume on 2 connections: path, geometry, listing, pattern, the file's bytes.
dd if=/dev/zero of=/tmp/vol.img bs=1M count=0 seek=64 2> /dev/null
path=$(curve export add --volume file:/tmp/vol.img --nbd-device --connections 2 --name k0) \
  || fail "export add k0"
echo "CURVE-RESULT path=$path"
wait_dev "$path" || fail "no $path"
d=${path#/dev/}
curve export list --format json > /tmp/list.json
cookie=$(sed -n 's/.*"cookie": "\(.*\)".*/\1/p' /tmp/list.json)
echo "CURVE-RESULT size=$(blockdev --getsize64 "$path") ro=$(blockdev --getro "$path") \
discard_max=$(cat "/sys/block/$d/queue/discard_max_bytes") \
write_cache=$(tr ' ' '_' < "/sys/block/$d/queue/write_cache") \
connections=$(sed -n 's/.*"connections": \([0-9]*\).*/\1/p' /tmp/list.json | tail -n 1) \
backend_matches=$([ -n "$cookie" ] && [ "$(cat "/sys/block/$d/backend")" = "$cookie" ] && echo yes || echo no)"
if grep -q '"type": "nbd_device"' /tmp/list.json && grep -q "\"device\": \"$path\"" /tmp/list.json; then
  echo "CURVE-RESULT listed=yes"
else
  cat /tmp/list.json
  fail "export list"
fi
curve-guest-io write "$path" --offset 0 --size 8M --bs 4K --seed 3 || fail "4K write"
curve-guest-io write "$path" --offset 8M --size 8M --bs 1M --seed 5 || fail "1M write"
curve-guest-io verify "$path" --offset 0 --size 8M --bs 1M --seed 3 || fail "verify 4K pattern"
curve-guest-io verify "$path" --offset 8M --size 8M --bs 4K --seed 5 || fail "verify 1M pattern"
sync "$path" || fail "sync"
echo "CURVE-MD5 device $(md5_range "$path" 0 16)"
echo "CURVE-MD5 file $(dd if=/tmp/vol.img bs=1M count=16 2> /dev/null | md5sum | cut -d' ' -f1)"
blkdiscard -o 8388608 -l 8388608 "$path" || fail "blkdiscard"
sync "$path" || fail "sync after discard"
echo "CURVE-MD5 discarded $(md5_range "$path" 8 8)"
echo "CURVE-MD5 file-discarded $(dd if=/tmp/vol.img bs=1M skip=8 count=8 2> /dev/null | md5sum | cut -d' ' -f1)"
echo "CURVE-MD5 zeros $(dd if=/dev/zero bs=1M count=8 2> /dev/null | md5sum | cut -d' ' -f1)"
echo "CURVE-RESULT file_kib=$(du -k /tmp/vol.img | cut -f1)"

# 2. Read-only: writes refused, reads served.
r=$(curve export add --volume file:/tmp/vol.img --nbd-device --read-only --name r0) || fail "export add r0"
wait_dev "$r" || fail "no $r"
if dd if=/dev/zero of="$r" bs=4096 count=1 oflag=direct 2> /tmp/ro.err; then
  fail "a write to the read-only $r succeeded"
fi
echo "CURVE-RESULT ro_path=$r ro_write=refused ro_dev=$(blockdev --getro "$r")"
echo "CURVE-MD5 ro $(md5_range "$r" 0 8)"
echo "CURVE-MD5 rw $(md5_range "$path" 0 8)"

# 3. Bad input: each a clear message, part2 serving on.
if curve export add --volume mem:16M --nbd-device "$path" --name busy 2> /tmp/err; then
  fail "a second export on $path accepted"
fi
echo "CURVE-ERROR in-use $(cat /tmp/err)"
if curve export add --volume mem:16M --nbd-device /dev/sda --name bad 2> /tmp/err; then
  fail "/dev/sda accepted"
fi
echo "CURVE-ERROR path $(cat /tmp/err)"
if curve export add --volume mem:16M --nbd-device --connections 17 --name many 2> /tmp/err; then
  fail "17 connections accepted"
fi
echo "CURVE-ERROR connections $(cat /tmp/err)"
if curve export add --volume mem:16M --nbd unix:/tmp/x.sock --connections 2 --name conn 2> /tmp/err; then
  fail "--connections without --nbd-device accepted"
fi
echo "CURVE-ERROR flags $(cat /tmp/err)"
curve-guest-io verify "$path" --offset 0 --size 8M --bs 64K --seed 3 || fail "k0 after bad input"
dmesg_check || fail "dmesg"

# 4. export remove while writers run: their I/O fails, nothing else does.
w=$(curve export add --volume mem:64M --nbd-device --connections 2 --name w0) || fail "export add w0"
wait_dev "$w" || fail "no $w"
curve-guest-io writers "$w" --jobs 2 --size 4M --bs 4K --time 20 --max-passes 1000 > /tmp/w.out 2>&1 &
wpid=$!
sleep 2
curve export remove w0 || fail "export remove w0 while writers run"
wait $wpid
echo "CURVE-RESULT removed_writers_rc=$? removed_size=$(blockdev --getsize64 "$w" 2> /dev/null || echo 0)"
curve export list --format json | grep -q '"name": "w0"' && fail "w0 still listed"
curve-guest-io verify "$path" --offset 0 --size 8M --bs 64K --seed 3 || fail "k0 after the removal"
echo "CURVE-RESULT still_serving=yes"

# 5. A device whose backend cookie is not the one recorded is left alone: the metafile of k0's
# first attachment, restored after k0 was removed and attached again (a new cookie).
cp /tmp/run/nebd-server.meta /tmp/saved.meta
curve export remove k0 || fail "export remove k0"
again=$(curve export add --volume file:/tmp/vol.img --nbd-device "$path" --name k0) || fail "k0 again"
new_cookie=$(cat "/sys/block/$d/backend")
kill -9 "$part2_pid"
sleep 1
cp /tmp/saved.meta /tmp/run/nebd-server.meta
part2_start || fail "restart with the old metafile"
sleep 1
grep -q "serves another backend" /tmp/part2.log && echo "CURVE-RESULT other_backend_warned=yes"
echo "CURVE-RESULT other_backend_kept=$([ "$(cat "/sys/block/$d/backend")" = "$new_cookie" ] && echo yes || echo no) \
other_backend_listed=$(curve export list --format json | grep -q '"name": "k0"' && echo yes || echo no)"
