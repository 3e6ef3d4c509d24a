#!/bin/busybox sh
# /init of the VM tier's initramfs (tests/vm/build.sh): Debian's kernel has virtio, virtio_blk
# and ext4 as modules, so they are loaded here, then / (the ext4 image on /dev/vda) is mounted
# and systemd started on it. overlay is loaded too: the guest tree has no modprobe, and rooms
# mount overlayfs.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /modules/order); do
    /bin/busybox insmod "/modules/$m.ko" || echo "initrd: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i + 1)); done
/bin/busybox mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; /bin/busybox poweroff -f; }
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /lib/systemd/systemd "$@"
