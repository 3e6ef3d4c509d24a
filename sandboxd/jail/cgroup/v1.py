"""cgroup v1 (hybrid hosts): one directory per controller hierarchy, under a delegated parent.

What differs from v2 (package docstring): the same room tree in memory, pids, cpu, cpuacct and
freezer (co-mounted hierarchies written once); limits in memory.limit_in_bytes (= memsw),
cpu.cfs_quota_us, pids.max; no kill file (freezer FROZEN, SIGKILL all, THAWED); a payload opens
cgroup.procs itself through a directory fd; a kill is counted only in the victim's own cgroup.
The parent is ``sandboxd/<user>`` (``sandboxctl setup`` made and chowned it), and each daemon
instance keeps its rooms in a subdirectory of its own.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import time
from collections.abc import Iterable
from typing import Any

from ...config import RoomLimits
from . import tree
from .fs import Fs, ints, join, keyed
from .interface import CgroupStats, RunCgroupLimits
from .tree import CPU_PERIOD_US, Node, Ops, TreeBackend, check_name, cpu_quota, write_limit

__all__ = ["CONTROLLERS", "V1Backend", "default_user", "hierarchies", "probe", "status"]

CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")


class V1Ops(Ops):
    child_opens_procs = True
    backend = "v1"

    def _f(self, node: Node, ctrl: str, name: str) -> str:
        return os.path.join(node.paths[ctrl], name)

    def _memory(self, node: Node, value: int) -> None:
        # limit first, then memsw: memsw may never be below the limit. memsw == limit means no
        # swap at all (memsw exists only with swapaccount=1; without it there is no swap cap).
        write_limit(self.fs, self._f(node, "memory", "memory.limit_in_bytes"), str(value),
                    "memory")
        memsw = self._f(node, "memory", "memory.memsw.limit_in_bytes")
        if self.fs.exists(memsw):
            write_limit(self.fs, memsw, str(value), "memory")

    def write_room_limits(self, node: Node, limits: RoomLimits, enforce: set[str]) -> None:
        if "memory" in enforce:
            self._memory(node, limits.memory_bytes)
        if "cpus" in enforce:
            write_limit(self.fs, self._f(node, "cpu", "cpu.cfs_period_us"), str(CPU_PERIOD_US),
                        "cpus")
            write_limit(self.fs, self._f(node, "cpu", "cpu.cfs_quota_us"),
                        str(cpu_quota(limits.cpus)), "cpus")
        if "pids" in enforce:
            write_limit(self.fs, self._f(node, "pids", "pids.max"), str(limits.pids), "pids")

    def prepare_room(self, node: Node) -> None:
        pass

    def prepare_run(self, node: Node) -> None:
        # The payload child opens this itself, as a subordinate uid (see "Joining a run"); the
        # room directory above is 0700, so only the holder of the directory fd gets here.
        for d in node.dirs():
            self.fs.chmod(os.path.join(d, "cgroup.procs"), 0o666)

    def write_run_limits(self, node: Node, limits: RunCgroupLimits) -> None:
        if limits.memory_bytes is not None:
            self._memory(node, limits.memory_bytes)
        if limits.pids is not None:
            write_limit(self.fs, self._f(node, "pids", "pids.max"), str(limits.pids), "pids")

    def cpu_usage_ns(self, node: Node) -> int:
        if "cpuacct" not in node.paths:
            return 0
        return ints(self.fs.read_opt(self._f(node, "cpuacct", "cpuacct.usage"))) or 0

    def oom_kills(self, node: Node) -> int:
        # v1 counts a kill only in the victim's own cgroup (v2's memory.events is hierarchical):
        # a room's figure is the sum over its live cgroups (the init leaf, runs, each run).
        if "memory" not in node.paths:
            return 0
        return sum(keyed(self.fs.read_opt(os.path.join(d, "memory.oom_control")), "oom_kill")
                   or 0 for d in self.walk(node.paths["memory"]))

    def stats(self, node: Node) -> CgroupStats:
        peak = cur = ppeak = mem = None
        hits = 0
        if "memory" in node.paths:
            peak = ints(self.fs.read_opt(self._f(node, "memory", "memory.max_usage_in_bytes")))
            mem = ints(self.fs.read_opt(self._f(node, "memory", "memory.usage_in_bytes")))
        if "pids" in node.paths:
            cur = ints(self.fs.read_opt(self._f(node, "pids", "pids.current")))
            ppeak = ints(self.fs.read_opt(self._f(node, "pids", "pids.peak")))
            hits = keyed(self.fs.read_opt(self._f(node, "pids", "pids.events")), "max") or 0
        if cur is None:
            cur = len(self.pids(node))
        return CgroupStats(cpu_usage_ns=self.cpu_usage_ns(node), memory_peak_bytes=peak,
                           pids_current=cur, pids_peak=ppeak, oom_kills=self.oom_kills(node),
                           pids_limit_hits=hits, memory_current_bytes=mem)

    def populated(self, node: Node) -> bool:
        return bool(self.pids(node))

    def _frozen(self, top: str) -> bool:
        """Every live task of the subtree is frozen.

        Not simply top's freezer.state: a v1 cgroup reads FREEZING as long as a child that was
        just rmdir'd is still being released (its css is offline and never FROZEN), which costs
        ~15 ms after each run. So: each listed leaf, and each cgroup holding tasks, is FROZEN.
        """
        for d in self.walk(top):
            leaf = not self.fs.listdirs(d)
            if leaf or (self.fs.read_opt(os.path.join(d, "cgroup.procs")) or "").strip():
                state = (self.fs.read_opt(os.path.join(d, "freezer.state")) or "").strip()
                if state and state != "FROZEN":
                    return False
        return True

    def freeze(self, node: Node, frozen: bool) -> bool:
        if not self.fs.isdir(node.paths.get("freezer", "")):
            return False
        self.fs.write(self._f(node, "freezer", "freezer.state"), "FROZEN" if frozen else "THAWED")
        deadline = time.monotonic() + tree.FREEZE_WAIT_S
        while frozen and not self._frozen(node.paths["freezer"]) and time.monotonic() < deadline:
            self.fs.sleep(0.0005)
        return True

    def kill(self, node: Node) -> None:
        if not self.fs.isdir(node.paths["freezer"]):
            # Only after a partial rmdir: nothing left to freeze with, so a plain sweep.
            for pid in self.pids(node):
                self.fs.kill(pid, signal.SIGKILL)
            return
        state = self._f(node, "freezer", "freezer.state")
        killed: set[int] = set()
        for _ in range(3):
            self.fs.write(state, "FROZEN")
            deadline = time.monotonic() + tree.FREEZE_WAIT_S
            # FREEZING can stick (a task in uninterruptible sleep); kill anyway after the bound:
            # SIGKILL still lands on everything that did freeze, and the loop comes back.
            while not self._frozen(node.paths["freezer"]) and time.monotonic() < deadline:
                self.fs.sleep(0.0005)
            pids = self.pids(node)
            for pid in pids:
                self.fs.kill(pid, signal.SIGKILL)
            killed |= pids
            # Frozen tasks take the SIGKILL when thawed.
            self.fs.write(state, "THAWED")
            if not (self.pids(node) - killed):
                return

    def join_fds(self, node: Node) -> list[int]:
        return []  # the directory fds: the child must open cgroup.procs itself


class V1Backend(TreeBackend):
    name = "v1"

    def __init__(self, root: str, parent: str, hierarchies: dict[str, str],
                 controllers: Iterable[str], fs: Fs | None = None,
                 missing: dict[str, str] | None = None) -> None:
        """hierarchies: controller -> its hierarchy root (co-mounted ones share a realpath)."""
        self.root = root
        self.parent = parent
        self.controllers = frozenset(controllers)
        self.fs = fs or Fs()
        self.missing = missing or {}
        self.ops = V1Ops(self.fs, self.controllers)
        self.base = Node({c: join(h, parent) for c, h in hierarchies.items()
                          if c in self.controllers})

    def use_instance(self, name: str) -> None:
        """Put this daemon's rooms in ``<parent>/<name>``: daemons of one user (different state
        dirs) then never reconcile away each other's rooms. Created if missing."""
        node = self.base.child(check_name("instance", name))
        for d in node.dirs():
            self.fs.mkdir(d, 0o700)
        self.base = node
        self.parent = f"{self.parent}/{name}"

    def release(self) -> None:
        """At shutdown: remove the instance directories (the rooms are gone by then)."""
        if self.parent.count("/") < 2:
            return  # never the delegated parent itself
        for d in self.base.dirs():
            with contextlib.suppress(OSError):
                self.fs.rmdir(d)

    def describe(self) -> dict[str, Any]:
        return {"backend": "v1", "root": self.root, "parent": self.parent,
                "paths": dict(self.base.paths), "controllers": sorted(self.controllers),
                "limits": sorted(self.enforceable()), "missing": dict(self.missing),
                "kill": "freezer"}


# === the delegated parent =====================================================================


def default_user() -> str:
    """The daemon's user name: the default parent is ``sandboxd/<user>``."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def hierarchies(v1_root: str, fs: Fs) -> dict[str, str]:
    """controller -> its mounted v1 hierarchy (co-mounted ones share a realpath)."""
    out: dict[str, str] = {}
    for ctrl in CONTROLLERS:
        h = os.path.join(v1_root, ctrl)
        # a v1 hierarchy has cgroup.procs but no cgroup.controllers
        if fs.exists(os.path.join(h, "cgroup.procs")) and not fs.exists(
                os.path.join(h, "cgroup.controllers")):
            out[ctrl] = os.path.realpath(h)
    return out


def status(v1_root: str, parent: str | None, user: str | None,
           fs: Fs) -> tuple[str, dict[str, str], set[str], dict[str, str]]:
    """(parent, hierarchies, controllers we can write, controller -> why not)."""
    hier = hierarchies(v1_root, fs)
    rel = (parent if parent is not None else f"sandboxd/{user or default_user()}").strip("/")
    have: set[str] = set()
    missing: dict[str, str] = {}
    for ctrl in CONTROLLERS:
        if ctrl not in hier:
            missing[ctrl] = "hierarchy not mounted"
            continue
        d = join(hier[ctrl], rel)
        if not fs.isdir(d):
            missing[ctrl] = f"{d} missing (run sandboxctl setup)"
        elif not (fs.access(d, os.W_OK | os.X_OK)
                  and fs.access(os.path.join(d, "cgroup.procs"), os.W_OK)):
            missing[ctrl] = f"{d} not writable by uid {os.geteuid()}"
        else:
            have.add(ctrl)
    return rel, hier, have, missing


def probe(v1_root: str, parent: str | None, user: str | None, fs: Fs) -> V1Backend | str:
    """A v1 backend over the delegated parent, or why there is none (no freezer: no kill)."""
    rel, hier, have, missing = status(v1_root, parent, user, fs)
    if not hier:
        return f"no cgroup v1 hierarchies under {v1_root}"
    if "freezer" not in have:
        return f"v1 freezer unusable: {missing.get('freezer')}"
    return V1Backend(v1_root, rel, hier, have, fs=fs, missing=missing)
