#!/usr/bin/env bash
# CI helper: build the runtime tree once per content of rootfs/, reuse it across runs.
#
#   .ci/rootfs.sh            ensure the tree, link it into place, print where and how long
#   .ci/rootfs.sh --key      print the cache key and exit
#
# key    = sha256 over the path and content of every file under rootfs/ (build.sh, packages.txt,
#          customize.sh, ...), plus the machine architecture and $SANDBOXD_ROOTFS_EPOCH (bump it
#          to force a rebuild, e.g. to pick up Debian security updates: the key does not change
#          when the archive does).
# cache  = $SANDBOXD_CI_CACHE (default /var/cache/sandboxd-ci/rootfs as root, else
#          ~/.cache/sandboxd-ci/rootfs), one directory per key: <key>/tree, built by
#          rootfs/build.sh (atomically: a failed or interrupted build leaves no <key>/tree).
# place  = /var/lib/sandboxd/rootfs/default (as root; ~/.local/share/sandboxd/rootfs/default
#          otherwise) becomes a symlink to <key>/tree, swapped atomically (rename of a symlink);
#          default.manifest.json beside it links to the tree's /etc/sandboxd/manifest.json.
#          ($SANDBOXD_ROOTFS_PLACE overrides.) A real directory found there (a tree built by
#          hand) is moved aside and deleted by the next run, so rooms using it keep working.
# prune  = keys other than the current one and the $SANDBOXD_CI_KEEP - 1 (default 1) most
#          recently used are deleted.
# Safe to re-run and to run concurrently: everything happens under an exclusive flock.
set -euo pipefail

start=$(date +%s%N)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KEEP=${SANDBOXD_CI_KEEP:-2}
if ((EUID == 0)); then
    CACHE=${SANDBOXD_CI_CACHE:-/var/cache/sandboxd-ci/rootfs}
    PLACE=${SANDBOXD_ROOTFS_PLACE:-/var/lib/sandboxd/rootfs/default}
else
    CACHE=${SANDBOXD_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sandboxd-ci/rootfs}
    PLACE=${SANDBOXD_ROOTFS_PLACE:-${XDG_DATA_HOME:-$HOME/.local/share}/sandboxd/rootfs/default}
fi

key() {
    (
        cd "$REPO"
        find rootfs -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        echo "arch $(uname -m)"
        echo "epoch ${SANDBOXD_ROOTFS_EPOCH:-0}"
    ) | sha256sum | cut -c1-16
}

if [[ ${1:-} == --key ]]; then key; exit 0; fi

log() { echo "ci/rootfs: $*" >&2; }
elapsed() { local ms=$((($(date +%s%N) - start) / 1000000)); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }

# Tools: mmdebstrap (and newuidmap for rootless builds). Install them if we may.
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
((EUID == 0)) || command -v newuidmap >/dev/null || need+=(uidmap)
if ((${#need[@]})); then
    ((EUID == 0)) || { log "missing ${need[*]}: apt-get install ${need[*]}"; exit 1; }
    log "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

KEY=$(key)
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

TREE=$CACHE/$KEY/tree
if [[ -f $TREE/etc/sandboxd/manifest.json ]]; then
    log "cache hit $KEY"
    built=0
else
    log "cache miss $KEY: building (about 2-3 minutes, 4.4 GB)"
    mkdir -p "$CACHE/$KEY"
    "$REPO/rootfs/build.sh" "$TREE"
    built=1
fi
touch "$CACHE/$KEY"  # its mtime orders keys by last use for pruning

# Link into place: a new symlink renamed over the old path is atomic; a real directory there
# cannot be renamed over, so it goes first.
mkdir -p "$(dirname "$PLACE")"
# Directories set aside by an earlier run: no room of that run can still need them.
for aside in "$(dirname "$PLACE")"/."$(basename "$PLACE")".replaced.*; do
    [[ -d $aside ]] || continue
    log "deleting $aside (set aside by an earlier run)"
    if ((EUID == 0)); then rm -rf --one-file-system "$aside"
    else unshare --map-auto --map-root-user rm -rf --one-file-system "$aside"; fi
done
if [[ -d $PLACE && ! -L $PLACE ]]; then
    # Set aside, not deleted: rooms running now keep their files until the next run.
    aside=$(dirname "$PLACE")/.$(basename "$PLACE").replaced.$$
    log "moving the directory at $PLACE to $aside (deleted by the next run)"
    mv -T "$PLACE" "$aside"
fi
ln -sfn "$TREE" "$PLACE.link.$$" && mv -T "$PLACE.link.$$" "$PLACE"
ln -sfn "$TREE/etc/sandboxd/manifest.json" "$PLACE.manifest.json.link.$$" \
    && mv -T "$PLACE.manifest.json.link.$$" "$PLACE.manifest.json"

# Prune: keep the current key and the most recently used others, up to $KEEP in all.
mapfile -t old < <(cd "$CACHE" && ls -1dt -- */ 2>/dev/null | sed 's#/$##' | grep -vx "$KEY" || true)
for ((i = KEEP - 1; i < ${#old[@]}; i++)); do
    [[ ${old[i]} =~ ^[0-9a-f]{16}$ ]] || continue
    log "pruning $CACHE/${old[i]}"
    if ((EUID == 0)); then rm -rf --one-file-system "${CACHE:?}/${old[i]}"
    else unshare --map-auto --map-root-user rm -rf --one-file-system "${CACHE:?}/${old[i]}"; fi
done

log "$PLACE -> $TREE ($( ((built)) && echo built || echo reused)) in $(elapsed) s"
echo "$PLACE"
