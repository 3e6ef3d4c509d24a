#!/usr/bin/env bash
# Set everything up on a Debian machine (as root) and run sandboxd, rootless, as the `sandboxd`
# user — with a short demonstration of what a room is, then the daemon in the foreground.
#
#   ./scripts/run.sh              packages, venv, user, cgroup delegation, the 13-language rootfs
#                                 (cached; first build ~3-5 min), the daemon, the demo; Ctrl-C stops
#   ./scripts/run.sh --no-rootfs  skip the rootfs build: rooms use a read-only view of the host
#   ./scripts/run.sh --demo       run the demo and stop (no foreground daemon)
#
# The socket is /run/sandboxd/sandboxd.sock (group sandboxd): `sandboxctl` as root, or as any
# member of the group, talks to it.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rootfs=yes
foreground=yes
for arg in "$@"; do
    case $arg in
        --no-rootfs) rootfs=no ;;
        --demo) foreground=no ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "run.sh: run me as root (I set up the host, then drop to sandboxd)" >&2; exit 1; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "host packages"
"$top/scripts/deps.sh"
say "venv, package, sandboxd user, subordinate ids (scripts/install.sh)"
"$top/scripts/install.sh"
venv=${SANDBOXD_VENV:-/opt/sandboxd/venv}
ctl=$venv/bin/sandboxctl
say "cgroup delegation and state dir for sandboxd (sandboxctl setup)"
"$ctl" setup --user sandboxd --state-dir /var/lib/sandboxd/state
rootfs_arg=host
if [ $rootfs = yes ]; then
    say "runtime rootfs for 13 languages (cached after the first build)"
    "$top/.ci/rootfs.sh"
    rootfs_arg=/var/lib/sandboxd/rootfs/default
fi

sock=/run/sandboxd/sandboxd.sock
install -d -o sandboxd -g sandboxd -m 0750 /run/sandboxd
if "$ctl" --socket "$sock" ping >/dev/null 2>&1; then
    echo "run.sh: a sandboxd already answers on $sock (systemd service?); stop it first" >&2
    exit 1
fi
cfg=$(mktemp /tmp/sandboxd-run.XXXXXX.toml)
printf 'socket_group = "sandboxd"\n' > "$cfg"
chmod 644 "$cfg"
log=/var/lib/sandboxd/sandboxd.log
say "starting sandboxd as user sandboxd (log: $log)"
setpriv --reuid=sandboxd --regid=sandboxd --init-groups --inh-caps=-all -- \
    env -i PATH=/usr/bin:/bin HOME=/var/lib/sandboxd \
    "$venv/bin/sandboxd" --socket "$sock" --state-dir /var/lib/sandboxd/state \
    --rootfs "$rootfs_arg" --config "$cfg" >>"$log" 2>&1 &
daemon=$!
stop() { kill -TERM $daemon 2>/dev/null || true; wait $daemon 2>/dev/null || true; rm -f "$cfg"; }
trap stop EXIT
for _ in $(seq 100); do "$ctl" --socket "$sock" ping >/dev/null 2>&1 && break; sleep 0.1; done

demo() { printf '\n\033[36m$ %s\033[0m\n' "$*"; "$@" || true; }
S=("$ctl" --socket "$sock")
say "demo"
demo "${S[@]}" ping
demo "${S[@]}" sh demo 'echo "hello from $(hostname)"; id; ps -e -o pid,args; ip -brief link 2>/dev/null || cat /proc/net/dev'
demo "${S[@]}" sh demo 'touch /usr/x; echo > /workspace/ok && ls /workspace; cat /etc/shadow'
demo "${S[@]}" exec demo --timeout 1 -- sh -c '(setsid sleep 1000 &); sleep 1000'
demo "${S[@]}" sh demo 'ps -e -o pid,args   # the timeout killed the whole tree'
if [ $rootfs = yes ]; then
    demo "${S[@]}" examples --room demo      # runCode: hello world in all 13 languages
fi
demo "${S[@]}" rooms
demo "${S[@]}" destroy demo

if [ $foreground = yes ]; then
    say "sandboxd is running on $sock — try: $ctl --socket $sock sh myroom 'uname -a'   (Ctrl-C stops)"
    tail -n 5 -f "$log" --pid=$daemon &
    wait $daemon
fi
