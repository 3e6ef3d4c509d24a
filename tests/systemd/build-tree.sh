#!/usr/bin/env bash
# Build (once) the small Debian tree with systemd that tests/systemd boots with systemd-nspawn -b,
# and print its path. The tree is cached outside the checkout, keyed by the hash of this script
# (suite, variant and package list all live here), so editing the inputs rebuilds it and an
# unchanged script costs nothing.
#
#   tests/systemd/build-tree.sh            -> prints /var/cache/sandboxd-ci/nspawn/<key>
#   SANDBOXD_NSPAWN_CACHE=/dir ...          cache root (default /var/cache/sandboxd-ci/nspawn)
#
# Why trixie and not the host's bookworm: systemd >= 254 knows DelegateSubgroup=, so the unit is
# exercised as written (and systemd-analyze verify runs clean inside this tree).
# Why these packages: systemd + systemd-sysv boot it; dbus so systemctl and logind behave as on a
# real machine; python3 + python3-venv because install.sh builds the venv from the tree's own
# /usr/bin/python3; gcc, libc6-dev, python3-dev and libcap-dev because python-prctl is only
# published as an sdist; libseccomp2 for pyseccomp; uidmap for newuidmap/newgidmap;
# ca-certificates for pip.
set -euo pipefail

suite=trixie
packages=systemd,systemd-sysv,dbus,python3,python3-venv,python3-dev,gcc,libc6-dev,libcap-dev,libseccomp2,uidmap,ca-certificates,procps

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${SANDBOXD_NSPAWN_CACHE:-/var/cache/sandboxd-ci/nspawn}
key=$(sha256sum "$here/build-tree.sh" | cut -c1-16)
tree=$cache/$key

if [ -f "$tree/.complete" ]; then
    echo "$tree"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "build-tree.sh: must run as root (mmdebstrap root mode)" >&2
    exit 1
fi
command -v mmdebstrap >/dev/null || { echo "build-tree.sh: mmdebstrap is not installed" >&2; exit 1; }

mkdir -p "$cache"
# One builder at a time; a second caller waits and then finds the finished tree.
exec 9>"$cache/.lock"
flock 9
if [ -f "$tree/.complete" ]; then
    echo "$tree"
    exit 0
fi

tmp=$cache/.build-$key-$$
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
mmdebstrap --variant=minbase --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='echo sandboxd-ci > "$1/etc/hostname"' \
    --customize-hook='rm -f "$1/etc/machine-id"; : > "$1/etc/machine-id"' \
    --customize-hook='chroot "$1" systemctl mask systemd-networkd.service systemd-resolved.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true' \
    "$suite" "$tmp" >&2
touch "$tmp/.complete"
# Older trees of this cache are left alone (another checkout may still use them); rename is atomic.
mv "$tmp" "$tree"
trap - EXIT
echo "$tree"
