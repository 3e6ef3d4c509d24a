"""User namespace identities: who a room's root is on the host.

Theory of operation. Every room has its own user namespace. Its uid/gid maps are written by the
zygote (parent side, still in the host user namespace) while the room's set-up process waits
between ``unshare(CLONE_NEWUSER)`` and fork; the set-up process then switches to the room's
root (child side, :func:`become_root`) so that the init and everything it forks carry the room's
host ids, not the daemon's.

Two modes, chosen once at daemon start (:func:`plan`) and reported by ``ping`` and ``doctor``:

- ``subordinate`` (``sandboxctl setup`` gave the daemon's user a range in /etc/subuid and
  /etc/subgid, and newuidmap/newgidmap are installed): the range is cut into slices of
  ``SLICE_SIZE`` ids, and each room gets a free slice of its own: room ids 0..SLICE_SIZE-1 ->
  host ids ``start + k*SLICE_SIZE ...``. A room's root is therefore never the daemon's uid, and two
  rooms are two different host users: after an escape one still cannot signal, ptrace or read
  /proc/<pid>/mem of the other, nor of the daemon. uid 1000 (``user: "sandbox"``) is inside every
  slice. When every slice is taken, new rooms are refused (QUOTA_EXCEEDED) rather than made to
  share a slice. Two daemons of the same user (other state dirs) draw from the same range, so a
  slice is also held by an flock on ``<runtime dir>/id-slices/<start>-<k>.lock`` (a private 0700
  directory; the kernel drops the lock when the daemon dies), and a daemon quarantines at start
  any slice that still owns a host process.
- ``single`` (no range, or no helpers): room uid/gid 0 -> the daemon's own uid/gid, one id. Needs
  no privilege, but setgroups must be denied first (CVE-2014-8989: otherwise an unprivileged
  mapper could drop supplementary groups that deny it access). Costs: a room's root *is* the
  daemon's user on the host, rooms are not different users from each other, the room keeps the
  daemon's supplementary groups, and ``user: "sandbox"`` is refused (uid 1000 is not mapped).

Why the set-up process switches ids itself: with a subordinate map the process that unshared is
still the daemon's kuid, which the new namespace does not map (it shows as 65534 inside and may
not create files on the room's tmpfs). ``setresuid(0)`` inside the namespace makes it the slice's
first host id, with its capabilities in the namespace intact (uid transitions to 0 keep them).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field

#: ids per room in subordinate mode: root, the system users a distribution creates (< 1000), the
#: ``sandbox`` user 1000 and room for a few thousand more; 16 rooms in a 65536-id range, 256 in
#: the 1 Mi range ``sandboxctl setup`` hands out.
SLICE_SIZE = 4096
SANDBOX_UID = 1000


@dataclass(frozen=True)
class IdMap:
    """What to map: ``count`` ids starting at host ``uid_base``/``gid_base`` (single when 1).
    It crosses to the zygote as is, inside ``messages.RoomSpec`` (msgspec encodes dataclasses)."""

    uid_base: int
    gid_base: int
    count: int = 1
    slice: int = -1  # index of the slice in subordinate mode, -1 for the single mapping

    @property
    def single(self) -> bool:
        return self.count == 1

    def maps(self, room_uid: int) -> bool:
        """Whether the room's uid ``room_uid`` exists (is mapped) in this room."""
        return 0 <= room_uid < self.count


def single(uid: int | None = None, gid: int | None = None) -> IdMap:
    return IdMap(os.getuid() if uid is None else uid, os.getgid() if gid is None else gid, 1)


class SlicesExhausted(Exception):
    """Every id slice is held by a room."""


@dataclass
class IdPlan:
    """How rooms are mapped, and (subordinate mode) which slices are free."""

    mode: str  # "single" | "subordinate"
    uid_start: int
    gid_start: int
    slices: int = 0
    slice_size: int = SLICE_SIZE
    reason: str = ""
    held: set[int] = field(default_factory=set)  # slices of live rooms
    quarantined: set[int] = field(default_factory=set)  # slices with leftover host processes
    lock_dir: str | None = None  # where slices are flocked against other daemons of the user
    _locks: dict[int, int] = field(default_factory=dict)

    def acquire(self) -> IdMap:
        """The mapping for a new room; raises :class:`SlicesExhausted` in subordinate mode."""
        if self.mode == "single":
            return IdMap(self.uid_start, self.gid_start, 1)
        for k in range(self.slices):
            if k not in self.held and k not in self.quarantined and self._lock(k):
                self.held.add(k)
                off = k * self.slice_size
                return IdMap(self.uid_start + off, self.gid_start + off, self.slice_size, k)
        raise SlicesExhausted(f"all {self.slices} id slices are in use")

    def release(self, ids: IdMap | None) -> None:
        if ids is not None and ids.slice >= 0:
            self.held.discard(ids.slice)
            fd = self._locks.pop(ids.slice, None)
            if fd is not None:
                os.close(fd)

    def _lock(self, k: int) -> bool:
        """Hold slice ``k`` against other daemons of this user (False: one of them has it)."""
        if self.lock_dir is None:
            return True
        path = os.path.join(self.lock_dir, f"{self.uid_start}-{k}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._locks[k] = fd
        return True

    def quarantine_busy(self, proc_root: str = "/proc") -> list[int]:
        """Mark slices that still own host processes as unusable (a restart after a crash must
        not give a new room the ids of a process it could then signal or ptrace)."""
        if self.mode != "subordinate":
            return []
        lo, hi = self.uid_start, self.uid_start + self.slices * self.slice_size
        busy = set()
        for name in os.listdir(proc_root):
            if not name.isdigit():
                continue
            try:
                with open(f"{proc_root}/{name}/status") as f:
                    for line in f:
                        # A zombie can no longer be signalled to any effect, ptraced or read:
                        # only a live process makes its slice dangerous to hand out (a quick
                        # restart found dead rooms' zombies not yet reaped, issue 23 D7).
                        if line.startswith("State:") and line.split()[1:2] in (["Z"], ["X"]):
                            break
                        if line.startswith("Uid:"):
                            uids = [int(x) for x in line.split()[1:]]
                            busy |= {(u - lo) // self.slice_size for u in uids if lo <= u < hi}
                            break
            except (OSError, ValueError):
                continue
        self.quarantined |= busy
        return sorted(busy)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"mode": self.mode, "sandboxUser": self.mode == "subordinate"}
        if self.mode == "subordinate":
            out.update(sliceSize=self.slice_size, slices=self.slices,
                       slicesFree=self.slices - len(self.held | self.quarantined),
                       uidStart=self.uid_start, gidStart=self.gid_start,
                       lockedAcrossDaemons=self.lock_dir is not None)
            if self.reason:
                out["reason"] = self.reason
        else:
            out.update(reason=self.reason, cost=SINGLE_COST)
        return out


SINGLE_COST = ("a room's root is the daemon's own host uid (an escape lands as the daemon's "
               "user), rooms are not different host users from each other, and user 'sandbox' "
               "is unavailable")


def _helper_ok(name: str) -> bool:
    path = shutil.which(name)
    if path is None:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid == 0 and st.st_mode & stat.S_ISUID:
        return True
    try:
        return bool(os.getxattr(path, "security.capability"))
    except OSError:
        return False


def private_lock_dir(uid: int) -> str | None:
    """``$XDG_RUNTIME_DIR/sandboxd/id-slices`` (else ``/tmp/sandboxd-UID/id-slices``), created
    0700; None when the directory is not ours alone (someone squatted it in /tmp)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/sandboxd-{uid}"
    path = os.path.join(base, "sandboxd" if "XDG_RUNTIME_DIR" in os.environ else "",
                        "id-slices")
    with contextlib.suppress(OSError):
        os.makedirs(path, mode=0o700, exist_ok=True)
    for d in (base, path):
        try:
            st = os.lstat(d)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
            return None
    return path


def plan(user: str, uid: int, gid: int, *, subuid: str = "/etc/subuid",
         subgid: str = "/etc/subgid", slice_size: int = SLICE_SIZE,
         lock_dir: str | None = "auto") -> IdPlan:
    """Decide the mapping mode for a daemon running as ``user`` (``uid``/``gid``).

    ``lock_dir`` "auto" is :func:`private_lock_dir`; None turns cross-daemon locking off."""
    def fallback(reason: str) -> IdPlan:
        return IdPlan("single", uid, gid, reason=reason)

    ru = subordinate_range(user, subuid) or subordinate_range(str(uid), subuid)
    rg = subordinate_range(user, subgid) or subordinate_range(str(uid), subgid)
    if ru is None or rg is None:
        if uid == 0:
            # The worst fallback: a room's root would be the host's root (no capabilities
            # outside the namespace, but it owns every root-owned file it can reach).
            return fallback("the daemon runs as root and root has no subordinate range: rooms "
                            "map to host uid 0 (run sandboxd as an unprivileged user, or give "
                            "root a range in /etc/subuid and /etc/subgid)")
        return fallback(f"{user} has no subordinate {'uids' if ru is None else 'gids'} "
                        f"(sandboxctl setup --user {user})")
    if not (_helper_ok("newuidmap") and _helper_ok("newgidmap")):
        return fallback("newuidmap/newgidmap missing or not setuid (package uidmap)")
    n = min(ru[1], rg[1]) // slice_size
    if n < 1:
        return fallback(f"{user}'s subordinate range holds fewer than {slice_size} ids")
    # A range that covers the daemon's own ids would hand them to a room.
    if ru[0] <= uid < ru[0] + n * slice_size or rg[0] <= gid < rg[0] + n * slice_size:
        return fallback(f"{user}'s subordinate range contains its own uid/gid")
    locks = private_lock_dir(uid) if lock_dir == "auto" else lock_dir
    return IdPlan("subordinate", ru[0], rg[0], slices=n, slice_size=slice_size,
                  reason="" if locks else "no private directory for slice locks: another "
                  "daemon of this user could hand out the same slices", lock_dir=locks)


# --- parent side -------------------------------------------------------------------------------


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def write_maps(pid: int, ids: IdMap) -> None:
    """Parent side: give ``pid`` (just unshared) its uid and gid maps."""
    if ids.single:
        _write(f"/proc/{pid}/setgroups", "deny")
        _write(f"/proc/{pid}/uid_map", f"0 {ids.uid_base} 1\n")
        _write(f"/proc/{pid}/gid_map", f"0 {ids.gid_base} 1\n")
        return
    # newgidmap leaves setgroups allowed: the set-up process uses that to drop the daemon's
    # supplementary groups (become_root), so no room process carries a host group of ours.
    for tool, base in (("newuidmap", ids.uid_base), ("newgidmap", ids.gid_base)):
        res = subprocess.run([tool, str(pid), "0", str(base), str(ids.count)],
                             capture_output=True, text=True, timeout=10, check=False)
        if res.returncode != 0:
            raise OSError(f"{tool} {pid} 0 {base} {ids.count} failed: {res.stderr.strip()}")


# --- child side --------------------------------------------------------------------------------


def become_root(ids: IdMap) -> None:
    """Child side, once the maps are written: become uid/gid 0 of the room's namespace."""
    if not ids.single:
        # Drop the daemon's supplementary groups (host gids, unmapped here): they would let a room
        # read group-accessible files of the daemon's user after an escape.
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def subordinate_range(user: str, path: str = "/etc/subuid") -> tuple[int, int] | None:
    """The largest subordinate range of ``user`` (name or uid) in ``path``, as (start, count).

    The largest, not the first: ``sandboxctl setup`` adds a bigger range next to an older, smaller
    one when it raises its allocation.
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best: tuple[int, int] | None = None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == user and parts[1].isdigit() and parts[2].isdigit():
            cand = (int(parts[1]), int(parts[2]))
            if best is None or cand[1] > best[1]:
                best = cand
    return best


# --- per-namespace ceilings on user counters ---------------------------------------------------
# inotify instances and watches, fanotify groups and marks are counted per user namespace and
# again for its owner (the daemon's uid) in the parent, where fs.inotify.max_user_instances
# (128 by default) is shared by every room and the daemon user's host processes: one room
# holding 128 inotify instances made inotify_init fail everywhere else (issue 10, H7). A user
# namespace's own maxima start at INT_MAX; the room's init (root of the room's namespace, with
# CAP_SYS_RESOURCE there) lowers them through the room's fresh procfs before its /proc/sys goes
# read-only (mnt.mount_proc), and payloads, without capabilities, cannot raise them again.
# fanotify is denied outright (no toolchain needs it).
ROOM_UCOUNTS = {
    "max_inotify_instances": ("/proc/sys/fs/inotify/max_user_instances", 8),
    "max_inotify_watches": ("/proc/sys/fs/inotify/max_user_watches", 8),
    "max_fanotify_groups": (None, 0),
    "max_fanotify_marks": (None, 0),
}


def cap_room_ucounts(proc: str = "/proc") -> dict[str, int]:
    """Write the room namespace's maxima (call inside it, with its capabilities); return them."""
    done: dict[str, int] = {}
    for name, (host, share) in ROOM_UCOUNTS.items():
        path = f"{proc}/sys/user/{name}"
        if not os.path.exists(path):
            continue  # an older kernel without this counter (fanotify: 5.13)
        value = 0
        if host is not None:
            with open(f"{proc}{host[len('/proc'):]}") as f:  # (the pools are global)
                value = max(4, int(f.read()) // share)
        _write(path, str(value))
        done[name] = value
    return done
