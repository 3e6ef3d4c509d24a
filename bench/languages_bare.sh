#!/usr/bin/env bash
# Hello world in every language of sandboxd/coderun/languages.toml, bare on the runtime tree:
# no daemon, just a throwaway "room" per run made with unshare(1) and chroot(8):
#
#   user namespace (root mapped to the caller), mount, pid, net (loopback only), uts (hostname
#   "sandbox"), ipc; the tree bind-mounted read-only; fresh tmpfs on /tmp /root /home; the
#   language's work directory bound on /workspace; /proc and /dev; the registry's env only.
#
#   bench/languages_bare.sh [--runs N] [--only ID[,ID...]] [TREE]
#
# For compiled languages it times "compile+run" (one room: compile, then run) and "run" (the
# compiled program alone); for interpreted ones "run" only. Every run's output is checked to be
# exactly "Hello from <Name>!". Figures are "median (min)" in ms of N runs after 1 warm-up with
# hyperfine (the min is the best guess on a busy machine), else the mean of a plain loop. "room" is the cost of an empty room (`true`), included in every figure.
# Peak RSS of the compile step comes from GNU time when installed. Runs as root or not.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
RUNS=5
ONLY=""
TREE=""
while (($#)); do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        -h | --help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) TREE=$1; shift ;;
    esac
done
if [[ -z $TREE ]]; then
    if ((EUID == 0)); then TREE=/var/lib/sandboxd/rootfs/default
    else TREE=${XDG_DATA_HOME:-$HOME/.local/share}/sandboxd/rootfs/default; fi
fi
TREE=$(realpath "$TREE")
[[ -x $TREE/bin/sh && -d $TREE/workspace ]] || { echo "no runtime tree at $TREE (rootfs/build.sh)" >&2; exit 1; }

PY=/opt/sandboxd/venv/bin/python
[[ -x $PY ]] || PY=python3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sandboxd-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The throwaway room. Its arguments: work dir (bound on /workspace), then the command.
cat >"$WORK/room" <<'EOF'
#!/bin/bash
T=$ROOM_TREE; W=$1; shift
exec unshare --user --map-root-user --mount --pid --fork --net --uts --ipc -- /bin/bash -c '
set -e; T=$1; W=$2; shift 2
mount --bind "$T" "$T"; mount -o remount,bind,ro "$T"
for d in tmp root home; do mount -t tmpfs -o size=1g,mode=1777 tmpfs "$T/$d"; done
mount --bind "$W" "$T/workspace"
mount -t proc proc "$T/proc"
mount --rbind /dev "$T/dev"
hostname sandbox
ip link set lo up 2>/dev/null || true
cd "$T"
exec chroot "$T" "$@"' _ "$T" "$W" "$@"
EOF
chmod +x "$WORK/room"
export ROOM_TREE=$TREE

# Per language: the example as its sourceFile, and scripts run inside the room with the
# registry's env (env -i: nothing of the caller's environment leaks in).
PYTHONPATH=$REPO "$PY" - "$WORK" "$ONLY" <<'EOF'
import shlex, sys
from pathlib import Path
from sandboxd.coderun.registry import load_registry

work, only = Path(sys.argv[1]), {s for s in sys.argv[2].split(",") if s}
reg = load_registry()
with open(work / "languages", "w") as index:
    for lang in reg:
        if only and lang.id not in only:
            continue
        d = work / lang.id
        d.mkdir()
        (d / lang.source_file).write_text(lang.example)
        env = "env -i " + " ".join(shlex.quote(f"{k}={v}") for k, v in lang.env_for("/workspace").items())
        cd = "cd /workspace && "
        run = " ".join(shlex.quote(a) for a in lang.run_argv("/workspace"))
        (d / "run.sh").write_text(f"{cd}exec {env} {run}\n")
        if lang.compiled:
            comp = " ".join(shlex.quote(a) for a in lang.compile_argv("/workspace") or [])
            (d / "compile.sh").write_text(f"{cd}exec {env} {comp}\n")
            (d / "compile_run.sh").write_text(f"{cd}{env} {comp} && exec {env} {run}\n")
        index.write(f"{lang.id}\t{lang.name}\t{int(lang.compiled)}\n")
EOF
chmod -R a+rwX "$WORK"

HAVE_HYPERFINE=0; command -v hyperfine >/dev/null && HAVE_HYPERFINE=1
GNU_TIME=""; [[ -x /usr/bin/time ]] && GNU_TIME=/usr/bin/time

# mean wall time in ms of: room DIR sh SCRIPT
measure() {
    local dir=$1 script=$2
    if ((HAVE_HYPERFINE)); then
        hyperfine -N --style none --warmup 1 --runs "$RUNS" --export-json "$WORK/h.json" \
            "$WORK/room $dir /bin/sh /workspace/$script" >/dev/null 2>&1 || { echo FAIL; return; }
        "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print("%.0f (%.0f)" % (r["median"]*1000, r["min"]*1000))' "$WORK/h.json"
    else
        local i t0 t1
        "$WORK/room" "$dir" /bin/sh "/workspace/$script" >/dev/null 2>&1 || { echo FAIL; return; }
        t0=$(date +%s%N)
        for ((i = 0; i < RUNS; i++)); do
            "$WORK/room" "$dir" /bin/sh "/workspace/$script" >/dev/null 2>&1 || { echo FAIL; return; }
        done
        t1=$(date +%s%N)
        echo "$(((t1 - t0) / RUNS / 1000000)) (mean)"
    fi
}

echo "tree: $TREE"
echo "runs: $RUNS per figure$( ((HAVE_HYPERFINE)) && echo ", hyperfine median (min) in ms after 1 warm-up")"
mkdir -p "$WORK/empty" && echo 'exit 0' >"$WORK/empty/true.sh" && chmod -R a+rwX "$WORK/empty"
echo "room (empty, \`true\`): $(measure "$WORK/empty" true.sh) ms"
echo
printf '| %-10s | %6s | %16s | %12s | %16s |\n' language output "compile+run" "run" "compile peak MiB"
printf '|%s|%s|%s|%s|%s|\n' ------------ -------- ------------------ -------------- ------------------
status=0
while IFS=$'\t' read -r -u 3 id name compiled; do
    dir=$WORK/$id
    want="Hello from $name!"
    if ((compiled)); then
        got=$("$WORK/room" "$dir" /bin/sh /workspace/compile_run.sh 2>"$WORK/err" || true)
    else
        got=$("$WORK/room" "$dir" /bin/sh /workspace/run.sh 2>"$WORK/err" || true)
    fi
    if [[ $got == "$want" ]]; then ok=ok; else ok=WRONG; status=1; fi
    cr="-" peak="-"
    if ((compiled)); then
        cr=$(measure "$dir" compile_run.sh)
        if [[ -n $GNU_TIME ]]; then
            kib=$($GNU_TIME -f %M "$WORK/room" "$dir" /bin/sh /workspace/compile.sh 2>&1 >/dev/null | tail -1 || true)
            [[ $kib =~ ^[0-9]+$ ]] && peak=$((kib / 1024))
        fi
    fi
    r=$(measure "$dir" run.sh)
    printf '| %-10s | %6s | %16s | %12s | %16s |\n' "$id" "$ok" "$cr" "$r" "$peak"
    if [[ $ok != ok ]]; then
        echo "  expected: $want"; echo "  got: ${got:0:200}"; sed 's/^/  stderr: /' "$WORK/err" | head -5
    fi
done 3<"$WORK/languages"
exit $status
