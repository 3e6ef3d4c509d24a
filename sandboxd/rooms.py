"""RoomManager: room ids, ownership, lifecycle (creating -> ready -> stopping -> gone), reaping.

A room is created lazily on first use of its id (``getSandbox`` or any room method), owned by the
uid that created it (from SO_PEERCRED), and destroyed on ``destroy``, after ``idle_timeout_s``
without activity, when its init dies, or at daemon shutdown. Creation steps, in order:

1. the room's cgroup, with its limits (fail closed: an explicitly requested limit this host cannot
   enforce refuses the room with LIMIT_UNAVAILABLE, naming it);
2. the room's state directory ``<state>/rooms/<id>/`` (``mnt/`` is where the init mounts the
   room's tmpfs — inside the room's mount namespace only — and ``room.json`` lets a restarted
   daemon find and kill what a crashed one left);
3. the zygote forks the init, which joins the cgroup, unshares, builds the filesystem, says ready.

Destruction undoes these in reverse; every step is idempotent so that a half-created room and a
crashed daemon's leftovers are cleaned by the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

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
from .jail import JailError, RoomHandle, Zygote
from .jail import cgroup as cgroups
from .jail import user as idmaps

log = logging.getLogger("sandboxd.rooms")

# Wire names of room limits -> the cgroup backend's limit names (diskBytes is the tmpfs size,
# enforced everywhere).
LIMIT_CONTROLLER = {"memoryBytes": "memory", "cpus": "cpus", "pids": "pids"}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


class Room:
    def __init__(self, room_id: str, owner: int, options: RoomOptions, state_dir: str) -> None:
        self.id = room_id
        self.owner = owner
        self.options = options
        self.status = "creating"
        self.created_at = time.time()
        self.last_activity = time.monotonic()
        self.last_activity_wall = self.created_at
        self.dir = os.path.join(state_dir, "rooms", room_id)
        self.handle: RoomHandle = None  # type: ignore[assignment]  # set once ready
        self.cgroup: Any = None
        self.ids: idmaps.IdMap | None = None  # its own id slice (subordinate mode)
        self.active_runs = 0
        self._pending: set[asyncio.Future[Any]] = set()
        self.watcher: asyncio.Future[None] | None = None

    def touch(self) -> None:
        self.last_activity = time.monotonic()
        self.last_activity_wall = time.time()

    def track(self, fut: Awaitable[Any]) -> None:
        f = asyncio.ensure_future(fut)
        self._pending.add(f)
        f.add_done_callback(self._pending.discard)

    async def settle(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def run_cgroup_limits(self, memory_bytes: int | None, pids: int | None) -> Any:
        return cgroups.RunCgroupLimits(memory_bytes=memory_bytes, pids=pids)

    def options_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self.options)
        return out

    def describe(self) -> dict[str, Any]:
        return {"sandboxId": self.id, "status": self.status, "createdAt": iso(self.created_at),
                "lastActivityAt": iso(self.last_activity_wall)}


class RoomManager:
    def __init__(self, config: DaemonConfig, backend: Any, zygote: Zygote,
                 ids: idmaps.IdPlan, seccomp_bpf: bytes | None = None) -> None:
        self.config = config
        self.backend = backend
        self.zygote = zygote
        self.ids = ids
        self.seccomp_bpf = seccomp_bpf
        self.rooms: dict[str, Room] = {}
        self._creating: dict[str, asyncio.Future[Room]] = {}
        self._daemon_uid = os.getuid()
        self.closing = False
        os.makedirs(os.path.join(config.state_dir, "rooms"), mode=0o700, exist_ok=True)

    # --- lookup -------------------------------------------------------------------------------

    def _visible(self, room: Room, uid: int) -> bool:
        return uid in (0, self._daemon_uid, room.owner)

    def get(self, uid: int, room_id: str) -> Room:
        check_sandbox_id(room_id)
        room = self.rooms.get(room_id)
        if room is None or not self._visible(room, uid) or room.status != "ready":
            raise errors.SandboxNotFound(f"sandbox {room_id} not found", sandboxId=room_id)
        return room

    def visible_rooms(self, uid: int) -> list[Room]:
        return [r for r in self.rooms.values() if self._visible(r, uid)]

    async def get_or_create(self, uid: int, room_id: str,
                            options: dict[str, Any] | None = None) -> Room:
        check_sandbox_id(room_id)
        if self.closing:
            raise errors.ShuttingDown("sandboxd is shutting down")
        room = self.rooms.get(room_id)
        if room is not None:
            if not self._visible(room, uid):
                raise errors.SandboxNotFound(f"sandbox {room_id} not found", sandboxId=room_id)
            if room.status == "ready" and room.handle.alive:
                room.touch()
                return room
        pending = self._creating.get(room_id)
        if pending is None:
            owned = sum(1 for r in self.rooms.values() if r.owner == uid)
            if owned >= self.config.max_rooms_per_uid and uid not in (0, self._daemon_uid):
                raise errors.QuotaExceeded("too many sandboxes for this user",
                                           limit=self.config.max_rooms_per_uid)
            pending = asyncio.ensure_future(self._create(uid, room_id, options))
            self._creating[room_id] = pending
            pending.add_done_callback(lambda _f: self._creating.pop(room_id, None))
        room = await asyncio.shield(pending)
        if not self._visible(room, uid):
            raise errors.SandboxNotFound(f"sandbox {room_id} not found", sandboxId=room_id)
        room.touch()
        return room

    # --- lifecycle ----------------------------------------------------------------------------

    async def _create(self, uid: int, room_id: str, raw_options: dict[str, Any] | None) -> Room:
        old = self.rooms.get(room_id)
        if old is not None:  # its init died: clear it before reusing the id
            await self._teardown(old)
        options, asked = resolve_options(raw_options, self.config.room_defaults,
                                         self.config.room_limits_max)
        enforceable = self.backend.enforceable()
        for name in sorted(asked):
            ctl = LIMIT_CONTROLLER.get(name)
            if ctl is not None and ctl not in enforceable:
                raise errors.LimitUnavailable(
                    f"limit {name} cannot be enforced here (cgroup backend "
                    f"{self.backend.name} cannot enforce {ctl})", limit=name)
        room = Room(room_id, uid, options, self.config.state_dir)
        self.rooms[room_id] = room
        t0 = time.monotonic()
        try:
            try:
                room.ids = self.ids.acquire()
            except idmaps.SlicesExhausted as err:
                raise errors.QuotaExceeded(
                    f"no free id slice for a new sandbox ({err}); destroy a sandbox or give the "
                    "daemon's user a larger subordinate range (sandboxctl setup)",
                    limit=self.ids.slices) from err
            room.cgroup = self.backend.create_room(room_id, options.limits)
            mnt = os.path.join(room.dir, "mnt")
            os.makedirs(mnt, mode=0o700, exist_ok=True)
            spec = {
                "room_id": room_id, "rootfs": self.config.rootfs, "scratch": mnt,
                "disk_bytes": options.limits.disk_bytes, "hostname": "sandbox",
                "cgroup_procs": room.cgroup.procs_paths(),
                "cgroup_home_by_dir": room.cgroup.joined_by_dir, "ids": room.ids.wire(),
                "seccomp_bpf": self.seccomp_bpf,
            }
            pid, sock, pidfd = await self.zygote.spawn(spec, self.config.room_start_timeout_s)
            room.handle = RoomHandle(room_id, pid, sock, pidfd)
            self._write_meta(room, pid)
            await room.handle.wait_ready(self.config.room_start_timeout_s)
        except errors.SandboxError:
            await self._teardown(room)
            raise
        except (JailError, OSError, TimeoutError) as err:
            log.error("room %s: creation failed: %s", room_id, err)
            await self._teardown(room)
            raise errors.InternalError(f"could not create sandbox {room_id}: {err}",
                                       sandboxId=room_id) from err
        except BaseException:
            await self._teardown(room)
            raise
        room.status = "ready"
        room.watcher = asyncio.ensure_future(self._watch(room))
        log.info("room %s ready for uid %d in %.1f ms", room_id, uid, (time.monotonic() - t0) * 1e3)
        return room

    async def _watch(self, room: Room) -> None:
        """Tear a room down when its init dies under it (OOM killer, a bug, an attack)."""
        await room.handle.wait_dead(timeout=None)
        if room.status == "ready" and self.rooms.get(room.id) is room:
            log.warning("room %s: init died; tearing the room down", room.id)
            await self._teardown(room)

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
        room = self.rooms.get(room_id)
        if room is None or not self._visible(room, uid):
            return False
        await self._teardown(room)
        return True

    async def _teardown(self, room: Room) -> None:
        if room.status in ("stopping", "gone"):
            while room.status == "stopping":
                await asyncio.sleep(0.01)
            return
        room.status = "stopping"
        loop = asyncio.get_running_loop()
        try:
            if room.handle is not None:
                room.handle.kill()
                if not await room.handle.wait_dead(5.0):
                    log.error("room %s: init did not die within 5 s", room.id)
                    room.ids = None  # its slice stays held: never reuse ids a live process has
                room.handle.close()
            await room.settle()
            if room.cgroup is not None:
                await loop.run_in_executor(None, room.cgroup.destroy)
        except Exception:
            log.exception("room %s: teardown step failed", room.id)
        finally:
            await loop.run_in_executor(None, _remove_dir, room.dir)
            # Only once the init is dead (or given up on: then the slice is quarantined at the
            # next start) may another room get these host ids.
            self.ids.release(room.ids)
            room.status = "gone"
            if self.rooms.get(room.id) is room:
                del self.rooms[room.id]
            log.info("room %s destroyed", room.id)

    async def shutdown(self) -> None:
        self.closing = True
        for fut in list(self._creating.values()):
            with contextlib.suppress(BaseException):
                await fut
        await asyncio.gather(*(self._teardown(r) for r in list(self.rooms.values())),
                             return_exceptions=True)

    async def reap_idle(self) -> None:
        timeout = self.config.idle_timeout_s
        if timeout <= 0:
            return
        while not self.closing:
            await asyncio.sleep(min(30.0, timeout / 4))
            now = time.monotonic()
            for room in list(self.rooms.values()):
                if room.status == "ready" and room.active_runs == 0 \
                        and now - room.last_activity > timeout:
                    log.info("room %s idle for %.0f s: destroying", room.id,
                             now - room.last_activity)
                    await self._teardown(room)

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
