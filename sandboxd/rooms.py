"""RoomManager: room ids, ownership, lifecycle (creating -> ready -> stopping -> gone), reaping.

A room is created lazily on first use of its id (``getSandbox`` or any room method), owned by the
uid that created it (from SO_PEERCRED), and destroyed on ``destroy``, after ``idle_timeout_s``
without activity, when its init dies, or at daemon shutdown.

Room ids are per uid: a room is keyed by (owner uid, id), so two tenants can each have a room
"r", and asking for an id another tenant uses is indistinguishable from asking for a free one
(no existence oracle, no squatting). Root and the daemon's own uid address their own rooms by id
like everyone else; only their ``listSandboxes`` and ``stats`` show every tenant's rooms (with
``owner``). On the host a room is named by :func:`room_key` — ``u<uid>-<id>``, or a hashed form
when that would exceed 63 characters — in its state directory, cgroup names and logs.

Creation steps, in order:

1. the room's cgroup, with its limits (fail closed: an explicitly requested limit this host cannot
   enforce refuses the room with LIMIT_UNAVAILABLE, naming it);
2. the room's state directory ``<state>/rooms/<key>/`` (``mnt/`` is where the init mounts the
   room's tmpfs — inside the room's mount namespace only — and ``room.json`` lets a restarted
   daemon find and kill what a crashed one left);
3. the zygote forks the init, which joins the cgroup, unshares, builds the filesystem, says ready.

Destruction undoes these in reverse; every step is idempotent and runs even when an earlier one
failed, so that a half-created room and a crashed daemon's leftovers are cleaned by the same code,
and a teardown always ends with the room gone (never stuck in "stopping").

A room whose init died (OOM, a kill, a crash) is not silently replaced: its (uid, id) keeps a
tombstone, and every call on it answers SANDBOX_UNAVAILABLE with the reason until the caller
destroys it or asks for it again with ``getSandbox``, which makes the next incarnation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec
import psutil

from . import errors
from .config import (
    DaemonConfig,
    RoomLimits,
    RoomLimitsMax,
    RoomOptions,
    check_room_limits,
    check_sandbox_id,
)
from .jail import JailError
from .jail import user as idmaps
from .jail.cgroup.disabled import unattached
from .jail.cgroup.interface import CgroupBackend, RoomCgroup, RunCgroupLimits
from .jail.handles import RoomHandle, Zygote
from .jail.messages import RoomSpec
from .protocol import NetworkOptions

if TYPE_CHECKING:
    from .contexts import CodeContext
    from .egress import Egress
    from .processes import ProcessTable
    from .sessions import Session
    from .terminals import Terminal
    from .watches import Watch

log = logging.getLogger("sandboxd.rooms")

T = TypeVar("T")

#: How long a teardown waits for the room's finishing runs (their cgroups killed and removed)
#: before it goes on without them: a teardown must always end.
SETTLE_TIMEOUT_S = 10.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def room_key(uid: int, room_id: str) -> str:
    """The host-side name of (uid, id): a valid cgroup and file name of at most 63 characters.

    ``u<uid>-<id>`` when it fits (readable in ``ps``, cgroupfs and logs); otherwise
    ``h<uid>-<prefix>-<sha256>``, which cannot collide with a ``u`` name."""
    key = f"u{uid}-{room_id}"
    if len(key) <= 63:
        return key
    digest = hashlib.sha256(f"{uid}/{room_id}".encode()).hexdigest()[:16]
    head = f"h{uid}-"
    return f"{head}{room_id[:63 - len(head) - 17]}-{digest}"


def resolve_options(raw: dict[str, Any] | None, defaults: RoomLimits,
                    ceilings: RoomLimitsMax | None = None) -> tuple[RoomOptions, set[str]]:
    """Merge client options over the daemon's defaults; return them and the limits asked for.
    Every room's limits pass here: the admin's ceilings are checked here and nowhere else."""
    raw = dict(raw or {})
    given = raw.get("limits") or {}
    if not isinstance(given, dict):
        raise errors.InvalidParams("options.limits must be an object")
    merged = {**msgspec.to_builtins(defaults), **given}
    try:
        opts = msgspec.convert({**raw, "limits": merged}, RoomOptions)
    except msgspec.ValidationError as err:
        raise errors.InvalidParams(f"invalid options: {err}") from err
    if ceilings is not None:
        check_room_limits(opts.limits, ceilings)
    return opts, set(given)


class Network(Protocol):
    """Egress (``egress.Network``, installed by the daemon: egress builds on rooms)."""

    def check(self, options: NetworkOptions | None) -> object: ...

    async def attach(self, room: Room, options: NetworkOptions | None) -> None: ...

    async def set_policy(self, room: Room, options: NetworkOptions | None) -> None: ...

    def detach(self, room: Room) -> None: ...


class Sleeper(Protocol):
    """Rooms put to sleep (``onIdle: "snapshot"``): ``persistence.Sleeper``, installed by the
    daemon (rooms cannot import persistence, which builds on rooms)."""

    def stopped(self, uid: int, room_id: str) -> bool: ...

    def waking(self, uid: int, room_id: str) -> bool: ...

    async def sleep(self, room: Room) -> bool:
        """Save the room's writable layer; False when it could not (the room then stays)."""

    async def wake(self, uid: int, room_id: str) -> None: ...

    def forget(self, uid: int, room_id: str) -> bool: ...

    def list(self, uid: int) -> list[Any]:
        """The uid's stopped rooms (``persistence.StoppedRoom``)."""


@dataclass
class Tombstone:
    """What is left of a room whose init died, until its owner destroys or re-gets it."""

    reason: str  # "oom" | "killed" | "crashed"
    detail: str
    incarnation: int
    died_at: float


class Room:
    def __init__(self, room_id: str, owner: int, options: RoomOptions, state_dir: str,
                 incarnation: int = 1) -> None:
        self.id = room_id
        self.owner = owner
        self.key = room_key(owner, room_id)
        self.options = options
        self.incarnation = incarnation
        self.status = "creating"
        self.created_at = time.time()
        self.last_activity = time.monotonic()
        self.last_activity_wall = self.created_at
        self.dir = os.path.join(state_dir, "rooms", self.key)
        self.handle: RoomHandle = None  # type: ignore[assignment]  # set once spawned
        # Until the backend created the room's cgroup: one that holds, counts and removes nothing.
        self.cgroup: RoomCgroup = unattached(self.key)
        self.ids: idmaps.IdMap | None = None  # its own id slice (subordinate mode)
        self.active_runs = 0
        # Run ids count per room: a daemon-wide counter showed in /proc/self/cgroup and told
        # every room how busy the other tenants were (issue 10, M4).
        self.run_ids = itertools.count(1)
        # Its background processes (processes.table makes it on first use); each live one is
        # also one of ``active_runs``.
        self.processes: ProcessTable | None = None
        # Its open terminals by id (``terminals``); each live one is also one of ``active_runs``.
        self.terminals: dict[str, Terminal] = {}
        # Its shell sessions by id (``sessions``): their state lives in the room, under
        # /tmp/.sandboxd/session-<id>; this holds each one's lock (one call at a time).
        self.sessions: dict[str, Session] = {}
        # Its file watches by id (``watches``): each holds an inotify fd, closed at teardown.
        self.watches: dict[str, Watch] = {}
        # Its code contexts by id (``contexts``): each a driver run the room tracks (one of
        # ``active_runs`` while it lives), killed with the room like every run.
        self.contexts: dict[str, CodeContext] = {}
        # Its egress forwarder and DNS server (``egress``), when it has a network option.
        self.egress: Egress | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        # Request tasks using the room (any method: a streamed readFile, a long file operation,
        # an exec): the idle reaper leaves a room alone while one is running.
        self.users: set[asyncio.Task[Any]] = set()
        self.watcher: asyncio.Future[None] | None = None
        self.creating: asyncio.Future[Room] | None = None
        self.stopping: asyncio.Future[None] | None = None
        self.doomed = False  # destroyed while being created
        self.sleeping: asyncio.Future[None] | None = None  # being saved and stopped
        self.zygote_generation = 0  # which zygote forked its init (it dies with that one)

    def touch(self) -> None:
        self.last_activity = time.monotonic()
        self.last_activity_wall = time.time()

    def track(self, fut: Awaitable[Any]) -> None:
        f = asyncio.ensure_future(fut)
        self._pending.add(f)
        f.add_done_callback(self._pending.discard)

    def use(self) -> None:
        """Count the current request task as activity until it ends."""
        task = asyncio.current_task()
        self.touch()
        if task is None or task in self.users:
            return
        self.users.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.users.discard(t)
            self.touch()

        task.add_done_callback(done)

    @property
    def busy(self) -> bool:
        return self.active_runs > 0 or bool(self.users)

    async def settle(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def run_cgroup_limits(self, memory_bytes: int | None,
                          pids: int | None) -> RunCgroupLimits:
        return RunCgroupLimits(memory_bytes=memory_bytes, pids=pids)

    def options_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self.options)
        return out

    def describe(self, with_owner: bool = False) -> dict[str, Any]:
        out = {"sandboxId": self.id, "status": self.status, "createdAt": iso(self.created_at),
               "lastActivityAt": iso(self.last_activity_wall), "incarnation": self.incarnation}
        if with_owner:
            out["owner"] = self.owner
        return out


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # Every waiter of a shared creation may have gone (their clients dropped): fetch the outcome
    # so that asyncio does not log "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """``fn`` in the default executor, or inline when the executor cannot start (EMFILE or no
    thread while asyncio lazily makes its pool): cleanup must not depend on spare resources."""
    loop = asyncio.get_running_loop()
    try:
        fut = loop.run_in_executor(None, fn, *args)
    except (OSError, RuntimeError) as err:
        log.warning("executor unavailable (%s): running %s inline", err,
                    getattr(fn, "__name__", fn))
        return fn(*args)
    return await fut


class RoomManager:
    def __init__(self, config: DaemonConfig, backend: CgroupBackend, zygote: Zygote,
                 ids: idmaps.IdPlan, seccomp_bpf: bytes | None = None) -> None:
        self.config = config
        self.backend = backend
        self.zygote = zygote
        self.ids = ids
        self.seccomp_bpf = seccomp_bpf
        self.rooms: dict[tuple[int, str], Room] = {}
        self.dead: dict[tuple[int, str], Tombstone] = {}
        self._daemon_uid = os.getuid()
        self.closing = False
        self.sleeper: Sleeper | None = None
        self.network: Network | None = None  # egress.Network, installed by the daemon
        os.makedirs(os.path.join(config.state_dir, "rooms"), mode=0o700, exist_ok=True)

    # --- lookup -------------------------------------------------------------------------------

    def is_admin(self, uid: int) -> bool:
        return uid in (0, self._daemon_uid)

    def _unavailable(self, room_id: str, tomb: Tombstone) -> errors.RoomLost:
        return errors.room_lost(
            room_id, f"sandbox {room_id} died ({tomb.reason}: {tomb.detail}); destroy it, or "
            "call getSandbox for a new, empty one", reason=tomb.reason,
            incarnation=tomb.incarnation)

    def get(self, uid: int, room_id: str) -> Room:
        check_sandbox_id(room_id)
        key = (uid, room_id)
        room = self.rooms.get(key)
        if room is None or room.status != "ready":
            tomb = self.dead.get(key)
            if tomb is not None:
                raise self._unavailable(room_id, tomb)
            raise errors.SandboxNotFound(f"sandbox {room_id} not found", sandboxId=room_id)
        return room

    async def lost(self, room: Room, err: Exception) -> errors.RoomLost:
        """The error for a call whose room failed under it (``err``, a ``JailError``): once the
        init's death is classified (bounded wait), SANDBOX_UNAVAILABLE with its reason."""
        if room.watcher is not None and not room.watcher.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.wait([room.watcher]), 2.0)
        tomb = self.dead.get((room.owner, room.id))
        if tomb is not None and tomb.incarnation == room.incarnation:
            return self._unavailable(room.id, tomb)
        reason = "destroyed" if room.status in ("stopping", "gone") else "crashed"
        return errors.room_lost(room.id, f"sandbox {room.id} failed during the call: {err}",
                                reason=reason)

    def visible_rooms(self, uid: int) -> list[Room]:
        """The caller's rooms; every room for root and the daemon's uid (the admins)."""
        if self.is_admin(uid):
            return list(self.rooms.values())
        return [r for (owner, _), r in self.rooms.items() if owner == uid]

    async def get_or_create(self, uid: int, room_id: str, options: dict[str, Any] | None = None,
                            *, explicit: bool = False, waking: bool = False) -> Room:
        """The caller's room ``room_id``, made if it does not exist. ``explicit`` (getSandbox)
        also replaces a room that died; every other method gets SANDBOX_UNAVAILABLE for it.
        A room that was put to sleep is woken first, whatever the method (``waking``: this is
        the wake-up itself)."""
        check_sandbox_id(room_id)
        key = (uid, room_id)
        while True:
            if self.closing:
                raise errors.ShuttingDown("sandboxd is shutting down")
            room = self.rooms.get(key)
            sleeper = self.sleeper
            if sleeper is not None and not waking and (
                    sleeper.waking(uid, room_id)
                    or (room is None and sleeper.stopped(uid, room_id))):
                await sleeper.wake(uid, room_id)
                continue
            if room is None:
                break
            if room.sleeping is not None:
                await asyncio.wait([room.sleeping])
                continue
            if room.status == "creating" and room.creating is not None:
                room = await asyncio.shield(room.creating)
                room.use()
                return room
            if room.status == "ready":
                if room.handle.alive:
                    room.use()
                    return room
                # Its init died and the watcher has not classified it yet: let it, then look
                # again (a tombstone, or nothing if someone destroyed it meanwhile).
                if room.watcher is not None:
                    # wait(), not shield(): a watcher cancelled by a teardown is no error here
                    await asyncio.wait([room.watcher])
                else:
                    await self._teardown(room)
                continue
            # stopping: wait until it is gone, then look again
            await self._teardown(room)
        incarnation = 1
        tomb = self.dead.get(key)
        if tomb is not None:
            if not explicit:
                raise self._unavailable(room_id, tomb)
            incarnation = tomb.incarnation + 1
        # Everything up to registering the room is synchronous: a batch of getSandbox calls
        # cannot all pass the quota check before any of them counts (issue 10, H2).
        opts, asked = resolve_options(options, self.config.room_defaults,
                                      self.config.room_limits_max)
        # Fail closed on an explicitly asked limit this host cannot enforce (sandboxd.limits).
        self.backend.check_limits(opts.limits, asked)
        if opts.network is not None:
            # (a policy that does not parse, or a host without egress: refused before any room)
            if self.network is None:
                raise errors.LimitUnavailable("this daemon gives sandboxes no network",
                                              limit="network")
            self.network.check(opts.network)
        if not self.is_admin(uid):
            owned = sum(1 for (owner, _) in self.rooms if owner == uid)
            if owned >= self.config.max_rooms_per_uid:
                raise errors.QuotaExceeded("too many sandboxes for this user",
                                           limit=self.config.max_rooms_per_uid)
        self.dead.pop(key, None)
        room = Room(room_id, uid, opts, self.config.state_dir, incarnation)
        self.rooms[key] = room
        room.creating = asyncio.ensure_future(self._create(room))
        room.creating.add_done_callback(_retrieve)
        room = await asyncio.shield(room.creating)
        room.use()
        return room

    # --- lifecycle ----------------------------------------------------------------------------

    def _check_doomed(self, room: Room) -> None:
        if room.doomed:
            raise errors.room_lost(
                room.id, f"sandbox {room.id} was destroyed while it was being created",
                reason="destroyed")

    async def _create(self, room: Room) -> Room:
        options = room.options
        t0 = time.monotonic()
        try:
            try:
                room.ids = ids = self.ids.acquire()
            except idmaps.SlicesExhausted as err:
                raise errors.QuotaExceeded(
                    f"no free id slice for a new sandbox ({err}); destroy a sandbox or give the "
                    "daemon's user a larger subordinate range (sandboxctl setup)",
                    limit=self.ids.slices) from err
            room.cgroup = self.backend.create_room(room.key, options.limits)
            mnt = os.path.join(room.dir, "mnt")
            os.makedirs(mnt, mode=0o700, exist_ok=True)
            spec = RoomSpec(
                room_id=room.key, rootfs=self.config.rootfs, scratch=mnt,
                disk_bytes=options.limits.disk_bytes, hostname="sandbox",
                cgroup_procs=room.cgroup.procs_paths(),
                cgroup_home_by_dir=room.cgroup.joined_by_dir, ids=ids,
                seccomp_bpf=self.seccomp_bpf)
            room.zygote_generation = self.zygote.generation
            pid, sock, pidfd = await self.zygote.spawn(spec, self.config.room_start_timeout_s)
            # No await between the spawn's reply and the handle: from here on the teardown owns
            # the init's pidfd and channel, whatever happens next.
            room.handle = RoomHandle(room.id, pid, sock, pidfd)
            if room.doomed:
                room.handle.kill()
            self._check_doomed(room)
            self._write_meta(room, pid)
            await room.handle.wait_ready(self.config.room_start_timeout_s)
            self._check_doomed(room)
        except errors.SandboxError:
            await self._teardown(room)
            raise
        except (JailError, OSError, TimeoutError) as err:
            await self._teardown(room)
            if room.doomed:
                raise errors.room_lost(
                    room.id, f"sandbox {room.id} was destroyed while it was being created",
                    reason="destroyed") from None
            log.error("room %s: creation failed: %s", room.key, err)
            raise errors.InternalError(f"could not create sandbox {room.id}: {err}",
                                       sandboxId=room.id) from err
        except BaseException:
            await self._teardown(room)
            raise
        if options.network is not None and self.network is not None:
            try:
                await self.network.attach(room, options.network)
            except BaseException:
                await self._teardown(room)
                raise
        room.status = "ready"
        room.watcher = asyncio.ensure_future(self._watch(room))
        log.info("room %s ready in %.1f ms (incarnation %d)", room.key,
                 (time.monotonic() - t0) * 1e3, room.incarnation)
        return room

    async def _watch(self, room: Room) -> None:
        """Tear a room down when its init dies under it (OOM killer, a bug, an attack), leaving a
        tombstone that tells its owner why."""
        await room.handle.wait_dead(timeout=None)
        key = (room.owner, room.id)
        if room.status != "ready" or self.rooms.get(key) is not room:
            return
        reason, detail = await self._death_reason(room)
        log.warning("room %s: init died (%s: %s); tearing the room down", room.key, reason,
                    detail)
        self._bury(key, Tombstone(reason, detail, room.incarnation, time.time()))
        await self._teardown(room)

    def _bury(self, key: tuple[int, str], tomb: Tombstone) -> None:
        self.dead[key] = tomb
        # Bounded: a tenant that keeps killing its inits cannot grow the daemon without end.
        cap = max(16, self.config.max_rooms_per_uid)
        mine = sorted((t.died_at, k) for k, t in self.dead.items() if k[0] == key[0])
        for _, old in mine[:max(0, len(mine) - cap)]:
            del self.dead[old]

    async def _death_reason(self, room: Room) -> tuple[str, str]:
        status = await self.zygote.exit_status(room.handle.pid, timeout=1.0)
        oom = 0
        with contextlib.suppress(Exception):
            oom = room.cgroup.stats().oom_kills
        if status is None:
            if self.zygote.generation != room.zygote_generation or not self.zygote.alive:
                return "killed", "the daemon's zygote died and took the room's init with it"
            if oom:
                return "oom", "the room ran out of memory"
            return "crashed", "the room init exited (status unknown)"
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            if sig == signal.SIGKILL and oom:
                return "oom", "the room ran out of memory and its init was killed"
            return "killed", f"the room init was killed by {signal.Signals(sig).name}"
        return "crashed", f"the room init exited with status {os.waitstatus_to_exitcode(status)}"

    def _write_meta(self, room: Room, pid: int) -> None:
        try:
            start = psutil.Process(pid).create_time()
        except psutil.Error:
            start = 0.0
        meta = {"sandboxId": room.id, "owner": room.owner, "initPid": pid, "initStart": start,
                "createdAt": room.created_at,
                "idSlice": room.ids.slice if room.ids is not None else -1}
        path = os.path.join(room.dir, "room.json")
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f)
        os.replace(path + ".tmp", path)

    async def destroy(self, uid: int, room_id: str) -> bool:
        check_sandbox_id(room_id)
        key = (uid, room_id)
        had_tomb = self.dead.pop(key, None) is not None
        if self.sleeper is not None and self.sleeper.forget(uid, room_id):
            had_tomb = True  # a stopped room: its saved layer is what is destroyed
        room = self.rooms.get(key)
        if room is None:
            return had_tomb
        if room.status == "creating" and room.creating is not None:
            room.doomed = True
            if room.handle is not None:
                room.handle.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(room.creating)
        await self._teardown(room)
        self.dead.pop(key, None)  # its init may have died while we waited
        return True

    async def destroy_live(self, uid: int, room_id: str) -> None:
        """Tear down the live room only (a stopped room's saved layer is kept)."""
        room = self.rooms.get((uid, room_id))
        if room is not None:
            await self._teardown(room)

    async def _teardown(self, room: Room) -> None:
        """Destroy ``room``; every caller waits for the same teardown, which runs as a task of
        its own so that a caller that is cancelled (a client gone) cannot leave it half done."""
        if room.stopping is None:
            room.stopping = asyncio.ensure_future(self._teardown_steps(room))
        await asyncio.shield(room.stopping)

    async def _teardown_steps(self, room: Room) -> None:
        room.status = "stopping"
        me = asyncio.current_task()
        if self.network is not None:
            with contextlib.suppress(Exception):
                self.network.detach(room)
        for watch in list(room.watches.values()):
            # (their inotify marks pin the room's filesystems: closed before anything else)
            with contextlib.suppress(Exception):
                watch.close()
        try:
            if room.watcher is not None and room.watcher is not me and not room.watcher.done():
                room.watcher.cancel()
            if room.handle is not None:
                try:
                    room.handle.kill()
                    if not await room.handle.wait_dead(5.0):
                        log.error("room %s: init did not die within 5 s", room.key)
                        room.ids = None  # its slice stays held: never reuse a live process's ids
                except Exception:
                    log.exception("room %s: killing the init failed", room.key)
                    room.ids = None
                with contextlib.suppress(Exception):
                    self.zygote.forget(room.handle.pid)
                try:
                    room.handle.close()
                except Exception:
                    log.exception("room %s: closing the init's handle failed", room.key)
            try:
                await asyncio.wait_for(room.settle(), SETTLE_TIMEOUT_S)
            except TimeoutError:
                log.error("room %s: runs did not finish within %.0f s", room.key,
                          SETTLE_TIMEOUT_S)
            except Exception:
                log.exception("room %s: settling runs failed", room.key)
            for attempt in (1, 2):
                try:
                    await _blocking(room.cgroup.destroy)
                    break
                except Exception as err:  # noqa: BLE001 - logged; a teardown goes on
                    # Once more after a pause: out of fds (EMFILE), other rooms' teardowns
                    # are closing theirs right now.
                    if attempt == 2:
                        log.error("room %s: removing its cgroup failed: %s", room.key, err)
                    await asyncio.sleep(0.2)
        finally:
            # Always, whatever failed above: a room must never stay "stopping".
            for attempt in (1, 2):
                try:
                    await _blocking(_remove_dir, room.dir)
                except Exception:  # noqa: BLE001 - retried inline below
                    with contextlib.suppress(Exception):
                        _remove_dir(room.dir)
                if not os.path.lexists(room.dir) or attempt == 2:
                    break
                await asyncio.sleep(0.2)
            try:
                # Only once the init is dead (or given up on: then the slice is quarantined at
                # the next start) may another room get these host ids.
                self.ids.release(room.ids)
            except Exception:
                log.exception("room %s: releasing its id slice failed", room.key)
            room.status = "gone"
            key = (room.owner, room.id)
            if self.rooms.get(key) is room:
                del self.rooms[key]
            log.info("room %s destroyed", room.key)

    async def shutdown(self) -> None:
        self.closing = True
        for room in list(self.rooms.values()):
            if room.creating is not None and not room.creating.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(room.creating)
        await asyncio.gather(*(self._teardown(r) for r in list(self.rooms.values())),
                             return_exceptions=True)
        # What a teardown could not remove (out of fds while every room went at once) is swept
        # now that their fds are closed: the same code as a restart after a crash.
        try:
            left = await _blocking(self.reconcile)
        except Exception as err:  # noqa: BLE001 - a sweep that fails is logged, not fatal
            log.error("final sweep of room leftovers failed: %s", err)
        else:
            if left:
                log.warning("removed leftovers at shutdown: %s", ", ".join(left))

    def kill_all(self) -> None:
        """Last resort (a second signal, a shutdown past its deadline): SIGKILL every init."""
        for room in list(self.rooms.values()):
            if room.handle is not None:
                with contextlib.suppress(Exception):
                    room.handle.kill()

    def idle_timeout(self, room: Room) -> float:
        """Seconds of no activity after which ``room``'s ``onIdle`` applies (0: never)."""
        if room.options.on_idle == "keep":
            return 0.0
        return room.options.sleep_after or self.config.idle_timeout_s

    async def reap_idle(self) -> None:
        timeout = self.config.idle_timeout_s
        if timeout <= 0:
            return  # the admin turned idle handling off (sleepAfter included)
        while not self.closing:
            timeouts = [t for t in (timeout, *map(self.idle_timeout, self.rooms.values()))
                        if t > 0]
            await asyncio.sleep(min(30.0, max(0.25, min(timeouts) / 4)) if timeouts else 5.0)
            now = time.monotonic()
            for room in list(self.rooms.values()):
                limit = self.idle_timeout(room)
                if limit <= 0 or room.status != "ready" or room.busy \
                        or now - room.last_activity <= limit or room.sleeping is not None:
                    continue
                idle = now - room.last_activity
                if room.options.on_idle == "snapshot" and self.sleeper is not None:
                    log.info("room %s idle for %.0f s: saving and stopping it", room.key, idle)
                    await self._sleep(room)
                else:
                    log.info("room %s idle for %.0f s: destroying", room.key, idle)
                    await self._teardown(room)
            wall = time.time()
            for key, tomb in list(self.dead.items()):
                if timeout > 0 and wall - tomb.died_at > timeout:
                    del self.dead[key]

    async def _sleep(self, room: Room) -> None:
        """Save ``room`` (its calls wait meanwhile), then tear it down; if it cannot be saved
        it keeps running: its files are never dropped for want of a snapshot."""
        assert self.sleeper is not None
        room.sleeping = asyncio.get_running_loop().create_future()
        try:
            saved = await self.sleeper.sleep(room)
            if saved:
                await self._teardown(room)
            else:
                room.touch()  # try again after another idle period
        except Exception:
            log.exception("room %s: putting it to sleep failed; it keeps running", room.key)
            room.touch()
        finally:
            room.sleeping.set_result(None)
            room.sleeping = None

    # --- start-up -----------------------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Remove what a crashed daemon left: room processes, state directories, cgroups."""
        cleaned: list[str] = []
        base = os.path.join(self.config.state_dir, "rooms")
        for name in sorted(os.listdir(base)):
            path = os.path.join(base, name)
            try:
                with open(os.path.join(path, "room.json")) as f:
                    meta = json.load(f)
                proc = psutil.Process(int(meta["initPid"]))
                if abs(proc.create_time() - float(meta["initStart"])) < 0.01:
                    proc.kill()
                    proc.wait(5)
            except (OSError, ValueError, KeyError, psutil.Error):
                pass
            _remove_dir(path)
            cleaned.append(name)
        cleaned += [f"cgroup:{c}" for c in self.backend.reconcile(set())]
        return cleaned


def _remove_dir(path: str) -> None:
    # The room's mounts lived in its own mount namespace, which died with its last process: on
    # the host this is a plain directory of our own.
    shutil.rmtree(path, ignore_errors=True)
