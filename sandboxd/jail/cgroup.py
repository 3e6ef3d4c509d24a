"""cgroup backends behind one interface: v2 (delegated), v1 (hybrid hosts), disabled.

INTERFACE CONTRACT (the rest of sandboxd codes against exactly this; keep it stable):

    backend = detect(config_backend="auto", parent=None, v1_root="/sys/fs/cgroup",
                     v2_root=None, proc_root="/proc")           -> CgroupBackend
    backend.name            "v2" | "v1" | "disabled"
    backend.controllers     frozenset of controllers we can enforce: {"cpu","memory","pids",...}
    backend.describe()      dict for ping.capabilities / doctor (backend, root path(s),
                            controllers, what is missing and why)
    backend.check_limits(limits: RoomLimits) -> None
                            raise errors.LimitUnavailable(limit=...) if a limit cannot be enforced
    backend.create_room(room_id: str, limits: RoomLimits) -> RoomCgroup
                            creates the room's cgroup(s) and writes the limits (fail closed)
    backend.reconcile(live_room_ids: set[str]) -> list[str]
                            kills and removes cgroups of rooms not in the set (crash leftovers)

    RoomCgroup.procs_paths() -> list[str]
                            host paths of cgroup.procs files; a process joins the room by
                            writing "0" to each (the zygote's child does this before unshare)
    RoomCgroup.create_run(run_id: str, limits: RunCgroupLimits | None) -> RunCgroup
    RoomCgroup.stats() -> CgroupStats        the whole room (init and runs)
    RoomCgroup.runs_stats() -> CgroupStats   the runs only: what counts against memoryBytes
    RoomCgroup.kill() -> None        SIGKILL every process, including stopped ones
    RoomCgroup.destroy() -> None     kill, wait until empty (bounded), rmdir everything

    RunCgroup.dir_fds() -> list[int]
                            O_DIRECTORY fds (one per hierarchy), owned by the RunCgroup; they are
                            passed to the room init by SCM_RIGHTS, and the payload child joins the
                            run by openat(fd, "cgroup.procs", O_WRONLY) + write("0") before exec
                            (the room cannot see /sys/fs/cgroup)
    RunCgroup.stats() -> CgroupStats
    RunCgroup.cpu_usage_ns() -> int  cheap; polled every <=50 ms for CPU-time limits
    RunCgroup.oom_killed() -> bool   from memory.events oom_kill (v2) / memory.oom_control (v1)
    RunCgroup.kill() -> None         v2: cgroup.kill; v1: freezer FROZEN, SIGKILL all, THAWED
    RunCgroup.destroy() -> None      kill, wait until empty (bounded), close fds, rmdir

    CgroupStats: cpu_usage_ns, memory_peak_bytes (None if unknown), pids_current, pids_peak
                 (None if unknown), oom_kills

The disabled backend implements the same interface and returns no fds / empty stats; callers
never write ``if cgroups_enabled``.

ADDITIONS (compatible with the contract):

    detect(..., *, user=None, fs=None)       user names the v1 parent; fs is the test seam
    backend.enforceable() -> set[str]        subset of {"memory", "cpus", "pids"}
    backend.check_limits(limits, requested=None)
                            only the limit names in ``requested`` are checked (None: all three);
                            the caller passes the limits the client asked for explicitly
    RoomCgroup.enforced     frozenset of limit names actually written for this room
    RunCgroup.join_fds() -> list[int]
                            what the payload child should use instead of dir_fds(): pass them
                            with SCM_RIGHTS and call enter(fds) in the child before exec (see
                            "Joining a run" below for why v2 and v1 differ)
    enter(fds)                                child side: join the cgroup(s) behind join_fds()
    backend.bootstrap() -> list[str]          daemon start-up, after detect(), before the zygote:
                                              v2 moves the daemon into <own>/supervisor (if
                                              systemd did not) and enables memory/pids/cpu; a
                                              v2 backend refuses create_room() until then
    bootstrap(...) -> list[str]               the same as a function, usable before detect()
    delegate(user, uid, gid, ...) -> list[str]   `sandboxctl setup --user USER` (root, once)
    doctor_report(...) -> list[tuple[str, bool, str]]   `sandboxctl doctor`

THEORY OF OPERATION

Where the cgroups live.

    v2  (pure v2 at /sys/fs/cgroup, or the cgroup2 mount at /sys/fs/cgroup/unified on hybrid
        hosts). The delegated subtree is the daemon's own cgroup (``0::<own>`` in
        /proc/self/cgroup). Because of the "no internal processes" rule the daemon must sit in a
        leaf: systemd >= 254 puts it in ``<own>/supervisor`` (``DelegateSubgroup=supervisor``);
        otherwise detect() returns a v2 backend with ``pending_move`` and its bootstrap() moves
        the daemon there; either way bootstrap() enables memory/pids/cpu in the subtree's
        ``cgroup.subtree_control``. Rooms are siblings of the supervisor::

            <own>/supervisor                  daemon, zygote
            <own>/room-<id>                   the room's cpu.max and pids.max (init included);
                                              subtree_control +memory +pids
            <own>/room-<id>/init              the room init and its helpers (procs_paths()); no
                                              memory limit of its own
            <own>/room-<id>/runs              the room's memory limit (memory.max,
                                              memory.swap.max=0); subtree_control +memory +pids
            <own>/room-<id>/runs/run-<run>    one payload run (its own memory.max / pids.max)

        ``init`` exists because a v2 cgroup with controllers enabled for its children may not hold
        processes itself; run cgroups need memory/pids enabled to carry their own limits.
    v1  (hybrid hosts): one directory per controller hierarchy (memory, pids, cpu, cpuacct,
        freezer; co-mounted hierarchies such as cpu,cpuacct are written once), under a parent that
        ``sandboxctl setup`` created and chowned to the daemon's user (default
        ``sandboxd/<user>``), the same tree in each::

            <v1_root>/<ctrl>/<parent>/room-<id>[/init | /runs[/run-<run>]]

        (memory.limit_in_bytes = memory.memsw.limit_in_bytes on runs, cpu and pids on room-<id>)

Why the memory limit sits on ``runs``, not on the room (issue 10, L4). The kernel's OOM killer
picks its victim among every task of the cgroup whose limit was hit, by size and oom_score_adj.
The init raises its children's score, but any process may lower its own back to 0 (its
oom_score_adj_min) and the init cannot go below 0 without CAP_SYS_RESOURCE in the initial
namespace: a room of small processes whose memory is in tmpfs or /dev/shm pages (attributed to
no process) made the ~30 MB init the biggest task, and the room died with it. With the limit on
``runs`` the init is outside every cgroup a payload can fill, so no OOM a payload causes can
choose it: a run's OOM picks among the run's processes (its own limit), a room-wide one among
all runs' processes. What each cgroup is charged with:

    runs        every payload's memory, and the tmpfs/shm pages payloads wrote: a page stays
                charged to the cgroup that first wrote it, and the pages of a removed run
                cgroup keep counting against ``runs``
    init        the init's own memory (~6 MiB charged, ~30 MiB resident) and the pages the file
                API writes (the init writes them, issue 10 H4): bounded by the room's tmpfs sizes
                (diskBytes, /dev/shm), and writeFile refuses up front what would not fit in
                memoryBytes next to what the room already holds (roomfiles._check_headroom)

so a room can hold up to memoryBytes in its runs plus what the file API stored; no limit on the
init means no OOM kill of the init either. While the init stands in a run cgroup (the fast
spawn path, between joining and posix_spawn's return) it is inside ``runs``: the daemon takes
the fork path instead when ``runs`` is near its limit or another run is live
(runs.init_may_stand_in).

    disabled: nothing on disk; rlimits and wall-clock kills of the room's pid-namespace init are
        the only fences (doctor and ping say so).

Killing. v2 writes "1" to ``cgroup.kill`` (kernel >= 5.14; older kernels: cgroup.freeze, SIGKILL
each pid, unfreeze). v1 has no kill file, and a plain "read cgroup.procs, kill each pid" loop races
with fork and misses nothing only if nothing can fork meanwhile, so: freezer.state=FROZEN, wait
until it reads FROZEN, SIGKILL every pid of the subtree in every hierarchy, THAWED (the kill is
delivered on thaw). That covers stopped processes (``kill -STOP 0`` froze Piston's executor,
piston #196), setsid'd and double-forked ones (sandbox-sdk #338). destroy() then waits (bounded)
until the subtree is empty and removes directories children-first.

Joining a run (why join_fds() exists next to dir_fds()). The kernel checks a cgroup.procs write
with the credentials, and on >= 5.16 the cgroup namespace, *of whoever opened the file*
(CVE-2021-4197 fix):

    v2  the writer must be allowed to write cgroup.procs of the common ancestor (room-<id>), and
        with ``nsdelegate`` (systemd mounts it so) source and destination must lie inside the
        opener's cgroup namespace. A payload child that opens the file itself has a subordinate
        uid and a cgroup namespace rooted at room-<id>/init, so both checks fail. join_fds() are
        therefore cgroup.procs files opened O_WRONLY *by the daemon*; the child only writes "0".
    v1  the opener's euid must be root or equal to the moved task's uid, so a daemon-opened file
        cannot move a payload running as a subordinate uid. The child must open the file itself:
        join_fds() are the directory fds, run-<run>/cgroup.procs is mode 0666 and room-<id> is mode
        0700, so only holders of the directory fd (the room init) can reach the file.

Names come only from room and run ids that match ``[A-Za-z0-9_-]{1,63}`` (checked again here).
Every OSError is translated at this edge into errors.InternalError (or LimitUnavailable when a
limit file cannot be written) naming the path. All roots are parameters and all filesystem
mutations go through ``Fs`` so tests run on a fake cgroupfs tree.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import pwd
import re
import signal
import stat
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import limits as limits_table
from ..config import RoomLimits
from ..errors import InternalError, LimitUnavailable, SandboxError, ValidationError

__all__ = [
    "CgroupBackend",
    "CgroupStats",
    "DisabledBackend",
    "Fs",
    "RoomCgroup",
    "RunCgroup",
    "RunCgroupLimits",
    "V1Backend",
    "V2Backend",
    "bootstrap",
    "delegate",
    "detect",
    "doctor_report",
    "enter",
    "unattached",
]

V2_CONTROLLERS = ("memory", "pids", "cpu")
V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "freezer")
CPU_PERIOD_US = 100_000
SUPERVISOR = "supervisor"
ROOM_PREFIX = "room-"
RUN_PREFIX = "run-"
INIT_LEAF = "init"
RUNS_LEAF = "runs"
KILL_WAIT_S = 2.0
FREEZE_WAIT_S = 1.0
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")

#: What a room loses without each controller (the limit controllers' costs are the table's).
_COST = {
    **{lim.controller: lim.cost for lim in limits_table.CGROUP_LIMITS if lim.controller},
    "cpuacct": "no CPU-time figure: CPU-time limits fall back to RLIMIT_CPU per process",
    "freezer": "v1 cannot kill a room reliably (stopped/forking processes): v1 backend unusable",
}


@dataclass(frozen=True)
class RunCgroupLimits:
    """Limits of one run (a child cgroup of the room); None leaves the room's limit in charge."""

    memory_bytes: int | None = None
    pids: int | None = None


@dataclass(frozen=True)
class CgroupStats:
    cpu_usage_ns: int = 0
    memory_peak_bytes: int | None = None
    pids_current: int = 0
    pids_peak: int | None = None
    oom_kills: int = 0
    pids_limit_hits: int = 0  # forks refused by this cgroup's own pids.max (pids.events "max")
    memory_current_bytes: int | None = None


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValidationError(f"invalid {kind} id for a cgroup name", **{kind: repr(value)[:80]})
    return value


# === filesystem seam =============================================================================


class Fs:
    """Every cgroupfs access. Tests subclass it to emulate the kernel on a tmp tree."""

    def read(self, path: str) -> str:
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read()
        except OSError as err:
            raise InternalError(f"cannot read {path}: {err.strerror}", path=path,
                                errno=err.errno) from err

    def read_opt(self, path: str) -> str | None:
        """Read a file the kernel may not provide (memory.peak, pids.peak...)."""
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise InternalError(f"cannot read {path}: {err.strerror}", path=path,
                                errno=err.errno) from err

    def write(self, path: str, value: str) -> None:
        # O_TRUNC: a no-op on cgroupfs, needed on the fake tree. No O_CREAT: a missing
        # interface file is an error, never a new regular file.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            try:
                os.write(fd, value.encode())
            finally:
                os.close(fd)
        except OSError as err:
            raise InternalError(f"cannot write {value!r} to {path}: {err.strerror}", path=path,
                                errno=err.errno) from err

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def access(self, path: str, mode: int) -> bool:
        return os.access(path, mode)

    def listdirs(self, path: str) -> list[str]:
        try:
            with os.scandir(path) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise InternalError(f"cannot list {path}: {err.strerror}", path=path) from err

    def mkdir(self, path: str, mode: int = 0o755) -> bool:
        """Create a cgroup; False if it already existed."""
        try:
            os.mkdir(path, mode)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            raise InternalError(f"mkdir {path}: {err.strerror}", path=path,
                                errno=err.errno) from err

    def rmdir(self, path: str) -> None:
        os.rmdir(path)  # callers translate: EBUSY means "still populated"

    def chmod(self, path: str, mode: int) -> None:
        try:
            os.chmod(path, mode)
        except OSError as err:
            raise InternalError(f"chmod {mode:o} {path}: {err.strerror}", path=path) from err

    def chown(self, path: str, uid: int, gid: int) -> None:
        try:
            os.chown(path, uid, gid)
        except OSError as err:
            raise InternalError(f"chown {uid}:{gid} {path}: {err.strerror}", path=path) from err

    def open_dir(self, path: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise InternalError(f"open {path}: {err.strerror}", path=path) from err

    def open_procs(self, path: str) -> int:
        try:
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            raise InternalError(f"open {path}: {err.strerror}", path=path) from err

    def kill(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def enter(fds: Sequence[int]) -> None:
    """Child side of joining a run: write "0" through each fd of RunCgroup.join_fds().

    A directory fd (v1) is opened here, with the child's own credentials; a cgroup.procs fd (v2)
    was opened by the daemon and is written as is. Uses os only: safe right after fork().
    """
    for fd in fds:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            procs = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=fd)
            try:
                os.write(procs, b"0")
            finally:
                os.close(procs)
        else:
            os.write(fd, b"0")


def _ints(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _keyed(text: str | None, key: str) -> int | None:
    """A value from a flat keyed file (cpu.stat, memory.events, memory.oom_control)."""
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return _ints(parts[1])
    return None


def _own_cgroup_v2(proc_root: str) -> str | None:
    try:
        with open(os.path.join(proc_root, "self", "cgroup")) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip() or "/"
    except OSError:
        return None
    return None


def _find_v2_root(v1_root: str, v2_root: str | None, fs: Fs) -> str | None:
    if v2_root is not None:
        return v2_root if fs.exists(os.path.join(v2_root, "cgroup.controllers")) else None
    for cand in (v1_root, os.path.join(v1_root, "unified")):
        if fs.exists(os.path.join(cand, "cgroup.controllers")):
            return cand
    return None


def _default_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _join(root: str, rel: str) -> str:
    rel = rel.strip("/")
    return os.path.join(root, rel) if rel else root


# === the interface ===============================================================================


class RunCgroup(abc.ABC):
    path: str

    @abc.abstractmethod
    def dir_fds(self) -> list[int]: ...

    @abc.abstractmethod
    def join_fds(self) -> list[int]: ...

    @abc.abstractmethod
    def stats(self) -> CgroupStats: ...

    @abc.abstractmethod
    def cpu_usage_ns(self) -> int: ...

    @abc.abstractmethod
    def oom_killed(self) -> bool: ...

    @abc.abstractmethod
    def kill(self) -> None: ...

    @abc.abstractmethod
    def destroy(self) -> None: ...


class RoomCgroup(abc.ABC):
    room_id: str
    path: str
    enforced: frozenset[str]

    @abc.abstractmethod
    def procs_paths(self) -> list[str]: ...

    @property
    def joined_by_dir(self) -> bool:
        return False

    @abc.abstractmethod
    def create_run(self, run_id: str, limits: RunCgroupLimits | None = None) -> RunCgroup: ...

    @abc.abstractmethod
    def stats(self) -> CgroupStats: ...

    @abc.abstractmethod
    def runs_stats(self) -> CgroupStats: ...

    @abc.abstractmethod
    def kill(self) -> None: ...

    @abc.abstractmethod
    def destroy(self) -> None: ...


class CgroupBackend(abc.ABC):
    name: str = ""
    controllers: frozenset[str] = frozenset()

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]: ...

    #: Whether runs get cgroup counters of their own (CPU time): every backend with a hierarchy.
    accounting: bool = True

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
        """Daemon start-up step, before the zygote starts; only v2 has work to do."""
        return []

    def release(self) -> None:  # noqa: B027 - a hook with nothing to do for most backends
        """Daemon shutdown step, after every room is gone; only v1 instances have work."""

    @abc.abstractmethod
    def create_room(self, room_id: str, limits: RoomLimits) -> RoomCgroup: ...

    @abc.abstractmethod
    def reconcile(self, live_room_ids: set[str]) -> list[str]: ...


# === disabled ====================================================================================


class _DisabledRun(RunCgroup):
    path = ""

    def dir_fds(self) -> list[int]:
        return []

    def join_fds(self) -> list[int]:
        return []

    def stats(self) -> CgroupStats:
        return CgroupStats()

    def cpu_usage_ns(self) -> int:
        return 0

    def oom_killed(self) -> bool:
        return False

    def kill(self) -> None:
        # Nothing to kill by: the caller's kill of the room's pid-namespace init (PID 1) takes
        # every process of the room with it.
        pass

    def destroy(self) -> None:
        pass


class _DisabledRoom(RoomCgroup):
    path = ""
    enforced: frozenset[str] = frozenset()

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id

    def procs_paths(self) -> list[str]:
        return []

    def create_run(self, run_id: str, limits: RunCgroupLimits | None = None) -> RunCgroup:
        _check_name("run", run_id)
        return _DisabledRun()

    def stats(self) -> CgroupStats:
        return CgroupStats()

    def runs_stats(self) -> CgroupStats:
        return CgroupStats()

    def kill(self) -> None:
        pass

    def destroy(self) -> None:
        pass


def unattached(room_id: str) -> RoomCgroup:
    """What a room has before its cgroup is created (and keeps if creation failed): nothing to
    enforce, count, kill or remove, so callers need no ``if cgroup is None``."""
    return _DisabledRoom(room_id)


class DisabledBackend(CgroupBackend):
    name = "disabled"
    controllers: frozenset[str] = frozenset()
    accounting = False

    def __init__(self, reason: str, tried: dict[str, str] | None = None) -> None:
        self.reason = reason
        self.tried = tried or {}

    def describe(self) -> dict[str, Any]:
        return {"backend": "disabled", "controllers": [], "reason": self.reason,
                "tried": dict(self.tried),
                "missing": sorted(str(lim.cgroup_name) for lim in limits_table.CGROUP_LIMITS),
                "fences": "rlimits and wall-clock kills only"}

    def create_room(self, room_id: str, limits: RoomLimits) -> RoomCgroup:
        return _DisabledRoom(_check_name("room", room_id))

    def reconcile(self, live_room_ids: set[str]) -> list[str]:
        return []


# === shared machinery of v1 and v2 ===============================================================


class _Node:
    """One logical cgroup: a directory in each hierarchy (v2: exactly one)."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.paths = paths  # controller (or "unified") -> directory

    def dirs(self) -> list[str]:
        return list(dict.fromkeys(self.paths.values()))

    def child(self, name: str) -> _Node:
        return _Node({k: os.path.join(v, name) for k, v in self.paths.items()})


class _Ops(abc.ABC):
    """What differs between v1 and v2, on one _Node."""

    #: v1: a joining process opens cgroup.procs itself (its euid must match the mover's);
    #: v2: the daemon opens it (common-ancestor and namespace checks use the opener).
    child_opens_procs = False

    fs: Fs

    @abc.abstractmethod
    def write_room_limits(self, node: _Node, limits: RoomLimits, enforce: set[str]) -> None: ...

    @abc.abstractmethod
    def write_run_limits(self, node: _Node, limits: RunCgroupLimits) -> None: ...

    @abc.abstractmethod
    def prepare_room(self, node: _Node) -> None: ...

    @abc.abstractmethod
    def prepare_run(self, node: _Node) -> None: ...

    @abc.abstractmethod
    def cpu_usage_ns(self, node: _Node) -> int: ...

    @abc.abstractmethod
    def stats(self, node: _Node) -> CgroupStats: ...

    @abc.abstractmethod
    def oom_kills(self, node: _Node) -> int: ...

    @abc.abstractmethod
    def kill(self, node: _Node) -> None: ...

    @abc.abstractmethod
    def populated(self, node: _Node) -> bool: ...

    @abc.abstractmethod
    def join_fds(self, node: _Node) -> list[int]: ...

    # -- shared -----------------------------------------------------------------------------

    def pids(self, node: _Node) -> set[int]:
        """Every pid in the subtree, in every hierarchy."""
        out: set[int] = set()
        for top in node.dirs():
            for d in self._walk(top):
                text = self.fs.read_opt(os.path.join(d, "cgroup.procs")) or ""
                out.update(int(x) for x in text.split() if x.isdigit())
        return out

    def _walk(self, top: str) -> list[str]:
        """top and its descendant cgroups, parents first."""
        out = [top]
        for name in self.fs.listdirs(top):
            out.extend(self._walk(os.path.join(top, name)))
        return out

    def mkdir(self, node: _Node, mode: int = 0o755) -> None:
        for d in node.dirs():
            if not self.fs.mkdir(d, mode):
                raise InternalError(f"cgroup {d} already exists", path=d)

    def wait_empty(self, node: _Node, timeout: float = KILL_WAIT_S) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.populated(node):
            if time.monotonic() >= deadline:
                return False
            self.fs.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def rmtree(self, node: _Node) -> None:
        """rmdir every directory of the subtree, children first; raise naming the first failure."""
        failed: list[tuple[str, OSError]] = []
        for top in node.dirs():
            for d in reversed(self._walk(top)):
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

    def destroy(self, node: _Node) -> None:
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
                raise InternalError(f"cgroup {node.dirs()[0]} still populated after kill",
                                    path=node.dirs()[0], pids=left[:20])
        self.rmtree(node)


class _Run(RunCgroup):
    def __init__(self, ops: _Ops, node: _Node, run_id: str) -> None:
        self.ops = ops
        self.node = node
        self.run_id = run_id
        self.path = node.dirs()[0]
        self._dir_fds: list[int] = []
        self._join_fds: list[int] = []
        self._room: _Room | None = None

    def dir_fds(self) -> list[int]:
        if not self._dir_fds:
            # One at a time into the list close() empties: an EMFILE on the second hierarchy
            # must not leak the first one's fd (issue 10, H5).
            for d in self.node.dirs():
                self._dir_fds.append(self.ops.fs.open_dir(d))
        return list(self._dir_fds)

    def join_fds(self) -> list[int]:
        if not self._join_fds:
            self._join_fds = self.ops.join_fds(self.node) or []
            if not self._join_fds:
                self._join_fds = self.dir_fds()
        return list(self._join_fds)

    def stats(self) -> CgroupStats:
        return self.ops.stats(self.node)

    def cpu_usage_ns(self) -> int:
        return self.ops.cpu_usage_ns(self.node)

    def oom_killed(self) -> bool:
        return self.ops.oom_kills(self.node) > 0

    def kill(self) -> None:
        self.ops.kill(self.node)

    def close(self) -> None:
        for fd in {*self._dir_fds, *self._join_fds}:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dir_fds, self._join_fds = [], []

    def destroy(self) -> None:
        self.close()
        self.ops.destroy(self.node)
        if self._room is not None:
            self._room._runs.pop(self.run_id, None)
            self._room = None


class _Room(RoomCgroup):
    def __init__(self, ops: _Ops, node: _Node, room_id: str, enforced: frozenset[str]) -> None:
        self.ops = ops
        self.node = node
        self.room_id = room_id
        self.enforced = enforced
        self.path = node.dirs()[0]
        self._runs: dict[str, _Run] = {}

    def procs_paths(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.node.child(INIT_LEAF).dirs()]

    @property
    def joined_by_dir(self) -> bool:
        """How a process of the room (possibly a subordinate uid) rejoins the init leaf: through
        directory fds it opens cgroup.procs from (v1), or daemon-opened cgroup.procs fds (v2)."""
        return self.ops.child_opens_procs

    def create_run(self, run_id: str, limits: RunCgroupLimits | None = None) -> RunCgroup:
        node = self.node.child(RUNS_LEAF).child(RUN_PREFIX + _check_name("run", run_id))
        self.ops.mkdir(node)
        run = _Run(self.ops, node, run_id)
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


class _TreeBackend(CgroupBackend):
    """v1 and v2: rooms are directories room-<id> under one parent per hierarchy."""

    ops: _Ops
    base: _Node

    def create_room(self, room_id: str, limits: RoomLimits) -> RoomCgroup:
        node = self.base.child(ROOM_PREFIX + _check_name("room", room_id))
        enforce = self.enforceable()
        # 0700: on v1 the run cgroups' cgroup.procs are world-writable (see "Joining a run"), so
        # nobody but the daemon may reach them by path.
        self.ops.mkdir(node, 0o700)
        try:
            # CPU and processes are the room's as a whole, init included; memory is the runs'
            # only (see "Where the cgroups live": a room-wide OOM must never be able to pick
            # the init).
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
        return _Room(self.ops, node, room_id, frozenset(enforce))

    def reconcile(self, live_room_ids: set[str]) -> list[str]:
        found: set[str] = set()
        for top in self.base.dirs():
            for name in self.ops.fs.listdirs(top):
                if name.startswith(ROOM_PREFIX) and _NAME_RE.fullmatch(name[len(ROOM_PREFIX):]):
                    found.add(name[len(ROOM_PREFIX):])
        removed = []
        for room_id in sorted(found - set(live_room_ids)):
            self.ops.destroy(self.base.child(ROOM_PREFIX + room_id))
            removed.append(room_id)
        return removed


def _write_limit(fs: Fs, path: str, value: str, limit: str) -> None:
    try:
        fs.write(path, value)
    except InternalError as err:
        raise LimitUnavailable(f"cannot apply the {limit} limit: {err.message}", limit=limit,
                               path=path) from err


def _cpu_quota(cpus: float) -> int:
    return max(1000, round(cpus * CPU_PERIOD_US))  # the kernel refuses quotas below 1 ms


# === v2 ==========================================================================================


class _V2Ops(_Ops):
    def __init__(self, fs: Fs, controllers: frozenset[str]) -> None:
        self.fs = fs
        self.controllers = controllers

    def _f(self, node: _Node, name: str) -> str:
        return os.path.join(node.paths["unified"], name)

    def write_room_limits(self, node: _Node, limits: RoomLimits, enforce: set[str]) -> None:
        if "memory" in enforce:
            _write_limit(self.fs, self._f(node, "memory.max"), str(limits.memory_bytes), "memory")
            # Swap counts against nothing in memory.max: without this a hog swaps instead of
            # being OOM-killed (when swap exists).
            if self.fs.exists(self._f(node, "memory.swap.max")):
                _write_limit(self.fs, self._f(node, "memory.swap.max"), "0", "memory")
        if "cpus" in enforce:
            _write_limit(self.fs, self._f(node, "cpu.max"),
                         f"{_cpu_quota(limits.cpus)} {CPU_PERIOD_US}", "cpus")
        if "pids" in enforce:
            _write_limit(self.fs, self._f(node, "pids.max"), str(limits.pids), "pids")

    def prepare_room(self, node: _Node) -> None:
        # Runs carry their own memory/pids limits, so the room hands those controllers down.
        # Must happen while the room is empty (no internal processes), hence the init leaf.
        # (cpu is not handed down: runs have no bandwidth limit of their own, and cpu.stat
        # usage_usec is there without it.)
        want = [c for c in ("memory", "pids") if c in self.controllers]
        if want:
            self.fs.write(self._f(node, "cgroup.subtree_control"),
                          " ".join("+" + c for c in want))

    def prepare_run(self, node: _Node) -> None:
        pass

    def write_run_limits(self, node: _Node, limits: RunCgroupLimits) -> None:
        if limits.memory_bytes is not None:
            if "memory" not in self.controllers:
                raise LimitUnavailable("run memory limit needs the memory controller",
                                       limit="memory", backend="v2")
            _write_limit(self.fs, self._f(node, "memory.max"), str(limits.memory_bytes), "memory")
            if self.fs.exists(self._f(node, "memory.swap.max")):
                _write_limit(self.fs, self._f(node, "memory.swap.max"), "0", "memory")
        if limits.pids is not None:
            if "pids" not in self.controllers:
                raise LimitUnavailable("run pids limit needs the pids controller",
                                       limit="pids", backend="v2")
            _write_limit(self.fs, self._f(node, "pids.max"), str(limits.pids), "pids")

    def cpu_usage_ns(self, node: _Node) -> int:
        # cpu.stat usage_usec is core cgroup2 accounting: present even without the cpu controller.
        usec = _keyed(self.fs.read_opt(self._f(node, "cpu.stat")), "usage_usec")
        return (usec or 0) * 1000

    def oom_kills(self, node: _Node) -> int:
        return _keyed(self.fs.read_opt(self._f(node, "memory.events")), "oom_kill") or 0

    def stats(self, node: _Node) -> CgroupStats:
        cur = _ints(self.fs.read_opt(self._f(node, "pids.current")))
        if cur is None:
            cur = len(self.pids(node))
        return CgroupStats(
            cpu_usage_ns=self.cpu_usage_ns(node),
            memory_peak_bytes=_ints(self.fs.read_opt(self._f(node, "memory.peak"))),
            pids_current=cur,
            pids_peak=_ints(self.fs.read_opt(self._f(node, "pids.peak"))),
            oom_kills=self.oom_kills(node),
            pids_limit_hits=_keyed(self.fs.read_opt(self._f(node, "pids.events")), "max") or 0,
            memory_current_bytes=_ints(self.fs.read_opt(self._f(node, "memory.current"))),
        )

    def populated(self, node: _Node) -> bool:
        events = self.fs.read_opt(self._f(node, "cgroup.events"))
        if events is None:  # the cgroup is gone
            return False
        return _keyed(events, "populated") != 0

    def kill(self, node: _Node) -> None:
        if not self.fs.isdir(node.paths["unified"]):
            return
        if self.fs.exists(self._f(node, "cgroup.kill")):
            self.fs.write(self._f(node, "cgroup.kill"), "1")
            return
        # Kernels < 5.14: freeze so nothing forks, SIGKILL everything, thaw to deliver.
        self.fs.write(self._f(node, "cgroup.freeze"), "1")
        deadline = time.monotonic() + FREEZE_WAIT_S
        while (_keyed(self.fs.read_opt(self._f(node, "cgroup.events")), "frozen") != 1
               and time.monotonic() < deadline):
            self.fs.sleep(0.001)
        for pid in self.pids(node):
            self.fs.kill(pid, signal.SIGKILL)
        self.fs.write(self._f(node, "cgroup.freeze"), "0")

    def join_fds(self, node: _Node) -> list[int]:
        # Opened by the daemon so the kernel checks the migration with the daemon's credentials
        # and cgroup namespace (>= 5.16), not the payload's (see "Joining a run").
        return [self.fs.open_procs(self._f(node, "cgroup.procs"))]


class V2Backend(_TreeBackend):
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
        self._v2ops = _V2Ops(self.fs, self.controllers)
        self.ops = self._v2ops
        self.base = _Node({"unified": _join(root, subtree)})

    def bootstrap(self) -> list[str]:
        """Move the daemon into <subtree>/supervisor if needed, enable memory/pids/cpu for the
        rooms, and claim what is now enabled. Call before the zygote starts (it must be born in
        the supervisor leaf). Idempotent."""
        top = self.base.paths["unified"]
        lines = _move_to_supervisor(top, self.fs) if self.pending_move else []
        self.pending_move = False
        lines += _enable_controllers(top, self.fs)
        enabled = set((self.fs.read_opt(os.path.join(top, "cgroup.subtree_control")) or "")
                      .split())
        self.controllers = frozenset(c for c in V2_CONTROLLERS if c in enabled)
        self._v2ops.controllers = self.controllers
        self.missing = {c: f"not enabled in {top}/cgroup.subtree_control" for c in V2_CONTROLLERS
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


# === v1 ==========================================================================================


class _V1Ops(_Ops):
    child_opens_procs = True

    def __init__(self, fs: Fs, controllers: frozenset[str]) -> None:
        self.fs = fs
        self.controllers = controllers

    def _f(self, node: _Node, ctrl: str, name: str) -> str:
        return os.path.join(node.paths[ctrl], name)

    def _memory(self, node: _Node, value: int) -> None:
        # limit first, then memsw: memsw may never be below the limit. memsw == limit means no
        # swap at all (memsw exists only with swapaccount=1; without it there is no swap cap).
        _write_limit(self.fs, self._f(node, "memory", "memory.limit_in_bytes"), str(value),
                     "memory")
        memsw = self._f(node, "memory", "memory.memsw.limit_in_bytes")
        if self.fs.exists(memsw):
            _write_limit(self.fs, memsw, str(value), "memory")

    def write_room_limits(self, node: _Node, limits: RoomLimits, enforce: set[str]) -> None:
        if "memory" in enforce:
            self._memory(node, limits.memory_bytes)
        if "cpus" in enforce:
            _write_limit(self.fs, self._f(node, "cpu", "cpu.cfs_period_us"), str(CPU_PERIOD_US),
                         "cpus")
            _write_limit(self.fs, self._f(node, "cpu", "cpu.cfs_quota_us"),
                         str(_cpu_quota(limits.cpus)), "cpus")
        if "pids" in enforce:
            _write_limit(self.fs, self._f(node, "pids", "pids.max"), str(limits.pids), "pids")

    def prepare_room(self, node: _Node) -> None:
        pass

    def prepare_run(self, node: _Node) -> None:
        # The payload child opens this itself, as a subordinate uid (see "Joining a run"); the
        # room directory above is 0700, so only the holder of the directory fd gets here.
        for d in node.dirs():
            self.fs.chmod(os.path.join(d, "cgroup.procs"), 0o666)

    def write_run_limits(self, node: _Node, limits: RunCgroupLimits) -> None:
        if limits.memory_bytes is not None:
            if "memory" not in self.controllers:
                raise LimitUnavailable("run memory limit needs the memory controller",
                                       limit="memory", backend="v1")
            self._memory(node, limits.memory_bytes)
        if limits.pids is not None:
            if "pids" not in self.controllers:
                raise LimitUnavailable("run pids limit needs the pids controller",
                                       limit="pids", backend="v1")
            _write_limit(self.fs, self._f(node, "pids", "pids.max"), str(limits.pids), "pids")

    def cpu_usage_ns(self, node: _Node) -> int:
        if "cpuacct" not in node.paths:
            return 0
        return _ints(self.fs.read_opt(self._f(node, "cpuacct", "cpuacct.usage"))) or 0

    def oom_kills(self, node: _Node) -> int:
        # v1 counts a kill only in the victim's own cgroup (v2's memory.events is hierarchical):
        # a room's figure is the sum over its live cgroups (the init leaf, runs, each run).
        if "memory" not in node.paths:
            return 0
        return sum(_keyed(self.fs.read_opt(os.path.join(d, "memory.oom_control")), "oom_kill")
                   or 0 for d in self._walk(node.paths["memory"]))

    def stats(self, node: _Node) -> CgroupStats:
        peak = cur = ppeak = mem = None
        hits = 0
        if "memory" in node.paths:
            peak = _ints(self.fs.read_opt(self._f(node, "memory", "memory.max_usage_in_bytes")))
            mem = _ints(self.fs.read_opt(self._f(node, "memory", "memory.usage_in_bytes")))
        if "pids" in node.paths:
            cur = _ints(self.fs.read_opt(self._f(node, "pids", "pids.current")))
            ppeak = _ints(self.fs.read_opt(self._f(node, "pids", "pids.peak")))
            hits = _keyed(self.fs.read_opt(self._f(node, "pids", "pids.events")), "max") or 0
        if cur is None:
            cur = len(self.pids(node))
        return CgroupStats(cpu_usage_ns=self.cpu_usage_ns(node), memory_peak_bytes=peak,
                           pids_current=cur, pids_peak=ppeak, oom_kills=self.oom_kills(node),
                           pids_limit_hits=hits, memory_current_bytes=mem)

    def populated(self, node: _Node) -> bool:
        return bool(self.pids(node))

    def _frozen(self, top: str) -> bool:
        """Every live task of the subtree is frozen.

        Not simply top's freezer.state: a v1 cgroup reads FREEZING as long as a child that was
        just rmdir'd is still being released (its css is offline and never FROZEN), which costs
        ~15 ms after each run. So: each listed leaf, and each cgroup holding tasks, is FROZEN.
        """
        for d in self._walk(top):
            leaf = not self.fs.listdirs(d)
            if leaf or (self.fs.read_opt(os.path.join(d, "cgroup.procs")) or "").strip():
                state = (self.fs.read_opt(os.path.join(d, "freezer.state")) or "").strip()
                if state and state != "FROZEN":
                    return False
        return True

    def kill(self, node: _Node) -> None:
        if not self.fs.isdir(node.paths["freezer"]):
            # Only after a partial rmdir: nothing left to freeze with, so a plain sweep.
            for pid in self.pids(node):
                self.fs.kill(pid, signal.SIGKILL)
            return
        state = self._f(node, "freezer", "freezer.state")
        killed: set[int] = set()
        for _ in range(3):
            self.fs.write(state, "FROZEN")
            deadline = time.monotonic() + FREEZE_WAIT_S
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

    def join_fds(self, node: _Node) -> list[int]:
        return []  # the directory fds: the child must open cgroup.procs itself


class V1Backend(_TreeBackend):
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
        self.ops = _V1Ops(self.fs, self.controllers)
        self.base = _Node({c: _join(h, parent) for c, h in hierarchies.items()
                           if c in self.controllers})

    def use_instance(self, name: str) -> None:
        """Put this daemon's rooms in ``<parent>/<name>``: daemons of one user (different state
        dirs) then never reconcile away each other's rooms. Created if missing."""
        node = self.base.child(_check_name("instance", name))
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


# === detection ===================================================================================


def _probe_v2(v1_root: str, v2_root: str | None, parent: str | None, proc_root: str,
              fs: Fs) -> V2Backend | str:
    root = _find_v2_root(v1_root, v2_root, fs)
    if root is None:
        return "no cgroup2 hierarchy mounted"
    pending = False
    if parent is not None:
        subtree = "/" + parent.strip("/")
    else:
        own = _own_cgroup_v2(proc_root)
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
    path = _join(root, subtree)
    if not fs.isdir(path):
        return f"{path} does not exist"
    for name in ("", "cgroup.procs", "cgroup.subtree_control"):
        p = os.path.join(path, name) if name else path
        if not fs.access(p, os.W_OK | (os.X_OK if not name else 0)):
            return f"{p} is not writable by uid {os.geteuid()}"
    enabled = set((fs.read_opt(os.path.join(path, "cgroup.subtree_control")) or "").split())
    have = {c for c in V2_CONTROLLERS if c in enabled}
    missing = {c: f"not enabled in {path}/cgroup.subtree_control" for c in V2_CONTROLLERS
               if c not in have}
    if pending:
        # Before the move the subtree root holds the daemon, so nothing can be enabled yet;
        # claim what it could delegate (cgroup.controllers): bootstrap() settles the truth.
        avail = set((fs.read_opt(os.path.join(path, "cgroup.controllers")) or "").split())
        missing = {c: f"not available in {path}/cgroup.controllers" for c in V2_CONTROLLERS
                   if c not in avail}
        have = {c for c in V2_CONTROLLERS if c in avail}
    return V2Backend(root, subtree, have, fs=fs, missing=missing, pending_move=pending)


def _v1_hierarchies(v1_root: str, fs: Fs) -> dict[str, str]:
    out: dict[str, str] = {}
    for ctrl in V1_CONTROLLERS:
        h = os.path.join(v1_root, ctrl)
        # a v1 hierarchy has cgroup.procs but no cgroup.controllers
        if fs.exists(os.path.join(h, "cgroup.procs")) and not fs.exists(
                os.path.join(h, "cgroup.controllers")):
            out[ctrl] = os.path.realpath(h)
    return out


_V1_PROBE_FILE = {"memory": "memory.limit_in_bytes", "pids": "pids.max",
                  "cpu": "cpu.cfs_quota_us", "cpuacct": "cpuacct.usage",
                  "freezer": "freezer.state"}


def _v1_status(v1_root: str, parent: str | None, user: str | None,
               fs: Fs) -> tuple[str, dict[str, str], set[str], dict[str, str]]:
    """(parent, hierarchies, controllers we can write, controller -> why not)."""
    hier = _v1_hierarchies(v1_root, fs)
    rel = (parent if parent is not None else f"sandboxd/{user or _default_user()}").strip("/")
    have: set[str] = set()
    missing: dict[str, str] = {}
    for ctrl in V1_CONTROLLERS:
        if ctrl not in hier:
            missing[ctrl] = "hierarchy not mounted"
            continue
        d = _join(hier[ctrl], rel)
        if not fs.isdir(d):
            missing[ctrl] = f"{d} missing (run sandboxctl setup)"
        elif not (fs.access(d, os.W_OK | os.X_OK)
                  and fs.access(os.path.join(d, "cgroup.procs"), os.W_OK)):
            missing[ctrl] = f"{d} not writable by uid {os.geteuid()}"
        else:
            have.add(ctrl)
    return rel, hier, have, missing


def _probe_v1(v1_root: str, parent: str | None, user: str | None, fs: Fs) -> V1Backend | str:
    rel, hier, have, missing = _v1_status(v1_root, parent, user, fs)
    if not hier:
        return f"no cgroup v1 hierarchies under {v1_root}"
    if "freezer" not in have:
        return f"v1 freezer unusable: {missing.get('freezer')}"
    return V1Backend(v1_root, rel, hier, have, fs=fs, missing=missing)


def detect(config_backend: str = "auto", parent: str | None = None,
           v1_root: str = "/sys/fs/cgroup", v2_root: str | None = None,
           proc_root: str = "/proc", *, user: str | None = None,
           fs: Fs | None = None, instance: str | None = None) -> CgroupBackend:
    """Pick the backend. Explicit v1/v2 that cannot work raise LimitUnavailable (fail loudly).

    ``instance`` (v1 only; v2 rooms already live under the daemon's own cgroup) names a
    per-daemon subdirectory of the delegated parent, see V1Backend.use_instance.

    auto: complete v2 (memory+pids+cpu) > complete v1 (memory+pids+cpu+cpuacct+freezer) >
    partial v2 (kill and CPU figures, some limits) > partial v1 (freezer needed) > disabled.
    ``parent`` is a path relative to the hierarchy root(s): for v2 the delegated subtree that
    holds the rooms, for v1 the delegated directory (default ``sandboxd/<user>``).
    """
    fs = fs or Fs()
    if config_backend == "disabled":
        return DisabledBackend("disabled by configuration")
    if config_backend not in ("auto", "v1", "v2"):
        raise ValidationError(f"unknown cgroup backend {config_backend!r}",
                              backend=config_backend)
    v2: V2Backend | str = "not tried"
    v1: V1Backend | str = "not tried"
    if config_backend in ("auto", "v2"):
        v2 = _probe_v2(v1_root, v2_root, parent, proc_root, fs)
        if config_backend == "v2":
            if isinstance(v2, str):
                raise LimitUnavailable(f"cgroup backend v2 unusable: {v2}", limit="cgroup",
                                       backend="v2")
            return v2
    if config_backend in ("auto", "v1"):
        v1 = _probe_v1(v1_root, parent, user, fs)
        if instance and isinstance(v1, V1Backend):
            v1.use_instance(instance)
        if config_backend == "v1":
            if isinstance(v1, str):
                raise LimitUnavailable(f"cgroup backend v1 unusable: {v1}", limit="cgroup",
                                       backend="v1")
            return v1
    if isinstance(v2, V2Backend) and not v2.missing:
        return v2
    if isinstance(v1, V1Backend) and not v1.missing:
        return v1
    if isinstance(v2, V2Backend):
        return v2
    if isinstance(v1, V1Backend):
        return v1
    return DisabledBackend("no usable cgroup hierarchy", tried={"v2": v2, "v1": v1})


# === daemon start-up and host setup ==============================================================


def _move_to_supervisor(subtree: str, fs: Fs) -> list[str]:
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


def _enable_controllers(subtree: str, fs: Fs) -> list[str]:
    lines = []
    avail = set((fs.read_opt(os.path.join(subtree, "cgroup.controllers")) or "").split())
    enabled = set((fs.read_opt(os.path.join(subtree, "cgroup.subtree_control")) or "").split())
    want = [c for c in V2_CONTROLLERS if c in avail and c not in enabled]
    if want:
        fs.write(os.path.join(subtree, "cgroup.subtree_control"),
                 " ".join("+" + c for c in want))
        lines.append(f"enabled {' '.join(want)} in {subtree}/cgroup.subtree_control")
    absent = [c for c in V2_CONTROLLERS if c not in avail]
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
    root = _find_v2_root(v1_root, v2_root, fs)
    if root is None:
        return ["no cgroup2 hierarchy: nothing to bootstrap"]
    own = _own_cgroup_v2(proc_root)
    if own is None or own == "/":
        return [f"daemon is in cgroup2 {own or '?'}: not a delegated subtree, nothing moved"]
    lines: list[str] = []
    if os.path.basename(own) == SUPERVISOR:
        subtree = _join(root, os.path.dirname(own))
    else:
        subtree = _join(root, own)
        if not fs.access(os.path.join(subtree, "cgroup.procs"), os.W_OK):
            return [f"{subtree} is not delegated to uid {os.geteuid()}: nothing moved"]
        lines += _move_to_supervisor(subtree, fs)
    return lines + _enable_controllers(subtree, fs)


def delegate(user: str, uid: int, gid: int, v1_root: str = "/sys/fs/cgroup",
             v2_root: str | None = None, *, parent: str | None = None,
             fs: Fs | None = None) -> list[str]:
    """``sandboxctl setup --user USER`` (as root, idempotent): give USER a cgroup parent.

    v1 hierarchies (hybrid hosts): ``<ctrl>/<parent>`` in memory, pids, cpu, cpuacct, freezer,
    owned by USER (the directory, cgroup.procs and tasks; limit files of the parent stay root's,
    so an administrator can cap USER's total). Pure v2: ``<root>/<parent>`` with memory/pids/cpu
    enabled on the way down, chowned like systemd's Delegate=yes (directory, cgroup.procs,
    cgroup.subtree_control, cgroup.threads); the daemon must then be *started* inside it (by
    root or systemd): an unprivileged process cannot move itself across the root.
    ``parent`` defaults to ``sandboxd/<user>``.
    """
    fs = fs or Fs()
    rel = (parent or f"sandboxd/{user}").strip("/")
    lines: list[str] = []

    def mkdirs(top: str) -> list[str]:
        made = []
        cur = top
        for part in rel.split("/"):
            cur = os.path.join(cur, part)
            if fs.mkdir(cur):
                made.append(cur)
        return made

    hier = _v1_hierarchies(v1_root, fs)
    if hier:
        for top in dict.fromkeys(hier.values()):
            made = mkdirs(top)
            d = _join(top, rel)
            for name in ("", "cgroup.procs", "tasks"):
                p = os.path.join(d, name) if name else d
                if fs.exists(p):
                    fs.chown(p, uid, gid)
            lines.append(f"{'created' if made else 'kept'} {d} owned by {user} ({uid}:{gid})")
        return lines
    root = _find_v2_root(v1_root, v2_root, fs)
    if root is None:
        return [f"no cgroup hierarchy under {v1_root}: nothing delegated"]
    avail = set((fs.read_opt(os.path.join(root, "cgroup.controllers")) or "").split())
    want = [c for c in V2_CONTROLLERS if c in avail]
    cur = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        enabled = set((fs.read_opt(os.path.join(cur, "cgroup.subtree_control")) or "").split())
        add = [c for c in want if c not in enabled]
        if add:
            fs.write(os.path.join(cur, "cgroup.subtree_control"), " ".join("+" + c for c in add))
            lines.append(f"enabled {' '.join(add)} in {cur}/cgroup.subtree_control")
        cur = os.path.join(cur, part)
        if fs.mkdir(cur):
            lines.append(f"created {cur}")
        if i == len(parts) - 1:
            for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
                p = os.path.join(cur, name) if name else cur
                if fs.exists(p):
                    fs.chown(p, uid, gid)
            lines.append(f"delegated {cur} to {user} ({uid}:{gid}); start sandboxd inside it "
                         "(or use the systemd unit with Delegate=yes)")
    missing = [c for c in V2_CONTROLLERS if c not in avail]
    if missing:
        lines.append(f"controllers not available at {root}: {' '.join(missing)}")
    return lines


# --- migration latency ------------------------------------------------------------------------
#
# Every cgroup migration (a payload joining its run's cgroup, on v1 and v2 alike) takes the one
# global cgroup_threadgroup_rwsem for writing. Unless a migration happened within the last
# grace period, that waits for RCU: 5-8 ms measured here per sparse exec, against 0.1 ms with
# the cgroup2 mount option favordynmods, which keeps the lock in its writer-friendly mode (the
# kernel's own trade-off: fork and exit get slightly more expensive). The option is per
# hierarchy but the lock is global, so setting it on any cgroup2 mount helps v1 rooms too.
FAVOR_DYNMODS_COST = ("every exec waits for an RCU grace period to join its run cgroup "
                      "(5-8 ms here when runs are not back to back)")


def _cgroup2_mounts(mounts: str) -> list[tuple[str, list[str]]]:
    out = []
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup2":
            out.append((parts[1], parts[3].split(",")))
    return out


def favor_dynmods_status(mounts_path: str = "/proc/mounts") -> tuple[bool, str]:
    """Whether some cgroup2 mount has favordynmods (the lock is global), and which."""
    try:
        with open(mounts_path) as f:
            mounts = _cgroup2_mounts(f.read())
    except OSError as err:
        return False, f"cannot read {mounts_path}: {err.strerror}"
    if not mounts:
        return False, "no cgroup2 mount"
    on = [mp for mp, opts in mounts if "favordynmods" in opts]
    return (True, f"on ({', '.join(on)})") if on else (False, "off on " + ", ".join(
        mp for mp, _ in mounts))


def favor_dynmods(mounts_path: str = "/proc/mounts",
                  remount: Callable[[str], None] | None = None) -> list[str]:
    """`sandboxctl setup` (root): remount the first cgroup2 mount with favordynmods. Lost at
    reboot like the rest of setup; a host that boots with it uses the kernel config
    CGROUP_FAVOR_DYNMODS or systemd's own mount options."""
    ok, detail = favor_dynmods_status(mounts_path)
    if ok:
        return [f"favordynmods already {detail}"]
    try:
        with open(mounts_path) as f:
            mounts = _cgroup2_mounts(f.read())
    except OSError:
        mounts = []
    if not mounts:
        return [f"favordynmods: not set ({detail}); cost: {FAVOR_DYNMODS_COST}"]
    target = mounts[0][0]
    do = remount or _remount_favor
    try:
        do(target)
    except OSError as err:
        return [f"favordynmods: remount of {target} failed ({err}); cost: {FAVOR_DYNMODS_COST}"]
    return [f"favordynmods: remounted {target} with favordynmods (fast cgroup migrations)"]


def _remount_favor(target: str) -> None:
    import subprocess

    res = subprocess.run(["mount", "-o", "remount,favordynmods", target], capture_output=True,
                         text=True, check=False)
    if res.returncode:
        raise OSError(res.stderr.strip() or f"mount exited {res.returncode}")


def doctor_report(config_backend: str = "auto", parent: str | None = None,
                  v1_root: str = "/sys/fs/cgroup", v2_root: str | None = None,
                  proc_root: str = "/proc", *, user: str | None = None,
                  fs: Fs | None = None) -> list[tuple[str, bool, str]]:
    """(check, ok, what it costs when missing) lines for ``sandboxctl doctor``. Never raises."""
    try:
        return _doctor(config_backend, parent, v1_root, v2_root, proc_root, user, fs or Fs())
    except SandboxError as err:
        return [("cgroup report", False, f"cannot inspect cgroups: {err.message}")]


def _doctor(config_backend: str, parent: str | None, v1_root: str, v2_root: str | None,
            proc_root: str, user: str | None, fs: Fs) -> list[tuple[str, bool, str]]:
    out: list[tuple[str, bool, str]] = []
    fast, detail = favor_dynmods_status(os.path.join(proc_root, "mounts"))
    out.append((f"cgroup migrations fast (favordynmods {detail})", fast, FAVOR_DYNMODS_COST))
    root = _find_v2_root(v1_root, v2_root, fs)
    out.append(("cgroup2 mounted", root is not None, "no cgroup2: v1 backend or nothing"))
    v2 = _probe_v2(v1_root, v2_root, parent, proc_root, fs) if root else "no cgroup2"
    out.append(("cgroup2 delegated subtree writable" + ("" if isinstance(v2, V2Backend)
                                                         else f" ({v2})"),
                isinstance(v2, V2Backend), "v2 backend unusable"))
    if isinstance(v2, V2Backend):
        for c in V2_CONTROLLERS:
            out.append((f"cgroup2 controller {c}", c in v2.controllers,
                        _COST[c]))
    rel, hier, have, missing = _v1_status(v1_root, parent, user, fs)
    if hier:
        for c in V1_CONTROLLERS:
            why = f" ({missing[c]})" if c in missing else ""
            out.append((f"cgroup v1 {c} parent {rel}{why}", c in have, _COST[c]))
    try:
        chosen = detect(config_backend, parent, v1_root, v2_root, proc_root, user=user, fs=fs)
        out.append((f"cgroup backend: {chosen.name}", chosen.name != "disabled",
                    "rlimits and wall-clock kills only: no memory/cpus/pids limits, no OOM "
                    "verdict" if chosen.name == "disabled" else ""))
        can = chosen.enforceable()
        for lim in sorted(limits_table.CGROUP_LIMITS, key=lambda lim: lim.cgroup_name or ""):
            out.append((f"limit {lim.cgroup_name} enforceable", lim.cgroup_name in can,
                        lim.cost))
    except (LimitUnavailable, ValidationError) as err:
        out.append((f"cgroup backend {config_backend}", False, err.message))
    return out
