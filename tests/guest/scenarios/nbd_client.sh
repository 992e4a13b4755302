# Debian's nbd-client in the guest (/bin/nbd-client: busybox's shell would run its own applet of
# that name, an ioctl client), attaching /dev/nbdN to NBD exports:
#   /dev/nbd0, /dev/nbd1  exports of a nebd-server on the host, over TCP through QEMU's
#                         user-mode network (restrict=on, one guestfwd per port: 10.0.2.100:10809
#                         and :10810 reach two loopback ports of the host, nothing else)
#   /dev/nbd2             an export of a part2 inside the guest on a Unix socket
# nbd0: an O_DIRECT pattern, hashed; blkdiscard + sync of its second half. nbd1: an ext4 file
# system made, filled, unmounted, checked clean by e2fsck and read back. nbd2: a pattern whose
# bytes equal the volume file's. The host compares its files with the guest's hashes.
. /scenarios/lib.sh
mkdir -p /etc /mnt
ln -sf /proc/mounts /etc/mtab
# Both TCP exports first: QEMU connected each forward when it started.
for i in 0 1; do
  /bin/nbd-client "$(param host 10.0.2.100)" $((10809 + i)) "/dev/nbd$i" -N "h$i" > /tmp/nc.out 2>&1 \
    || { cat /tmp/nc.out; fail "nbd-client h$i over TCP"; }
done
size=$(blockdev --getsize64 /dev/nbd0)
echo "CURVE-RESULT tcp_size=$size tcp_ro=$(blockdev --getro /dev/nbd0) \
tcp_discard_max=$(cat /sys/block/nbd0/queue/discard_max_bytes)"

# 1. Pattern and discard over TCP.
curve-guest-io write /dev/nbd0 --offset 0 --size 16M --bs 64K --seed 7 || fail "write over TCP"
curve-guest-io verify /dev/nbd0 --offset 0 --size 16M --bs 4K --seed 7 || fail "verify over TCP"
echo "CURVE-MD5 tcp-pattern $(md5_range /dev/nbd0 0 8)"
blkdiscard -o 8388608 -l 8388608 /dev/nbd0 || fail "blkdiscard over TCP"
sync /dev/nbd0 || fail "sync over TCP"
echo "CURVE-MD5 tcp-discarded $(md5_range /dev/nbd0 8 8)"
echo "CURVE-MD5 zeros $(dd if=/dev/zero bs=1M count=8 2> /dev/null | md5sum | cut -d' ' -f1)"

# 2. A file system over TCP: made, filled, unmounted, checked, read back.
/bin/mke2fs -q -F -t ext4 /dev/nbd1 > /tmp/mkfs.out 2>&1 || { cat /tmp/mkfs.out; fail "mke2fs"; }
mount -t ext4 /dev/nbd1 /mnt || fail "mount"
dd if=/dev/urandom of=/mnt/big bs=1M count=24 2> /dev/null || fail "fill"
i=0
while [ $i -lt 200 ]; do
  echo "file $i $(date +%N)" > "/mnt/small.$i" || fail "small file $i"
  i=$((i + 1))
done
before=$(cat /mnt/big /mnt/small.* | md5sum | cut -d' ' -f1)
umount /mnt || fail "umount"
/bin/e2fsck -f -n /dev/nbd1 > /tmp/fsck.out 2>&1
fsck_rc=$?
sed 's/^/FSCK /' /tmp/fsck.out
mount -t ext4 -o ro /dev/nbd1 /mnt || fail "mount again"
after=$(cat /mnt/big /mnt/small.* | md5sum | cut -d' ' -f1)
umount /mnt
echo "CURVE-RESULT fsck_rc=$fsck_rc fs_same=$([ "$before" = "$after" ] && echo yes || echo no)"
for i in 0 1; do
  /bin/nbd-client -d "/dev/nbd$i" > /dev/null 2>&1 || fail "nbd-client -d /dev/nbd$i"
done

# 3. A Unix-socket export of a part2 in the guest.
part2_start || fail "part2"
dd if=/dev/zero of=/tmp/u.img bs=1M count=0 seek=32 2> /dev/null
curve export add --volume file:/tmp/u.img --nbd unix:/tmp/nbd.sock --name u0 > /dev/null \
  || fail "export add u0"
/bin/nbd-client -u /tmp/nbd.sock /dev/nbd2 -N u0 > /tmp/nc.out 2>&1 \
  || { cat /tmp/nc.out; fail "nbd-client over the Unix socket"; }
echo "CURVE-RESULT unix_size=$(blockdev --getsize64 /dev/nbd2)"
curve-guest-io write /dev/nbd2 --offset 0 --size 16M --bs 4K --seed 9 || fail "write over unix"
curve-guest-io verify /dev/nbd2 --offset 0 --size 16M --bs 1M --seed 9 || fail "verify over unix"
sync /dev/nbd2
echo "CURVE-MD5 unix-device $(md5_range /dev/nbd2 0 16)"
/bin/nbd-client -d /dev/nbd2 > /dev/null 2>&1 || fail "nbd-client -d /dev/nbd2"
echo "CURVE-MD5 unix-file $(dd if=/tmp/u.img bs=1M count=16 2> /dev/null | md5sum | cut -d' ' -f1)"
dmesg_check
