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
#   python3-ipykernel python3-jupyter-client           code contexts (tests/integration/
#   python3-numpy python3-pandas python3-matplotlib    test_contexts.py: rooms over the host tree
#   python3-scipy nodejs node-typescript               run the host's python3 and node; the same
#                                                      packages as rootfs/packages.txt). Debian 12
#                                                      has ipykernel 6.17, jupyter-client 7.4,
#                                                      numpy 1.24, pandas 1.5, matplotlib 3.6,
#                                                      scipy 1.10, typescript 4.8 (a nodejs that
#                                                      is already installed, e.g. NodeSource's,
#                                                      is kept)
#   curl nodejs openssl                                clients in host rooms and a test
#                                                      certificate for the egress tests
#   scripts/node.sh                                    node >= 20 and npm from the npm registry
#                                                      (pinned, sha512-checked) for the
#                                                      TypeScript client's tests
set -euo pipefail
pkgs=(python3 python3-venv python3-dev gcc libcap-dev libseccomp2 uidmap util-linux procps
      iproute2 nftables git ca-certificates mmdebstrap arch-test systemd-container tmux)
case ${1:-} in
    --tests) pkgs+=(qemu-system-x86 e2fsprogs curl nodejs openssl python3-ipykernel
                    python3-jupyter-client python3-numpy python3-pandas python3-matplotlib
                    python3-scipy node-typescript) ;;
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
    # What the context tests import, checked here so that a broken install fails now, by name,
    # and not as a kernel that never says ready.
    /usr/bin/python3 -c 'import ipykernel, jupyter_client, matplotlib_inline, numpy, pandas, matplotlib, scipy' ||
        { echo "deps.sh: the host python3 cannot import the code-context packages" >&2; exit 1; }
    node -e 'try { require("typescript") } catch (e) { require("/usr/share/nodejs/typescript") }' ||
        { echo "deps.sh: node cannot load typescript (node-typescript)" >&2; exit 1; }
    "$(dirname "${BASH_SOURCE[0]}")/node.sh"
fi
