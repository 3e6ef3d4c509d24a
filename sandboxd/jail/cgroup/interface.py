"""The cgroup contract: what rooms, runs, the daemon and the API see of any backend.

These ABCs are the only types the rest of sandboxd names (``Room.cgroup: RoomCgroup``,
``RoomManager(backend: CgroupBackend)``); v1, v2 and disabled implement them with the shared
machinery of tree.py. Which processes live in which cgroup is drawn in the package docstring.
"""

from __future__ import annotations

import abc
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ... import limits as limits_table
from ...config import RoomLimits
from ...errors import LimitUnavailable

__all__ = ["CgroupBackend", "CgroupStats", "RoomCgroup", "RunCgroup", "RunCgroupLimits"]


@dataclass(frozen=True)
class RunCgroupLimits:
    """Limits of one run (a child cgroup of the room's runs); None leaves the room's in charge."""

    memory_bytes: int | None = None
    pids: int | None = None


@dataclass(frozen=True)
class CgroupStats:
    """Figures of one cgroup subtree; None where the kernel (or the backend) cannot tell."""

    cpu_usage_ns: int = 0
    memory_peak_bytes: int | None = None
    pids_current: int = 0
    pids_peak: int | None = None
    oom_kills: int = 0
    pids_limit_hits: int = 0  # forks refused by this cgroup's own pids.max (pids.events "max")
    memory_current_bytes: int | None = None


class RunCgroup(abc.ABC):
    """One run: a child cgroup of the room's ``runs``, made for one program and removed after."""

    #: Its directory (the first hierarchy's on v1); "" when there is none (disabled).
    path: str

    @abc.abstractmethod
    def dir_fds(self) -> list[int]:
        """O_DIRECTORY fds, one per hierarchy, owned by this object (closed by destroy())."""

    @abc.abstractmethod
    def join_fds(self) -> list[int]:
        """What the payload child joins the run by: passed to the room init with SCM_RIGHTS, and
        the child calls ``cgroup.enter(fds)`` before exec (the room cannot see /sys/fs/cgroup).
        v2: cgroup.procs opened by the daemon; v1: the directory fds (package docstring,
        "Joining a run")."""

    @abc.abstractmethod
    def stats(self) -> CgroupStats: ...

    @abc.abstractmethod
    def cpu_usage_ns(self) -> int:
        """Cheap: polled every <= 50 ms for CPU-time limits."""

    @abc.abstractmethod
    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of this run (memory.events oom_kill /
        memory.oom_control oom_kill): the ML verdict, never guessed from exit 137."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every process of the run, stopped and forking ones included."""

    @abc.abstractmethod
    def signal(self, sig: int) -> int:
        """Send ``sig`` (and then SIGCONT, so that stopped processes act on it) to every process
        of the run; how many got it. Best effort against a forking run: ``kill`` is the sure
        way (``killProcess`` sends its signal, then kills what is left)."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """kill, wait (bounded) until empty, close the fds, remove the directories."""

    def freeze(self, frozen: bool) -> bool:
        """Freeze (or thaw) every process of the run, waiting (bounded) until the kernel says it
        is frozen; False when this backend cannot (no hierarchy). ``persistence``: a backup
        copies a room whose other runs are frozen."""
        return False


class RoomCgroup(abc.ABC):
    """One room: its cgroup, the init's leaf and the runs' parent."""

    room_id: str
    #: The room's directory (the first hierarchy's on v1); "" when there is none.
    path: str
    #: Short names (``memory``, ``cpus``, ``pids``) of the limits actually written for it.
    enforced: frozenset[str]
    #: Whether its cgroups keep figures (CPU time, processes); False without a hierarchy.
    accounting: bool

    @abc.abstractmethod
    def procs_paths(self) -> list[str]:
        """Host paths of the init leaf's cgroup.procs files: the zygote's child joins the room
        by writing "0" to each, before it unshares (afterwards the cgroup namespace would root
        it where it is)."""

    @property
    @abc.abstractmethod
    def joined_by_dir(self) -> bool:
        """How a process of the room (possibly a subordinate uid) rejoins the init leaf: through
        directory fds it opens cgroup.procs from (v1), or daemon-opened cgroup.procs fds (v2)."""

    @abc.abstractmethod
    def create_run(self, run_id: str, limits: RunCgroupLimits | None = None) -> RunCgroup:
        """A new run cgroup under ``runs`` with its limits written (fail closed:
        LimitUnavailable names a limit this backend cannot apply)."""

    @abc.abstractmethod
    def stats(self) -> CgroupStats:
        """The whole room: the init and every run."""

    def live_runs(self) -> list[RunCgroup]:
        """The run cgroups this room made and has not destroyed yet."""
        return []

    @abc.abstractmethod
    def runs_stats(self) -> CgroupStats:
        """The runs only: what counts against the room's memory limit."""

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL every process of the room, stopped ones included."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """kill, wait (bounded) until empty, rmdir everything (children first)."""


class CgroupBackend(abc.ABC):
    """A way of giving rooms cgroups: ``detect()`` picks one at start-up."""

    name: str = ""  # "v2" | "v1" | "disabled"
    #: Controllers it checked it can write: a subset of {"memory", "pids", "cpu", ...}.
    controllers: frozenset[str] = frozenset()
    #: Whether runs get cgroup counters of their own (CPU time): every backend with a hierarchy.
    accounting: bool = True

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """For ping.capabilities and doctor: backend, root path(s), controllers, what is missing
        and why."""

    def enforceable(self) -> set[str]:
        """Short names (``memory``, ``cpus``, ``pids``) of the room limits written to cgroups."""
        return limits_table.cgroup_enforceable(self.controllers)

    def enforceable_wire(self) -> set[str]:
        """Wire names of every limit (rooms and runs) a daemon on this backend enforces."""
        return limits_table.enforceable(self.controllers, self.accounting)

    def check_limits(self, limits: RoomLimits, requested: Collection[str] | None = None) -> None:
        """Fail closed: raise LimitUnavailable for the first (by name) of the room limits the
        client asked for (wire names; None: all of them) that this backend cannot enforce."""
        del limits  # every value RoomLimits accepts is writable; only the controller matters
        if requested is None:
            requested = [lim.wire for lim in limits_table.CGROUP_LIMITS]
        lim = limits_table.first_unenforceable(requested, self.enforceable_wire(),
                                               limits_table.Scope.ROOM)
        if lim is not None:
            raise LimitUnavailable(
                f"limit {lim.wire} cannot be enforced here (cgroup backend "
                f"{self.name} cannot enforce {lim.cgroup_name})", limit=lim.wire)

    def bootstrap(self) -> list[str]:
        """Daemon start-up step, after detect() and before the zygote starts (human lines);
        only v2 has work to do, and a v2 backend refuses create_room() until it ran."""
        return []

    def release(self) -> None:  # noqa: B027 - a hook with nothing to do for most backends
        """Daemon shutdown step, after every room is gone; only v1 instances have work."""

    @abc.abstractmethod
    def create_room(self, room_id: str, limits: RoomLimits) -> RoomCgroup:
        """Create the room's cgroups and write its limits (fail closed)."""

    @abc.abstractmethod
    def reconcile(self, live_room_ids: set[str]) -> list[str]:
        """Kill and remove the cgroups of rooms not in the set (a crash's leftovers); return
        their ids."""
