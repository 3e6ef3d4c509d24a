#!/usr/bin/env bash
# Build (once per input) what the VM tier boots, and print the directory that holds it:
#   vmlinuz      Debian 12's kernel (linux-image-6.1.*-amd64, unpacked from its .deb: the host's
#                own boot is not touched, nothing is installed on the host)
#   initrd.img   busybox-static + the modules / needs (virtio_pci, virtio_blk, ext4 are modules in
#                Debian's kernel) + overlay (rooms mount overlayfs; the guest has no modprobe)
#   root.img     ext4, made with `mke2fs -d` from the nspawn tree of tests/systemd with this
#                checkout installed the documented way (scripts/install.sh in a chroot), pytest,
#                the tests at /src/sandboxd and the guest's test unit (tests/vm/guest/)
#
#   tests/vm/build.sh                 -> prints /var/cache/sandboxd-ci/vm/<key>
#   SANDBOXD_VM_CACHE=/dir            cache root (default /var/cache/sandboxd-ci/vm)
#   SANDBOXD_VM_KERNEL_PKG=NAME       the kernel package (default: what linux-image-amd64 depends
#                                     on; it must be a 6.1 one, i.e. Debian 12's)
#
# The key hashes every input: this script, the initrd's /init, the guest files, the nspawn tree's
# key, the kernel package and the checkout's files (the image must hold the current sandboxd;
# a rebuild costs about a minute: install.sh with a warm pip cache, then mke2fs). The two newest
# images are kept.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/../.." && pwd)
cache=${SANDBOXD_VM_CACHE:-/var/cache/sandboxd-ci/vm}
pipcache=${SANDBOXD_NSPAWN_PIP_CACHE:-/var/cache/sandboxd-ci/pip}
die() { printf 'tests/vm/build.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (chroot, mount, mke2fs of a root-owned tree)"
for tool in mke2fs apt-get dpkg-deb chroot flock; do
    command -v "$tool" >/dev/null || die "$tool is not installed (scripts/deps.sh)"
done
mkdir -p "$cache/dl"
exec 9>"$cache/.lock"
flock 9

# --- the kernel: Debian 12's, pinned to the 6.1 series ----------------------------------------
pkg=${SANDBOXD_VM_KERNEL_PKG:-}
if [ -z "$pkg" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
          | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1 || true)
fi
if [ -z "$pkg" ]; then
    # Offline: the newest kernel already unpacked here.
    pkg=$(find "$cache" -maxdepth 1 -name 'kernel-linux-image-6.1*' -printf '%f\n' 2>/dev/null \
          | sed 's/^kernel-//' | sort -V | tail -1)
fi
[ -n "$pkg" ] || die "cannot find Debian's kernel package (apt-cache depends linux-image-amd64)"
case $pkg in
    linux-image-6.1.*-amd64) ;;
    *) die "the kernel package is $pkg, not Debian 12's 6.1 (linux-image-6.1.*-amd64): the VM tier
tests sandboxd on Debian 12's kernel; set SANDBOXD_VM_KERNEL_PKG=linux-image-6.1.0-N-amd64" ;;
esac
abi=${pkg#linux-image-}
kdir=$cache/kernel-$pkg
if [ ! -f "$kdir/.complete" ]; then
    rm -rf "$kdir.tmp" && mkdir -p "$kdir.tmp/x"
    (cd "$cache/dl" && apt-get download "$pkg" busybox-static >&2) \
        || die "apt-get download $pkg busybox-static failed"
    dpkg-deb -x "$(ls "$cache/dl/${pkg}_"*.deb | tail -1)" "$kdir.tmp/x"
    dpkg-deb -x "$(ls "$cache/dl/busybox-static_"*.deb | tail -1)" "$kdir.tmp/bb"
    cp "$kdir.tmp/x/boot/vmlinuz-$abi" "$kdir.tmp/vmlinuz"
    mods=$kdir.tmp/x/lib/modules/$abi/kernel
    ird=$kdir.tmp/initrd && mkdir -p "$ird/bin" "$ird/modules"
    cp "$kdir.tmp/bb/bin/busybox" "$ird/bin/busybox"
    install -m 0755 "$here/initrd-init.sh" "$ird/init"
    # Dependency order (modules.dep is written by the package's postinst, which we do not run).
    order=(lib/crc16 fs/mbcache fs/jbd2/jbd2 crypto/crc32c_generic fs/ext4/ext4
           drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
           drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci
           drivers/block/virtio_blk fs/overlayfs/overlay)
    for m in "${order[@]}"; do
        [ -f "$mods/$m.ko" ] || die "$pkg has no $m.ko (built in now? update tests/vm/build.sh)"
        cp "$mods/$m.ko" "$ird/modules/"
        basename "$m" >> "$ird/modules/order"
    done
    (cd "$ird" && find . | "$ird/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1) \
        > "$kdir.tmp/initrd.img"
    rm -rf "$kdir.tmp/x" "$kdir.tmp/bb" "$ird"
    touch "$kdir.tmp/.complete"
    rm -rf "$kdir" && mv "$kdir.tmp" "$kdir"
fi

# --- the key ----------------------------------------------------------------------------------
tree=$("$top/tests/systemd/build-tree.sh") || die "tests/systemd/build-tree.sh failed"
[ -d "$tree/usr" ] || die "no nspawn tree at $tree"
# The checkout's files as pip and the tests see them (git's view if this is a git checkout).
files=$(cd "$top" && { git ls-files -co --exclude-standard 2>/dev/null \
                       || find . -type f -not -path './.git/*' -printf '%P\n'; } \
        | grep -v -e '^\.' -e '/__pycache__/' | sort -u | while read -r f; do
            [ -f "$f" ] && printf '%s\n' "$f"; done)
key=$( { printf '%s\n' "$(basename "$tree")" "$pkg"
         sha256sum "$here/build.sh" "$here/initrd-init.sh" "$here"/guest/*
         (cd "$top" && printf '%s\n' "$files" | tr '\n' '\0' | xargs -0 sha256sum); } \
       | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/.complete" ]; then
    echo "$out"
    exit 0
fi

# --- the image --------------------------------------------------------------------------------
work=$cache/.build-$key-$$
mkdir -p "$work/upper" "$work/work" "$work/root" "$work/out"
root=$work/root
cleanup() {
    for m in var/cache/sandboxd-pip sys dev/pts dev proc ""; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT
# The cached tree stays pristine: every write of the install goes to an overlay's upper layer.
mount -t overlay overlay -o "lowerdir=$tree,upperdir=$work/upper,workdir=$work/work" "$root"
mkdir -p "$root/src/sandboxd"
(cd "$top" && printf '%s\n' "$files" | tar -cf - -T -) | tar -xf - -C "$root/src/sandboxd"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount --bind /sys "$root/sys"
mkdir -p "$pipcache" "$root/var/cache/sandboxd-pip"
mount --bind "$pipcache" "$root/var/cache/sandboxd-pip"
cp --remove-destination /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
env_=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
      PIP_CACHE_DIR=/var/cache/sandboxd-pip)
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    # pip in the tree trusts what the host trusts (e.g. a TLS-inspecting proxy's CA).
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca.crt"
    env_+=(PIP_CERT=/etc/ssl/host-ca.crt)
fi
echo "tests/vm/build.sh: scripts/install.sh in the tree" >&2
chroot "$root" env -i "${env_[@]}" /src/sandboxd/scripts/install.sh >&2
# The test runner and what the tests import (pyproject's dev extras that tests use).
chroot "$root" env -i "${env_[@]}" /opt/sandboxd/venv/bin/python -m pip install -q \
    --disable-pip-version-check "pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6" >&2
chmod -R a+rX "$root/opt/sandboxd/venv" "$root/src/sandboxd"
rm -f "$root/etc/ssl/host-ca.crt"
: > "$root/etc/resolv.conf"
# The guest side: the unit that runs the selected tests and powers off, and its runner.
install -m 0755 "$here/guest/run-tests.sh" "$root/usr/local/lib/sandboxd-vm-run-tests"
install -m 0644 "$here/guest/sandboxd-vm-tests.service" "$root/etc/systemd/system/"
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf ../sandboxd-vm-tests.service "$root/etc/systemd/system/multi-user.target.wants/"
printf '/dev/vda / ext4 rw,relatime 0 1\n' > "$root/etc/fstab"
echo "$abi" > "$root/etc/sandboxd-vm-kernel"
for m in var/cache/sandboxd-pip sys dev/pts dev proc; do umount "$root/$m"; done
echo "tests/vm/build.sh: mke2fs -d" >&2
mke2fs -q -t ext4 -L sandboxd-vm -d "$root" "$work/out/root.img" 4G >&2
umount "$root"
cp "$kdir/vmlinuz" "$kdir/initrd.img" "$work/out/"
echo "$pkg" > "$work/out/kernel"
touch "$work/out/.complete"
rm -rf "$out" && mv "$work/out" "$out"
# Keep the two newest images; older ones only cost disk.
find "$cache" -mindepth 1 -maxdepth 1 -type d -regextype posix-basic -regex '.*/[0-9a-f]\{16\}' -printf '%T@ %p\n' \
    | sort -rn | tail -n +3 | cut -d' ' -f2- | xargs -r rm -rf
echo "$out"
