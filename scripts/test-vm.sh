#!/usr/bin/env bash
# The VM tier alone: build (cached) the guest image of tests/vm/build.sh, boot it under qemu TCG
# with Debian 12's kernel on pure cgroup v2 under systemd, run the guest selection of
# tests/vm/test_vm.py there, and report each guest test as a test here. Any pytest arguments
# are passed on (e.g. -x, -q). Needs root and scripts/deps.sh done; installs qemu and mke2fs when
# missing. `scripts/test.sh`'s default run ends with it; under CI=true a missing
# prerequisite is a failure, not a skip.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for p in qemu-system-x86 e2fsprogs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$p"
done
exec "$top/scripts/test.sh" -m vm tests/vm "$@"
