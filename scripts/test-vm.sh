#!/usr/bin/env bash
# The VM tier alone: build (cached) the guest image of tests/vm/build.sh, boot it under qemu TCG
# with Debian 12's kernel on pure cgroup v2 under systemd, run the guest selection of
# tests/vm/test_vm.py there, and report each guest test as a test here. Any pytest arguments
# are passed on (e.g. -x, -q). Needs root and scripts/deps.sh done. `scripts/test.sh` runs this
# tier too (it collects tests/vm); under CI=true a missing qemu is a failure, not a skip.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
exec "$top/scripts/test.sh" -m vm tests/vm "$@"
