"""The one limits table: wire name -> kernel limit -> cgroup controller -> how it is enforced.

Rooms (:mod:`sandboxd.rooms`), runs (:mod:`sandboxd.runs`), the code-run service, ``ping``'s
capabilities (``Daemon.enforceable_limits``), the cgroup backends and ``sandboxctl doctor`` all
read this table; none of them keeps its own list of limit names.

Stdlib only and import-cheap: the cgroup package (which the room init imports for ``enter()``)
reads it.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass


class Enforcement(enum.Enum):
    """How a limit is enforced, which decides whether a host can enforce it."""

    CONTROLLER = "cgroup controller"  # a limit file of one controller; needs that controller
    ACCOUNTING = "cgroup accounting"  # the daemon polls a run cgroup's counter and kills it
    RLIMIT = "rlimit"  # setrlimit in the payload before exec: everywhere
    DAEMON = "daemon"  # the daemon counts or times and kills: everywhere
    TMPFS = "tmpfs"  # the room's tmpfs size: everywhere


class Scope(enum.Flag):
    ROOM = enum.auto()  # options.limits of getSandbox
    RUN = enum.auto()  # limits of exec / runCode


@dataclass(frozen=True)
class Limit:
    wire: str  # the camelCase name in options.limits / exec limits and in LIMIT_UNAVAILABLE
    kernel: str  # what the kernel is told (v2 / v1)
    controller: str | None  # the cgroup controller it needs (CONTROLLER only)
    enforcement: Enforcement
    scope: Scope
    # The backend's short name (doctor lines "limit memory enforceable", RoomCgroup.enforced).
    cgroup_name: str | None = None
    cost: str = ""  # what a room loses when this host cannot enforce it


LIMITS: tuple[Limit, ...] = (
    Limit("memoryBytes", "memory.max + memory.swap.max=0 / memory.limit_in_bytes + memsw",
          "memory", Enforcement.CONTROLLER, Scope.ROOM | Scope.RUN, "memory",
          "no memory limit, no peak-memory figure and no OOM verdict"),
    Limit("cpus", "cpu.max / cpu.cfs_quota_us (period 100 ms)", "cpu", Enforcement.CONTROLLER,
          Scope.ROOM, "cpus", "no cpus (bandwidth) limit"),
    Limit("pids", "pids.max", "pids", Enforcement.CONTROLLER, Scope.ROOM | Scope.RUN, "pids",
          "no process-count limit: fork bombs are stopped only by RLIMIT_NPROC (per host uid)"),
    Limit("cpuTimeMs", "cpu.stat usage_usec / cpuacct.usage, polled every <=50 ms", None,
          Enforcement.ACCOUNTING, Scope.RUN),
    Limit("wallTimeMs", "a daemon timer kills the run's cgroup", None, Enforcement.DAEMON,
          Scope.RUN),
    Limit("outputBytes", "the daemon counts stdout+stderr and kills the run", None,
          Enforcement.DAEMON, Scope.RUN),
    Limit("fileSizeBytes", "RLIMIT_FSIZE", None, Enforcement.RLIMIT, Scope.RUN),
    Limit("diskBytes", "size= of the room's tmpfs", None, Enforcement.TMPFS, Scope.ROOM),
)

BY_WIRE: dict[str, Limit] = {lim.wire: lim for lim in LIMITS}

#: The limits a cgroup backend enforces with a controller, by the backend's short name.
CGROUP_LIMITS: tuple[Limit, ...] = tuple(
    lim for lim in LIMITS if lim.enforcement is Enforcement.CONTROLLER)


def cgroup_enforceable(controllers: Collection[str]) -> set[str]:
    """Short names (``memory``, ``cpus``, ``pids``) of the controller limits ``controllers``
    can enforce."""
    return {lim.cgroup_name for lim in CGROUP_LIMITS
            if lim.cgroup_name is not None and lim.controller in controllers}


def enforceable(controllers: Collection[str], accounting: bool) -> set[str]:
    """Wire names of every limit a host with these enabled ``controllers`` enforces;
    ``accounting`` says whether runs get their own cgroup counters (any cgroup hierarchy)."""
    out: set[str] = set()
    for lim in LIMITS:
        if lim.enforcement is Enforcement.CONTROLLER:
            if lim.controller in controllers:
                out.add(lim.wire)
        elif lim.enforcement is Enforcement.ACCOUNTING:
            if accounting:
                out.add(lim.wire)
        else:
            out.add(lim.wire)
    return out


def first_unenforceable(requested: Iterable[str], can: Collection[str],
                        scope: Scope) -> Limit | None:
    """The first (by wire name) of ``requested`` limits of ``scope`` whose enforcement needs a
    cgroup and is not in ``can`` (wire names); other and unknown names never fail here."""
    for name in sorted(requested):
        lim = BY_WIRE.get(name)
        if lim is None or not lim.scope & scope or lim.enforcement not in (
                Enforcement.CONTROLLER, Enforcement.ACCOUNTING):
            continue
        if name not in can:
            return lim
    return None
