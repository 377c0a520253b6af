#!/bin/busybox sh
# Tandem test guest, stage 1 (initramfs): load the virtio drivers, mount the root disk,
# switch to it. Everything it says on the console starts with "tandem-initrd:".
B=/bin/busybox
$B mkdir -p /proc /sys /dev /newroot
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /lib/modules/load-order); do
  $B insmod /lib/modules/$m.ko 2>/dev/null || echo "tandem-initrd: could not load module $m"
done
root=/dev/vda
for w in $($B cat /proc/cmdline); do
  case "$w" in tandem.root=*) root="${w#tandem.root=}" ;; esac
done
i=0
while [ ! -b "$root" ] && [ $i -lt 100 ]; do $B sleep 0.1; i=$((i + 1)); done
if ! $B mount -t ext4 -o rw "$root" /newroot; then
  echo "tandem-initrd: cannot mount root $root; powering off"
  $B poweroff -f
fi
$B umount /proc /sys
$B mount --move /dev /newroot/dev 2>/dev/null || $B umount /dev
exec $B switch_root /newroot /sbin/init
