"""cgroup v2: a delegated subtree (pure v2 hosts, or the cgroup2 mount of a hybrid host).

What differs from v1 (package docstring): one directory per cgroup; limits in memory.max,
memory.swap.max, cpu.max, pids.max; children need ``cgroup.subtree_control``; ``cgroup.kill``;
a payload joins through a cgroup.procs fd the *daemon* opened. The daemon must sit in a leaf of
its subtree (``supervisor``): :func:`bootstrap` puts it there at start-up.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterable
from typing import Any

from ...config import RoomLimits
from ...errors import InternalError
from . import tree
from .fs import Fs, ints, join, keyed
from .interface import CgroupStats, RoomCgroup, RunCgroupLimits
from .tree import CPU_PERIOD_US, Node, Ops, TreeBackend, cpu_quota, write_limit

__all__ = ["CONTROLLERS", "SUPERVISOR", "V2Backend", "bootstrap", "find_root", "probe"]

CONTROLLERS = ("memory", "pids", "cpu")
SUPERVISOR = "supervisor"


class V2Ops(Ops):
    backend = "v2"

    def _f(self, node: Node, name: str) -> str:
        return os.path.join(node.paths["unified"], name)

    def _memory(self, node: Node, value: int) -> None:
        write_limit(self.fs, self._f(node, "memory.max"), str(value), "memory")
        # Swap counts against nothing in memory.max: without this a hog swaps instead of
        # being OOM-killed (when swap exists).
        if self.fs.exists(self._f(node, "memory.swap.max")):
            write_limit(self.fs, self._f(node, "memory.swap.max"), "0", "memory")

    def write_room_limits(self, node: Node, limits: RoomLimits, enforce: set[str]) -> None:
        if "memory" in enforce:
            self._memory(node, limits.memory_bytes)
        if "cpus" in enforce:
            write_limit(self.fs, self._f(node, "cpu.max"),
                        f"{cpu_quota(limits.cpus)} {CPU_PERIOD_US}", "cpus")
        if "pids" in enforce:
            write_limit(self.fs, self._f(node, "pids.max"), str(limits.pids), "pids")

    def prepare_room(self, node: Node) -> None:
        # Runs carry their own memory/pids limits, so the room hands those controllers down.
        # Must happen while the room is empty (no internal processes), hence the init leaf.
        # (cpu is not handed down: runs have no bandwidth limit of their own, and cpu.stat
        # usage_usec is there without it.)
        want = [c for c in ("memory", "pids") if c in self.controllers]
        if want:
            self.fs.write(self._f(node, "cgroup.subtree_control"),
                          " ".join("+" + c for c in want))

    def prepare_run(self, node: Node) -> None:
        pass

    def write_run_limits(self, node: Node, limits: RunCgroupLimits) -> None:
        if limits.memory_bytes is not None:
            self._memory(node, limits.memory_bytes)
        if limits.pids is not None:
            write_limit(self.fs, self._f(node, "pids.max"), str(limits.pids), "pids")

    def cpu_usage_ns(self, node: Node) -> int:
        # cpu.stat usage_usec is core cgroup2 accounting: present even without the cpu controller.
        usec = keyed(self.fs.read_opt(self._f(node, "cpu.stat")), "usage_usec")
        return (usec or 0) * 1000

    def oom_kills(self, node: Node) -> int:
        return keyed(self.fs.read_opt(self._f(node, "memory.events")), "oom_kill") or 0

    def stats(self, node: Node) -> CgroupStats:
        cur = ints(self.fs.read_opt(self._f(node, "pids.current")))
        if cur is None:
            cur = len(self.pids(node))
        return CgroupStats(
            cpu_usage_ns=self.cpu_usage_ns(node),
            memory_peak_bytes=ints(self.fs.read_opt(self._f(node, "memory.peak"))),
            pids_current=cur,
            pids_peak=ints(self.fs.read_opt(self._f(node, "pids.peak"))),
            oom_kills=self.oom_kills(node),
            pids_limit_hits=keyed(self.fs.read_opt(self._f(node, "pids.events")), "max") or 0,
            memory_current_bytes=ints(self.fs.read_opt(self._f(node, "memory.current"))),
        )

    def populated(self, node: Node) -> bool:
        events = self.fs.read_opt(self._f(node, "cgroup.events"))
        if events is None:  # the cgroup is gone
            return False
        return keyed(events, "populated") != 0

    def freeze(self, node: Node, frozen: bool) -> bool:
        if not self.fs.isdir(node.paths.get("unified", "")):
            return False
        self.fs.write(self._f(node, "cgroup.freeze"), "1" if frozen else "0")
        deadline = time.monotonic() + tree.FREEZE_WAIT_S
        while (frozen and keyed(self.fs.read_opt(self._f(node, "cgroup.events")), "frozen") != 1
               and time.monotonic() < deadline):
            self.fs.sleep(0.001)
        return True

    def kill(self, node: Node) -> None:
        if not self.fs.isdir(node.paths["unified"]):
            return
        if self.fs.exists(self._f(node, "cgroup.kill")):
            self.fs.write(self._f(node, "cgroup.kill"), "1")
            return
        # Kernels < 5.14: freeze so nothing forks, SIGKILL everything, thaw to deliver.
        self.fs.write(self._f(node, "cgroup.freeze"), "1")
        deadline = time.monotonic() + tree.FREEZE_WAIT_S
        while (keyed(self.fs.read_opt(self._f(node, "cgroup.events")), "frozen") != 1
               and time.monotonic() < deadline):
            self.fs.sleep(0.001)
        for pid in self.pids(node):
            self.fs.kill(pid, signal.SIGKILL)
        self.fs.write(self._f(node, "cgroup.freeze"), "0")

    def join_fds(self, node: Node) -> list[int]:
        # Opened by the daemon so the kernel checks the migration with the daemon's credentials
        # and cgroup namespace (>= 5.16), not the payload's (see "Joining a run").
        return [self.fs.open_procs(self._f(node, "cgroup.procs"))]


class V2Backend(TreeBackend):
    name = "v2"

    def __init__(self, root: str, subtree: str, controllers: Iterable[str],
                 fs: Fs | None = None, missing: dict[str, str] | None = None,
                 pending_move: bool = False) -> None:
        self.root = root
        self.subtree = subtree  # path relative to root, "/..." form
        self.controllers = frozenset(controllers)
        self.fs = fs or Fs()
        self.missing = missing or {}
        self.pending_move = pending_move  # the daemon still sits in the subtree root
        self._v2ops = V2Ops(self.fs, self.controllers)
        self.ops = self._v2ops
        self.base = Node({"unified": join(root, subtree)})

    def bootstrap(self) -> list[str]:
        """Move the daemon into <subtree>/supervisor if needed, enable memory/pids/cpu for the
        rooms, and claim what is now enabled. Call before the zygote starts (it must be born in
        the supervisor leaf). Idempotent."""
        top = self.base.paths["unified"]
        lines = move_to_supervisor(top, self.fs) if self.pending_move else []
        self.pending_move = False
        lines += enable_controllers(top, self.fs)
        enabled = set((self.fs.read_opt(os.path.join(top, "cgroup.subtree_control")) or "")
                      .split())
        self.controllers = frozenset(c for c in CONTROLLERS if c in enabled)
        self._v2ops.controllers = self.controllers
        self.missing = {c: f"not enabled in {top}/cgroup.subtree_control" for c in CONTROLLERS
                        if c not in self.controllers}
        return lines

    def create_room(self, room_id: str, limits: RoomLimits) -> RoomCgroup:
        if self.pending_move:
            raise InternalError("cgroup v2 backend used before bootstrap(): the daemon still "
                                "sits in the delegated subtree's root",
                                path=self.base.paths["unified"])
        return super().create_room(room_id, limits)

    def describe(self) -> dict[str, Any]:
        return {"backend": "v2", "root": self.root, "parent": self.base.paths["unified"],
                "bootstrapped": not self.pending_move,
                "controllers": sorted(self.controllers),
                "limits": sorted(self.enforceable()),
                "missing": dict(self.missing),
                "kill": "cgroup.kill" if self.fs.exists(
                    os.path.join(self.base.paths["unified"], "cgroup.kill")) else "freeze"}


# === where the subtree is =====================================================================


def own_cgroup(proc_root: str) -> str | None:
    """The daemon's cgroup2 path (``0::<path>`` in /proc/self/cgroup)."""
    try:
        with open(os.path.join(proc_root, "self", "cgroup")) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except OSError:
        return None
    return None


def find_root(v1_root: str, v2_root: str | None, fs: Fs) -> str | None:
    """The cgroup2 mount: ``v2_root``, else the v1 root itself (pure v2) or its ``unified``."""
    if v2_root is not None:
        return v2_root if fs.exists(os.path.join(v2_root, "cgroup.controllers")) else None
    for cand in (v1_root, os.path.join(v1_root, "unified")):
        if fs.exists(os.path.join(cand, "cgroup.controllers")):
            return cand
    return None


def probe(v1_root: str, v2_root: str | None, parent: str | None, proc_root: str,
          fs: Fs) -> V2Backend | str:
    """A v2 backend over the delegated subtree, or why there is none."""
    root = find_root(v1_root, v2_root, fs)
    if root is None:
        return "no cgroup2 hierarchy mounted"
    pending = False
    if parent is not None:
        subtree = "/" + parent.strip("/")
    else:
        own = own_cgroup(proc_root)
        if own is None:
            return f"cannot read the daemon's cgroup from {proc_root}/self/cgroup"
        if own == "/":
            return ("the daemon is in the root cgroup2, not in a delegated subtree (run it under "
                    "systemd with Delegate=yes, or set cgroup_parent)")
        if os.path.basename(own) != SUPERVISOR:
            subtree, pending = own, True  # bootstrap() moves the daemon into <own>/supervisor
        else:
            subtree, pending = os.path.dirname(own), False
        if subtree == "/":
            return "the daemon is in /supervisor: the root cgroup2 is not delegated"
    path = join(root, subtree)
    if not fs.isdir(path):
        return f"{path} does not exist"
    for name in ("", "cgroup.procs", "cgroup.subtree_control"):
        p = os.path.join(path, name) if name else path
        if not fs.access(p, os.W_OK | (os.X_OK if not name else 0)):
            return f"{p} is not writable by uid {os.geteuid()}"
    enabled = set((fs.read_opt(os.path.join(path, "cgroup.subtree_control")) or "").split())
    have = {c for c in CONTROLLERS if c in enabled}
    missing = {c: f"not enabled in {path}/cgroup.subtree_control" for c in CONTROLLERS
               if c not in have}
    if pending:
        # Before the move the subtree root holds the daemon, so nothing can be enabled yet;
        # claim what it could delegate (cgroup.controllers): bootstrap() settles the truth.
        avail = set((fs.read_opt(os.path.join(path, "cgroup.controllers")) or "").split())
        missing = {c: f"not available in {path}/cgroup.controllers" for c in CONTROLLERS
                   if c not in avail}
        have = {c for c in CONTROLLERS if c in avail}
    return V2Backend(root, subtree, have, fs=fs, missing=missing, pending_move=pending)


# === daemon start-up ===========================================================================


def move_to_supervisor(subtree: str, fs: Fs) -> list[str]:
    sup = os.path.join(subtree, SUPERVISOR)
    lines = [f"created {sup}"] if fs.mkdir(sup) else []
    # Everything in the subtree root moves (the daemon, and anything the unit started with it):
    # a cgroup that hands controllers to children may hold no processes itself.
    for pid_s in fs.read(os.path.join(subtree, "cgroup.procs")).split():
        try:
            fs.write(os.path.join(sup, "cgroup.procs"), pid_s)
        except InternalError as err:
            if err.context.get("errno") != errno.ESRCH:  # exited meanwhile
                raise
    lines.append(f"moved the daemon's processes into {sup}")
    return lines


def enable_controllers(subtree: str, fs: Fs) -> list[str]:
    lines = []
    avail = set((fs.read_opt(os.path.join(subtree, "cgroup.controllers")) or "").split())
    enabled = set((fs.read_opt(os.path.join(subtree, "cgroup.subtree_control")) or "").split())
    want = [c for c in CONTROLLERS if c in avail and c not in enabled]
    if want:
        fs.write(os.path.join(subtree, "cgroup.subtree_control"),
                 " ".join("+" + c for c in want))
        lines.append(f"enabled {' '.join(want)} in {subtree}/cgroup.subtree_control")
    absent = [c for c in CONTROLLERS if c not in avail]
    if absent:
        lines.append(f"not delegated to {subtree}: {' '.join(absent)}")
    return lines


def bootstrap(v2_root: str | None = None, v1_root: str = "/sys/fs/cgroup",
              proc_root: str = "/proc", *, fs: Fs | None = None) -> list[str]:
    """v2 only: put the daemon in ``<own>/supervisor`` and enable our controllers for rooms.

    The same as ``detect(...).bootstrap()`` for the default (own-cgroup) layout, usable before
    detect(). Call before the zygote starts. Idempotent; returns human lines; never raises for
    "nothing to do". With systemd >= 254 and DelegateSubgroup=supervisor only the controller
    step runs.
    """
    fs = fs or Fs()
    root = find_root(v1_root, v2_root, fs)
    if root is None:
        return ["no cgroup2 hierarchy: nothing to bootstrap"]
    own = own_cgroup(proc_root)
    if own is None or own == "/":
        return [f"daemon is in cgroup2 {own or '?'}: not a delegated subtree, nothing moved"]
    lines: list[str] = []
    if os.path.basename(own) == SUPERVISOR:
        subtree = join(root, os.path.dirname(own))
    else:
        subtree = join(root, own)
        if not fs.access(os.path.join(subtree, "cgroup.procs"), os.W_OK):
            return [f"{subtree} is not delegated to uid {os.geteuid()}: nothing moved"]
        lines += move_to_supervisor(subtree, fs)
    return lines + enable_controllers(subtree, fs)
