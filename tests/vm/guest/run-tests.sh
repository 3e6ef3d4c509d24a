#!/bin/bash
# Inside the guest, as sandboxd-vm-tests.service (root, under the guest's systemd). The host put
# a tar on /dev/vdb holding `args` (pytest's arguments, one a line) and `timeout` (seconds); the
# results replace it on the same disk as a tar: junit.xml, pytest.log, rc, env.txt (kernel,
# cgroup2 controllers, systemd), doctor.txt, journal.txt.
set -u
req=/run/sandboxd-vm/req
out=/run/sandboxd-vm/out
mkdir -p "$req" "$out"
tar -xf /dev/vdb -C "$req" || echo "run-tests: no request on /dev/vdb" > "$out/pytest.log"
{
    echo "kernel: $(uname -r)"
    echo "cmdline: $(cat /proc/cmdline)"
    echo "controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
    echo "systemd: $(systemctl --version | head -1)"
    echo "cgroup mounts: $(grep cgroup /proc/mounts | tr '\n' ';')"
    echo "boot to tests: $(cut -d' ' -f1 /proc/uptime) s"
} > "$out/env.txt"
args=()
[ -f "$req/args" ] && mapfile -t args < "$req/args"
limit=$(cat "$req/timeout" 2>/dev/null || echo 1800)
cd /src/sandboxd
start=$(date +%s)
SANDBOXD_VM_GUEST=1 timeout -k 10 "$limit" /opt/sandboxd/venv/bin/python -m pytest \
    -p no:cacheprovider --junitxml="$out/junit.xml" "${args[@]}" 2>&1 | tee "$out/pytest.log"
echo "${PIPESTATUS[0]}" > "$out/rc"
echo "tests: $(( $(date +%s) - start )) s" >> "$out/env.txt"
sandboxctl doctor > "$out/doctor.txt" 2>&1
journalctl -b --no-pager -o short-monotonic | tail -n 4000 > "$out/journal.txt"
tar -cf /dev/vdb -C "$out" . && sync
echo "run-tests: done, rc $(cat "$out/rc")"
# Power off now: the unit's SuccessAction= was seen to hang under TCG after the tests.
echo 1 > /proc/sys/kernel/sysrq
echo o > /proc/sysrq-trigger
