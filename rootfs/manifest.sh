#!/usr/bin/env bash
# Write /etc/sandboxd/manifest.json into TREE: each language's toolchain version, as reported by
# the toolchain itself inside the tree, and its Debian package version.
#   rootfs/manifest.sh TREE
set -euo pipefail
T=${1:?usage: manifest.sh TREE}
install -d -m 0755 "$T/etc/sandboxd"
cp "$(dirname "$0")/manifest.py" "$T/tmp/sandboxd-manifest.py"
chroot "$T" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    TMPDIR=/tmp /usr/bin/python3 /tmp/sandboxd-manifest.py /etc/sandboxd/manifest.json
rm -f "$T/tmp/sandboxd-manifest.py"
