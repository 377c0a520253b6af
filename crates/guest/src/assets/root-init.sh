#!/bin/busybox sh
# Tandem test guest, stage 2 (pid 1 on the root disk). Prints the release marker, mounts the
# user disk when there is one, runs the image's boot script and any script passed on the
# kernel command line (tandem.run=BASE64), then keeps a shell on the serial console and
# powers off cleanly on the ACPI power button.
B=/bin/busybox
export PATH=/bin:/sbin:/usr/bin
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null
$B mkdir -p /tmp /run && $B mount -t tmpfs tmpfs /tmp
$B --install -s /bin 2>/dev/null
hostname tandem-guest
echo "tandem-release: $(cat /etc/tandem-release)"
if [ -b /dev/vdb ]; then
  mkdir -p /home/user
  if mount -t ext4 /dev/vdb /home/user; then echo "tandem-user-disk: mounted"; else echo "tandem-user-disk: cannot mount"; fi
fi
shutdown_now() {
  echo "tandem-guest: powering off"
  sync
  umount /home/user 2>/dev/null
  mount -o remount,ro / 2>/dev/null
  poweroff -f
}
for ev in /sys/class/input/event*; do
  [ -e "$ev/device/name" ] || continue
  if [ "$(cat $ev/device/name)" = "Power Button" ]; then
    ( dd if=/dev/input/${ev##*/} bs=24 count=1 of=/dev/null 2>/dev/null; shutdown_now ) &
  fi
done
[ -x /etc/tandem/boot.sh ] && /etc/tandem/boot.sh
for w in $(cat /proc/cmdline); do
  case "$w" in
    tandem.run=*) echo "${w#tandem.run=}" | base64 -d > /tmp/run.sh && sh /tmp/run.sh ;;
  esac
done
echo "tandem-boot: ready"
for w in $(cat /proc/cmdline); do
  [ "$w" = "tandem.poweroff=1" ] && shutdown_now
done
while true; do
  setsid cttyhack sh -l </dev/ttyS0 >/dev/ttyS0 2>&1
  sleep 1
done
