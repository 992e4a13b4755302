# fio 4K random read/write at QD1 and QD32, in one boot, on kernel NBD devices and our ublk:
#   ours    /dev/nbdN that a part2 in the guest attached (`--nbd-device`, a mem: volume)
#   qemu    nbd-client on qemu-nbd serving a file on the guest's tmpfs (Unix socket)
#   nbdkit  nbd-client on `nbdkit memory` (Unix socket), when shipped
#   ublk    our /dev/ublkbN of a mem: volume (the same part2)
# Every NBD device has one connection. One line per run:
#   CURVE-BENCH dev=D rw=RW qd=N iops=X lat_us=Y   (TCG: compare ratios only)
. /scenarios/lib.sh
secs=$(param secs 5)
rounds=$(param rounds 2)
size=$(param size 256M)
part2_start || exit 1
ours=$(curve export add --volume "mem:$size" --nbd-device --name k0) || fail "export add k0"
ublk=$(curve export add --volume "mem:$size" --ublk --queue-depth 128 --name u0) || fail "export add u0"
wait_dev "$ours" || fail "no $ours"
wait_dev "$ublk" || fail "no $ublk"
dd if=/dev/zero of=/tmp/q.img bs=1M count=0 seek=${size%M} 2> /dev/null
qemu-nbd --fork --persistent --shared=4 -f raw -k /tmp/q.sock -x q /tmp/q.img \
  || fail "qemu-nbd"
/bin/nbd-client -u /tmp/q.sock /dev/nbd6 -N q > /tmp/nc.out 2>&1 || { cat /tmp/nc.out; fail "nbd-client qemu"; }
devs="ours qemu ublk"
plugin=$(param nbdkit_plugin "")
if [ -n "$plugin" ]; then
  nbdkit --unix /tmp/k.sock "$plugin" size="$size" || fail "nbdkit"
  /bin/nbd-client -u /tmp/k.sock /dev/nbd7 -N "" > /tmp/nc.out 2>&1 || { cat /tmp/nc.out; fail "nbd-client nbdkit"; }
  devs="ours qemu nbdkit ublk"
fi
echo "CURVE-RESULT ours=$ours ublk=$ublk"
r=0
while [ $r -lt "$rounds" ]; do
  for job in "randread 1" "randwrite 1" "randread 32" "randwrite 32"; do
    set -- $job
    for dev in $devs; do
      case $dev in
        ours) f=$ours ;; qemu) f=/dev/nbd6 ;; nbdkit) f=/dev/nbd7 ;; ublk) f=$ublk ;;
      esac
      res=$(fio_4k "$f" "$1" "$2" "$secs") || fail "fio $dev $job"
      echo "CURVE-BENCH dev=$dev rw=$1 qd=$2 iops=${res% *} lat_us=${res#* }"
    done
  done
  r=$((r + 1))
done
dmesg_check
