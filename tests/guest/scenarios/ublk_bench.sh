# fio 4K random read/write at QD1 and QD32, in one boot, on three devices:
#   ours   /dev/ublkbN of a part2 inside the guest (a mem: volume)
#   rublk  the libublk authors' server, null target, same queue count and depth
#   vhost  /dev/vda: our vhost-user-blk export of a mem: volume from the host's part2
# One line per run: CURVE-BENCH dev=D rw=RW qd=N iops=X lat_us=Y (TCG: compare ratios only).
. /scenarios/lib.sh
secs=$(param secs 5)
rounds=$(param rounds 2)
part2_start || exit 1
ours=$(ublk_add u0) || fail "export add"
wait_dev "$ours" || fail "no $ours"
rublk add null -q "$(param ublk_queues 1)" -d "$(param ublk_depth 128)" --quiet > /tmp/rublk.out 2>&1 \
  || { cat /tmp/rublk.out; fail "rublk add"; }
i=0
while [ $i -lt 100 ]; do
  rub=$(ls /dev/ublkb* | grep -v "^$ours\$" | head -n 1)
  [ -n "$rub" ] && break
  sleep 0.1
  i=$((i + 1))
done
[ -b "$rub" ] || fail "no rublk device"
wait_dev /dev/vda || fail "no /dev/vda"
echo "CURVE-RESULT ours=$ours rublk=$rub vhost=/dev/vda"
r=0
while [ $r -lt "$rounds" ]; do
  for job in "randread 1" "randwrite 1" "randread 32" "randwrite 32"; do
    set -- $job
    for dev in ours rublk vhost; do
      case $dev in ours) f=$ours ;; rublk) f=$rub ;; vhost) f=/dev/vda ;; esac
      res=$(fio_4k "$f" "$1" "$2" "$secs") || fail "fio $dev $job"
      echo "CURVE-BENCH dev=$dev rw=$1 qd=$2 iops=${res% *} lat_us=${res#* }"
    done
  done
  r=$((r + 1))
done
dmesg_check
