"""The machinery every backend shares: rooms and runs as directories, one per hierarchy.

A logical cgroup is a :class:`Node` (v2: one directory; v1: one per controller hierarchy;
disabled: none). :class:`Room`, :class:`Run` and :class:`TreeBackend` implement the interface
over nodes; what differs between kernel interfaces is an :class:`Ops` (v2.py, v1.py,
disabled.py). The layout (package docstring)::

    <base>/room-<id>                cpu and pids limits of the room
    <base>/room-<id>/init           the room init
    <base>/room-<id>/runs           the room's memory limit
    <base>/room-<id>/runs/run-<r>   one run
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import time

from ...config import RoomLimits
from ...errors import InternalError, LimitUnavailable, ValidationError
from .fs import Fs
from .interface import CgroupBackend, CgroupStats, RoomCgroup, RunCgroup, RunCgroupLimits

CPU_PERIOD_US = 100_000
ROOM_PREFIX = "room-"
RUN_PREFIX = "run-"
INIT_LEAF = "init"
RUNS_LEAF = "runs"
KILL_WAIT_S = 2.0
FREEZE_WAIT_S = 1.0
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValidationError(f"invalid {kind} id for a cgroup name", **{kind: repr(value)[:80]})
    return value


def write_limit(fs: Fs, path: str, value: str, limit: str) -> None:
    try:
        fs.write(path, value)
    except InternalError as err:
        raise LimitUnavailable(f"cannot apply the {limit} limit: {err.message}", limit=limit,
                               path=path) from err


def cpu_quota(cpus: float) -> int:
    return max(1000, round(cpus * CPU_PERIOD_US))  # the kernel refuses quotas below 1 ms


class Node:
    """One logical cgroup: a directory in each hierarchy (v2: exactly one; disabled: none)."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths  # controller (or "unified") -> directory

    def dirs(self) -> list[str]:
        return list(dict.fromkeys(self.paths.values()))

    def child(self, name: str) -> Node:
        return Node({k: os.path.join(v, name) for k, v in self.paths.items()})

    @property
    def path(self) -> str:
        dirs = self.dirs()
        return dirs[0] if dirs else ""


class Ops(abc.ABC):
    """What differs between backends, on one Node; the shared walking, waiting and removing
    are here."""

    #: v1: a joining process opens cgroup.procs itself (its euid must match the mover's);
    #: v2: the daemon opens it (common-ancestor and namespace checks use the opener).
    child_opens_procs = False
    #: Whether the cgroups keep figures (every backend with a hierarchy).
    accounting = True
    backend = ""

    def __init__(self, fs: Fs, controllers: frozenset[str]) -> None:
        self.fs = fs
        self.controllers = controllers

    @abc.abstractmethod
    def write_room_limits(self, node: Node, limits: RoomLimits, enforce: set[str]) -> None:
        """Write the limits named in ``enforce`` (short names) from ``limits`` on ``node``."""

    @abc.abstractmethod
    def write_run_limits(self, node: Node, limits: RunCgroupLimits) -> None: ...

    @abc.abstractmethod
    def prepare_room(self, node: Node) -> None:
        """A node whose children carry limits of their own (v2: subtree_control)."""

    @abc.abstractmethod
    def prepare_run(self, node: Node) -> None:
        """A node a payload (or the init) joins (v1: cgroup.procs it may open)."""

    @abc.abstractmethod
    def cpu_usage_ns(self, node: Node) -> int: ...

    @abc.abstractmethod
    def stats(self, node: Node) -> CgroupStats: ...

    @abc.abstractmethod
    def oom_kills(self, node: Node) -> int: ...

    @abc.abstractmethod
    def kill(self, node: Node) -> None: ...

    @abc.abstractmethod
    def populated(self, node: Node) -> bool: ...

    def freeze(self, node: Node, frozen: bool) -> bool:
        """Freeze or thaw ``node``'s subtree (bounded wait); False: this backend cannot."""
        return False

    @abc.abstractmethod
    def join_fds(self, node: Node) -> list[int]:
        """Daemon-opened fds a child joins ``node`` by; [] means its directory fds."""

    # -- shared -----------------------------------------------------------------------------

    def check_run_limits(self, limits: RunCgroupLimits) -> None:
        """Fail closed: a run limit whose controller this backend does not have."""
        for value, ctrl, name in ((limits.memory_bytes, "memory", "memory"),
                                  (limits.pids, "pids", "pids")):
            if value is not None and ctrl not in self.controllers:
                raise LimitUnavailable(f"run {name} limit needs the {ctrl} controller",
                                       limit=name, backend=self.backend)

    def signal(self, node: Node, sig: int) -> int:
        """``sig`` to every process of the subtree, each pinned by a pidfd first and signalled
        only if it is still listed after that: a pid that exited and was reused by a process
        elsewhere on the host between the read and the kill is never signalled."""
        return self.fs.signal_members(lambda: self.pids(node), sig)

    def pids(self, node: Node) -> set[int]:
        """Every pid in the subtree, in every hierarchy."""
        out: set[int] = set()
        for top in node.dirs():
            for d in self.walk(top):
                text = self.fs.read_opt(os.path.join(d, "cgroup.procs")) or ""
                out.update(int(x) for x in text.split() if x.isdigit())
        return out

    def walk(self, top: str) -> list[str]:
        """top and its descendant cgroups, parents first."""
        out = [top]
        for name in self.fs.listdirs(top):
            out.extend(self.walk(os.path.join(top, name)))
        return out

    def mkdir(self, node: Node, mode: int = 0o755) -> None:
        for d in node.dirs():
            if not self.fs.mkdir(d, mode):
                raise InternalError(f"cgroup {d} already exists", path=d)

    def wait_empty(self, node: Node, timeout: float | None = None) -> bool:
        deadline = time.monotonic() + (KILL_WAIT_S if timeout is None else timeout)
        delay = 0.0005
        while self.populated(node):
            if time.monotonic() >= deadline:
                return False
            self.fs.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def rmtree(self, node: Node) -> None:
        """rmdir every directory of the subtree, children first; raise naming the first failure."""
        failed: list[tuple[str, OSError]] = []
        for top in node.dirs():
            for d in reversed(self.walk(top)):
                try:
                    self.fs.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as err:
                    failed.append((d, err))
        if failed:
            first, first_err = failed[0]
            raise InternalError(f"rmdir {first}: {first_err.strerror}", path=first,
                                errno=first_err.errno, failed=[p for p, _ in failed])

    def destroy(self, node: Node) -> None:
        if not any(self.fs.isdir(d) for d in node.dirs()):
            return
        if not self.populated(node):
            # Fast path (the common case: the room init already exited). If something joins
            # meanwhile, rmdir says EBUSY and the kill path below takes over.
            with contextlib.suppress(InternalError):
                self.rmtree(node)
                return
        self.kill(node)
        if not self.wait_empty(node):
            self.kill(node)  # one more round: something raced the first one
            if not self.wait_empty(node):
                left = sorted(self.pids(node))
                raise InternalError(f"cgroup {node.path} still populated after kill",
                                    path=node.path, pids=left[:20])
        self.rmtree(node)


class Run(RunCgroup):
    def __init__(self, ops: Ops, node: Node, run_id: str, room: Room | None = None) -> None:
        self.ops = ops
        self.node = node
        self.run_id = run_id
        self.path = node.path
        self._dir_fds: list[int] = []
        self._join_fds: list[int] = []
        self._room = room

    def dir_fds(self) -> list[int]:
        if not self._dir_fds:
            # One at a time into the list close() empties: an EMFILE on the second hierarchy
            # must not leak the first one's fd (issue 10, H5).
            for d in self.node.dirs():
                self._dir_fds.append(self.ops.fs.open_dir(d))
        return list(self._dir_fds)

    def join_fds(self) -> list[int]:
        if not self._join_fds:
            self._join_fds = self.ops.join_fds(self.node) or self.dir_fds()
        return list(self._join_fds)

    def stats(self) -> CgroupStats:
        return self.ops.stats(self.node)

    def cpu_usage_ns(self) -> int:
        return self.ops.cpu_usage_ns(self.node)

    def oom_killed(self) -> bool:
        return self.ops.oom_kills(self.node) > 0

    def kill(self) -> None:
        self.ops.kill(self.node)

    def signal(self, sig: int) -> int:
        return self.ops.signal(self.node, sig)

    def freeze(self, frozen: bool) -> bool:
        return self.ops.freeze(self.node, frozen)

    def close(self) -> None:
        for fd in {*self._dir_fds, *self._join_fds}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dir_fds, self._join_fds = [], []

    def destroy(self) -> None:
        self.close()
        self.ops.destroy(self.node)
        if self._room is not None:
            self._room.forget(self.run_id)
            self._room = None


class Room(RoomCgroup):
    def __init__(self, ops: Ops, node: Node, room_id: str, enforced: frozenset[str]) -> None:
        self.ops = ops
        self.node = node
        self.room_id = room_id
        self.enforced = enforced
        self.accounting = ops.accounting
        self.path = node.path
        self._runs: dict[str, Run] = {}

    def procs_paths(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.node.child(INIT_LEAF).dirs()]

    @property
    def joined_by_dir(self) -> bool:
        return self.ops.child_opens_procs

    def create_run(self, run_id: str, limits: RunCgroupLimits | None = None) -> RunCgroup:
        node = self.node.child(RUNS_LEAF).child(RUN_PREFIX + check_name("run", run_id))
        if limits is not None:
            self.ops.check_run_limits(limits)
        self.ops.mkdir(node)
        run = Run(self.ops, node, run_id)
        try:
            self.ops.prepare_run(node)
            if limits is not None:
                self.ops.write_run_limits(node, limits)
        except BaseException:
            with contextlib.suppress(Exception):
                run.destroy()
            raise
        run._room = self
        self._runs[run_id] = run
        return run

    def forget(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def live_runs(self) -> list[RunCgroup]:
        return list(self._runs.values())

    def stats(self) -> CgroupStats:
        return self.ops.stats(self.node)

    def runs_stats(self) -> CgroupStats:
        return self.ops.stats(self.node.child(RUNS_LEAF))

    def kill(self) -> None:
        self.ops.kill(self.node)

    def destroy(self) -> None:
        for run in self._runs.values():
            run.close()
        self._runs.clear()
        self.ops.destroy(self.node)


class TreeBackend(CgroupBackend):
    """Rooms are directories room-<id> under one parent (``base``) per hierarchy."""

    ops: Ops
    base: Node

    def create_room(self, room_id: str, limits: RoomLimits) -> RoomCgroup:
        node = self.base.child(ROOM_PREFIX + check_name("room", room_id))
        enforce = self.enforceable()
        # 0700: on v1 the run cgroups' cgroup.procs are world-writable (see "Joining a run"), so
        # nobody but the daemon may reach them by path.
        self.ops.mkdir(node, 0o700)
        try:
            # CPU and processes are the room's as a whole, init included; memory is the runs'
            # only (package docstring, "Why the memory limit sits on runs": a room-wide OOM must
            # never be able to pick the init).
            self.ops.write_room_limits(node, limits, enforce - {"memory"})
            self.ops.prepare_room(node)
            self.ops.mkdir(node.child(INIT_LEAF))
            # The room init steps into run cgroups and back (init._spawn_fast), so its own leaf
            # is joined the way runs are.
            self.ops.prepare_run(node.child(INIT_LEAF))
            runs = node.child(RUNS_LEAF)
            self.ops.mkdir(runs)
            self.ops.write_room_limits(runs, limits, enforce & {"memory"})
            self.ops.prepare_room(runs)
        except BaseException:
            with contextlib.suppress(Exception):
                self.ops.destroy(node)
            raise
        return Room(self.ops, node, room_id, frozenset(enforce))

    def reconcile(self, live_room_ids: set[str]) -> list[str]:
        found: set[str] = set()
        for top in self.base.dirs():
            for name in self.ops.fs.listdirs(top):
                if name.startswith(ROOM_PREFIX) and NAME_RE.fullmatch(name[len(ROOM_PREFIX):]):
                    found.add(name[len(ROOM_PREFIX):])
        removed = []
        for room_id in sorted(found - set(live_room_ids)):
            self.ops.destroy(self.base.child(ROOM_PREFIX + room_id))
            removed.append(room_id)
        return removed
