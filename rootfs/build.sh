#!/usr/bin/env bash
# Build sandboxd's read-only runtime tree (Debian trixie + the language toolchains).
#
#   rootfs/build.sh [--mirror URL] [--mode root|unshare] [--keep-old] [DEST]
#   rootfs/build.sh --customize-only TREE      # re-run rootfs/customize.sh on a built tree (root)
#
# DEST defaults to /var/lib/sandboxd/rootfs/default as root and to
# ${XDG_DATA_HOME:-~/.local/share}/sandboxd/rootfs/default otherwise.
#
# Theory of operation
#   1. mmdebstrap builds the tree into DEST.build.<pid> (same parent directory, so the final
#      rename is atomic and never crosses a filesystem). As root it uses --mode=root; otherwise
#      --mode=unshare, which needs newuidmap/newgidmap (package uidmap) and a range in
#      /etc/subuid and /etc/subgid: files owned by root inside the tree are then owned by the
#      first subordinate id on the host.
#   2. mmdebstrap's customize hook runs rootfs/customize.sh TREE inside mmdebstrap's namespace
#      (root of the tree's user namespace, /proc and /dev mounted in the tree): /etc/hosts,
#      /workspace, the Go std build cache, the JVM class-data archives, the manifest.
#   3. The finished tree replaces DEST with two renames (DEST -> DEST.old.<pid>, build -> DEST);
#      the old tree is then deleted unless --keep-old. Rooms already running keep their mounts
#      but see the old tree's files vanish: rebuild with the daemon stopped, or use --keep-old.
#   4. The manifest (/etc/sandboxd/manifest.json inside the tree: each toolchain's version) is
#      copied next to the tree as DEST.manifest.json, so tools can read it without entering it.
#
# Progress: every step prints one line with the time since the start, `build.sh: [m:ss] ...`.
# On a terminal, mmdebstrap's own chatter (apt, dpkg, the customize hook) goes to DEST.build.log
# and only its phases (its "I:" lines), warnings and errors are shown, as steps; on a failure the
# log's last lines are printed. Elsewhere (CI, a pipe) the chatter is passed through as well.
#
# No mirror is named here: mmdebstrap's default is used unless --mirror is given.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SUITE=trixie
MIRROR=""
MODE=""
KEEP_OLD=0
DEST=""
CUSTOMIZE_ONLY=""

die() { echo "build.sh: $*" >&2; exit 1; }
start=$(date +%s)
elapsed() { local s=$(($(date +%s) - start)); printf '%d:%02d' $((s / 60)) $((s % 60)); }
step() { echo "build.sh: [$(elapsed)] $*" >&2; }
usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --mirror) MIRROR=${2:?--mirror needs a URL}; shift 2 ;;
        --mirror=*) MIRROR=${1#*=}; shift ;;
        --mode) MODE=${2:?--mode needs root or unshare}; shift 2 ;;
        --mode=*) MODE=${1#*=}; shift ;;
        --keep-old) KEEP_OLD=1; shift ;;
        --customize-only) CUSTOMIZE_ONLY=${2:?--customize-only needs a tree}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $DEST ]] || die "one destination only"; DEST=$1; shift ;;
    esac
done

if [[ -n $CUSTOMIZE_ONLY ]]; then
    # Same environment as mmdebstrap's hook gives: own mount namespace, /proc, /dev bound in.
    ((EUID == 0)) || die "--customize-only needs root"
    T=$(realpath "$CUSTOMIZE_ONLY")
    exec unshare --mount --propagation private -- bash -c '
        set -e; T=$1
        mount -t proc proc "$T/proc"
        mount --rbind /dev "$T/dev"
        exec "$2" "$T"' _ "$T" "$HERE/customize.sh"
fi

if [[ -z $DEST ]]; then
    if ((EUID == 0)); then
        DEST=/var/lib/sandboxd/rootfs/default
    else
        DEST=${XDG_DATA_HOME:-$HOME/.local/share}/sandboxd/rootfs/default
    fi
fi
if [[ -z $MODE ]]; then
    if ((EUID == 0)); then MODE=root; else MODE=unshare; fi
fi
case $MODE in
    root) ((EUID == 0)) || die "--mode=root needs root; use --mode=unshare" ;;
    unshare)
        command -v newuidmap >/dev/null || die "--mode=unshare needs newuidmap (apt-get install uidmap)"
        me=$(id -un)
        grep -qE "^($me|$(id -u)):" /etc/subuid || die "no subordinate uids for $me in /etc/subuid"
        grep -qE "^($me|$(id -u)):" /etc/subgid || die "no subordinate gids for $me in /etc/subgid"
        ;;
    *) die "--mode must be root or unshare" ;;
esac
command -v mmdebstrap >/dev/null || die "needs mmdebstrap (apt-get install mmdebstrap)"

DEST=${DEST%/}
PARENT=$(dirname "$DEST")
mkdir -p "$PARENT"
DEST=$(realpath -m "$DEST")
PARENT=$(dirname "$DEST")
NAME=$(basename "$DEST")
BUILD=$PARENT/.$NAME.build.$$
OLD=$PARENT/.$NAME.old.$$

# Trees built in unshare mode are owned by subordinate ids: only a process in a user namespace
# with the same mapping may delete them.
rmtree() {
    [[ -e $1 || -L $1 ]] || return 0
    if ((EUID == 0)); then
        rm -rf --one-file-system -- "$1"
    else
        unshare --map-auto --map-root-user -- rm -rf --one-file-system -- "$1"
    fi
}
cleanup() { rmtree "$BUILD"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

mapfile -t PACKAGES < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$HERE/packages.txt")
INCLUDE=$(IFS=,; echo "${PACKAGES[*]}")

args=(
    --mode="$MODE"
    --variant=apt
    --format=directory
    --components=main
    --include="$INCLUDE"
    --aptopt='APT::Install-Recommends "false"'
    --aptopt='APT::Install-Suggests "false"'
    # Documentation is dead weight in a sandbox: keep only the copyright files.
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    # update-alternatives fails when the directory of a slave link (a man page) is missing.
    --essential-hook='for s in 1 2 3 4 5 6 7 8; do mkdir -p "$1/usr/share/man/man$s"; done'
    --customize-hook="\"$HERE/customize.sh\" \"\$1\""
)

if [[ $MODE == unshare && $EUID != 0 ]]; then
    # mmdebstrap's root in unshare mode is our first subordinate uid, which may not write in our
    # directories: hand it an empty target, owned by that id (uid 1 in a namespace that maps
    # 0 to us and 1.. to our subordinate range).
    # It must also be able to reach the target: every directory above it needs o+x (and so
    # will a rootless daemon whose rooms run as subordinate ids).
    d=$PARENT
    while [[ $d != / ]]; do
        [[ $(stat -c %A "$d") == ?????????[xt] ]] ||
            die "$d is not searchable by others (o+x); subordinate ids cannot reach $DEST: chmod o+x $d, or build elsewhere"
        d=$(dirname "$d")
    done
    mkdir -m 0755 "$BUILD"
    unshare --map-auto --map-root-user -- chown 1:1 "$BUILD"
fi
step "building $SUITE into $BUILD (mode $MODE, ${#PACKAGES[@]} packages)"
mmdebstrap_run() {
    if [[ -n $MIRROR ]]; then
        mmdebstrap "${args[@]}" "$SUITE" "$BUILD" "$MIRROR"
    else
        mmdebstrap "${args[@]}" "$SUITE" "$BUILD"
    fi
}
# mmdebstrap's lines -> the log; its phases, warnings and errors -> steps on the terminal.
mmdebstrap_steps() {
    local line
    while IFS= read -r line; do
        printf '%s\n' "$line" >>"$LOG"
        case $line in
            "I: "*) step "mmdebstrap: ${line#I: }" ;;
            "W: "* | "E: "* | customize.sh:*) step "mmdebstrap: $line" ;;
        esac
    done
}
if [[ -t 2 ]]; then
    LOG=$DEST.build.log
    : >"$LOG"
    step "mmdebstrap's output: $LOG"
    if ! mmdebstrap_run 2>&1 | mmdebstrap_steps; then
        step "mmdebstrap failed; the end of $LOG:"
        tail -n 30 "$LOG" >&2
        exit 1
    fi
else
    mmdebstrap_run
fi
step "mmdebstrap done"

[[ -f $BUILD/etc/sandboxd/manifest.json ]] || die "customize.sh wrote no manifest"

# Swap in atomically: each rename is atomic; between the two DEST is briefly absent.
step "swapping the new tree in"
if [[ -e $DEST || -L $DEST ]]; then
    mv -T -- "$DEST" "$OLD"
fi
mv -T -- "$BUILD" "$DEST"
cp -- "$DEST/etc/sandboxd/manifest.json" "$DEST.manifest.json.tmp"
mv -T -- "$DEST.manifest.json.tmp" "$DEST.manifest.json"
if ((KEEP_OLD)); then
    [[ -e $OLD ]] && echo "build.sh: previous tree kept at $OLD" >&2
elif [[ -e $OLD ]]; then
    step "deleting the previous tree"
    rmtree "$OLD"
fi

step "done in $(($(date +%s) - start)) s: $DEST ($(du -sh --apparent-size "$DEST" 2>/dev/null | cut -f1))"
