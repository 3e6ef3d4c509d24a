#!/usr/bin/env bash
# Run the test suite: unit, integration (a real sandboxd started as an unprivileged user),
# security, and — when their prerequisites exist — the rootfs (13 languages), systemd and VM tiers.
# The TypeScript client's tests (tests/integration/test_ts_client.py) run with the node that
# scripts/node.sh installs (deps.sh --tests); without it they skip, and under CI=true fail.
# A full run first measures the unit tier's coverage of sandboxd/ (the `coverage` package) and
# prints it, total and per module; SANDBOXD_COVERAGE=0 skips that, =1 forces it for any args.
# Needs root (to create the test users and delegate cgroups to them) and scripts/deps.sh done.
#   ./scripts/test.sh                 everything this host can run
#   ./scripts/test.sh tests/unit      any pytest arguments narrow it down
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
venv=${SANDBOXD_VENV:-/opt/sandboxd/venv}
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip setuptools wheel
# A regular (not editable) install: the daemon runs as an unprivileged user who may not be able
# to read this checkout (CI clones under /root).
build=$(mktemp -d); trap 'rm -rf "$build"' EXIT
cp -r pyproject.toml README.md sandboxd "$build"/
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation "$build[dev,mcp]"
chmod -R a+rX "$venv"
rootfs=${SANDBOXD_TEST_LANG_ROOTFS:-/var/lib/sandboxd/rootfs/default}
if [ -d "$rootfs/usr" ]; then export SANDBOXD_TEST_LANG_ROOTFS=$rootfs; fi
args=("$@")
# The default run takes the VM tier (tests/vm) last, on its own (it boots a guest for ~12 min).
[ ${#args[@]} -gt 0 ] || args=(tests --ignore=tests/vm)
cov=${SANDBOXD_COVERAGE:-$([ $# -eq 0 ] && echo 1 || echo 0)}
if [ "$cov" = 1 ]; then
    # Against the installed package (what the tests import), reported with paths under sandboxd/.
    pkg=$("$venv/bin/python" -c 'import os, sandboxd; print(os.path.dirname(sandboxd.__file__))')
    covdata=$(mktemp); rm -f "$covdata"
    echo "test.sh: unit tier under coverage"
    set +e
    COVERAGE_FILE=$covdata "$venv/bin/python" -m coverage run --branch --source="$pkg" \
        -m pytest -p no:cacheprovider -q tests/unit
    unit=$?
    set -e
    COVERAGE_FILE=$covdata "$venv/bin/python" -m coverage report --precision=1 \
        | sed "s|$pkg/|sandboxd/|"
    rm -f "$covdata"
    [ $unit -eq 0 ] || { echo "test.sh: unit tier failed under coverage"; exit $unit; }
    # The unit tier just ran (and passed): the default run does not run it a second time.
    [ $# -eq 0 ] && args+=(--ignore=tests/unit)
fi
set +e
"$venv/bin/python" -m pytest -p no:cacheprovider "${args[@]}"
code=$?
set -e
[ $code -eq 5 ] && { echo "test.sh: no tests collected"; exit 1; }
if [ $# -eq 0 ]; then
    # The escape suite once more against daemons in single-id mode (no newuidmap: the room's
    # root is the daemon's own uid), where nothing but the jail itself stands between a
    # payload and the daemon user's files. Tests of what only id slices give are deselected.
    echo "test.sh: security tier again in single-id mode"
    set +e
    SANDBOXD_TEST_ID_MODE=single "$venv/bin/python" -m pytest -p no:cacheprovider \
        -m "not subordinate_ids" tests/security
    single=$?
    set -e
    [ $code -eq 0 ] && code=$single
    # The VM tier: a qemu TCG guest on Debian 12's kernel, pure cgroup v2 under systemd, running
    # the v2 subset of tests/vm/test_vm.py (GUEST_SELECTION). Needs qemu-system-x86 and mke2fs
    # (scripts/deps.sh --tests); without them it skips, and under CI=true fails.
    echo "test.sh: the VM tier (Debian 12's kernel, cgroup v2, systemd)"
    set +e
    "$venv/bin/python" -m pytest -p no:cacheprovider -m vm tests/vm
    vm=$?
    set -e
    [ $code -eq 0 ] && code=$vm
fi
exit $code
