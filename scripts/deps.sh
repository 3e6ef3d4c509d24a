#!/usr/bin/env bash
# Debian packages sandboxd needs on the host (as root; idempotent). Used by run.sh and .ci/run.
#   python3 python3-venv python3-dev gcc libcap-dev   the venv, and python-prctl's C extension
#   libseccomp2                                        the syscall filter (pyseccomp loads it)
#   uidmap                                             newuidmap/newgidmap for subordinate ids
#   util-linux procps iproute2 git                     setpriv, ps/pgrep, ip, git in host rooms
#   nftables                                           nft: a room's egress rules (docs/network.md)
#   mmdebstrap arch-test                               rootfs/build.sh (and the nspawn test tree)
#   systemd-container                                  systemd-nspawn, for the service tests
#   tmux                                               a real terminal for sandboxctl's progress tests
# With --tests (what .ci/run asks for), also what only the test tiers need:
#   qemu-system-x86 e2fsprogs                          the VM tier (tests/vm: a TCG guest on
#                                                      Debian 12's kernel, pure cgroup v2)
#   curl nodejs openssl                                clients in host rooms and a test
#                                                      certificate for the egress tests
#   scripts/node.sh                                    node >= 20 and npm from the npm registry
#                                                      (pinned, sha512-checked) for the
#                                                      TypeScript client's tests
set -euo pipefail
pkgs=(python3 python3-venv python3-dev gcc libcap-dev libseccomp2 uidmap util-linux procps
      iproute2 nftables git ca-certificates mmdebstrap arch-test systemd-container tmux)
case ${1:-} in
    --tests) pkgs+=(qemu-system-x86 e2fsprogs curl nodejs openssl) ;;
    "") ;;
    *) echo "usage: deps.sh [--tests]" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "deps.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "${1:-}" = --tests ]; then
    "$(dirname "${BASH_SOURCE[0]}")/node.sh"
fi
