"""File watch, the daemon's half (issue 15; docs/interactive.md, "File watch"; the room init's
half is ``jail/watchops.py``).

Theory of operation. A watch is an inotify instance the room's init made (so the kernel counts
it and its marks under the room's inotify ceilings, never the daemon user's shared pool) whose
fd the daemon owns and reads on its event loop, a table from watch descriptor to directory, a
bounded queue of pending events, and one sender task:

* the **reader** (``loop.add_reader``) drains the kernel queue, turns each record into an event
  (path = its directory + name), drops what ``exclude``/``include`` rule out, and queues the rest.
  An event identical to one still pending is not queued twice (a storm of writes to one file is
  one ``modify``); past ``watch_queue_events`` pending events the rest are counted as dropped.
  So a client that reads slowly, or a room that makes 100k files, costs at most that many events
  of daemon memory, never more.
* a directory that appears (create, move_to) under a recursive watch is added by an ``AddWatch``
  of its own; what it already held by then (it may have been filled before its watch existed) is
  reported as ``create`` events, so ``mkdir -p a/b && touch a/b/f`` is seen whole.
* the **sender** waits ``COALESCE_S`` after the first pending event, then sends the queue as
  ``watch.event`` notifications under the watch call's request id. A notification that waits on a
  slow client stalls the sender only; the reader keeps draining into the bounded queue. Drops (the
  queue was full, or the kernel's own queue overflowed: IN_Q_OVERFLOW) are announced by one
  ``overflow`` event carrying the count.

A watch ends with ``unwatch``, with its connection (``Context.on_close``), or with the room
(``rooms._teardown_steps`` closes every watch first: inotify marks pin the room's filesystems).
Closing the fd removes every kernel watch at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import posixpath
import secrets
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import errors, protocol
from .jail import _syscalls as sc
from .jail import messages as jm
from .roomfiles import init_op

if TYPE_CHECKING:
    from .rooms import Room, RoomManager

log = logging.getLogger("sandboxd.watches")

DEFAULT_EXCLUDE = (".git", "node_modules")
#: how long the sender lets events gather after the first one (coalescing window)
COALESCE_S = 0.05
#: kernel records read per wake-up of the reader (then the loop runs other work)
READS_PER_WAKE = 16
_HEADER = struct.Struct("iIII")

Notify = Callable[[protocol.Notification], Awaitable[None]]
OnClose = Callable[[Callable[[], None]], Callable[[], None]]


def event_type(mask: int) -> str | None:
    if mask & sc.IN_CREATE:
        return "create"
    if mask & sc.IN_MODIFY:
        return "modify"
    if mask & sc.IN_DELETE:
        return "delete"
    if mask & sc.IN_MOVED_FROM:
        return "move_from"
    if mask & sc.IN_MOVED_TO:
        return "move_to"
    if mask & sc.IN_ATTRIB:
        return "attrib"
    return None


def parse(buf: bytes) -> list[tuple[int, int, str]]:
    """inotify records as (wd, mask, name)."""
    out = []
    off = 0
    while off + _HEADER.size <= len(buf):
        wd, mask, _cookie, size = _HEADER.unpack_from(buf, off)
        raw = buf[off + _HEADER.size:off + _HEADER.size + size].split(b"\0", 1)[0]
        out.append((wd, mask, raw.decode("utf-8", "replace")))
        off += _HEADER.size + size
    return out


class Filter:
    """``exclude``: globs on any component of the path below the watched directory;
    ``include``: globs on that relative path or on the file's name (none: everything)."""

    def __init__(self, root: str, include: list[str] | None, exclude: list[str] | None) -> None:
        self.root = root
        self.include = include or []
        self.exclude = list(DEFAULT_EXCLUDE) if exclude is None else exclude

    def relative(self, path: str) -> str:
        return posixpath.relpath(path, self.root) if path != self.root else ""

    def excluded_name(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.exclude)

    def admits(self, path: str) -> bool:
        rel = self.relative(path)
        if not rel:
            return True
        if any(self.excluded_name(part) for part in rel.split("/")):
            return False
        if not self.include:
            return True
        name = rel.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(name, g)
                   for g in self.include)


class Watch:
    def __init__(self, room: Room, watch_id: str, fd: int, root: str, recursive: bool,
                 flt: Filter, notify: Notify, request_id: protocol.RequestId, *,
                 max_dirs: int, max_queue: int) -> None:
        self.room = room
        self.id = watch_id
        self.fd = fd
        self.root = root
        self.recursive = recursive
        self.filter = flt
        self.notify = notify
        self.request_id = request_id
        self.max_dirs = max_dirs
        self.max_queue = max_queue
        self.dirs: dict[int, str] = {}
        self.truncated = False
        self.queue: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self.dropped = 0  # since the last overflow event
        self.dropped_total = 0
        self.sent = 0
        self.closed = False
        self.wake = asyncio.Event()
        self.new_dirs: OrderedDict[str, None] = OrderedDict()
        self.dirs_wake = asyncio.Event()
        self.forget: Callable[[], None] = lambda: None
        self.tasks: list[asyncio.Task[None]] = []

    # -- set-up

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.fd, self._readable)
        self.tasks = [asyncio.ensure_future(self._send_loop()),
                      asyncio.ensure_future(self._dirs_loop())]

    def adopt(self, reply: jm.Watched) -> None:
        for wd, path in reply.dirs:
            self.dirs[wd] = path
        self.truncated = self.truncated or reply.truncated

    async def add(self, path: str, *, report: bool) -> jm.Watched:
        left = self.max_dirs - len(self.dirs)
        if left <= 0:
            self.truncated = True
            return jm.Watched(path=path, dirs=[], truncated=True)
        reply, _ = await init_op(self.room, jm.AddWatch(
            path=path, recursive=self.recursive, exclude=self.filter.exclude, limit=left,
            report=report), path, fds=[self.fd])
        if not self.closed:
            self.adopt(reply)
        return reply

    # -- the reader

    def _readable(self) -> None:
        for _ in range(READS_PER_WAKE):
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError as err:
                log.warning("watch %s: reading inotify: %s", self.id, err)
                self.close()
                return
            if not buf:
                return
            for wd, mask, name in parse(buf):
                self._record(wd, mask, name)

    def _record(self, wd: int, mask: int, name: str) -> None:
        if mask & sc.IN_Q_OVERFLOW:
            self._drop()
            return
        if mask & sc.IN_IGNORED:
            self.dirs.pop(wd, None)
            return
        base = self.dirs.get(wd)
        if base is None:
            return
        is_dir = bool(mask & sc.IN_ISDIR)
        if mask & sc.IN_DELETE_SELF:
            if base == self.root:  # (below the root, the parent reports the delete)
                self.queue_event("delete", base, True)
            return
        kind = event_type(mask)
        if kind is None or not name:
            return
        path = f"{base.rstrip('/')}/{name}"
        self.queue_event(kind, path, is_dir)
        if is_dir and self.recursive and kind in ("create", "move_to") \
                and not self.filter.excluded_name(name) and len(self.new_dirs) < self.max_dirs:
            self.new_dirs[path] = None
            self.dirs_wake.set()

    def queue_event(self, kind: str, path: str, is_dir: bool) -> None:
        if self.closed or not self.filter.admits(path):
            return
        key = (kind, path)
        if key in self.queue:
            return  # coalesced with the one still pending
        if len(self.queue) >= self.max_queue:
            self._drop()
            return
        self.queue[key] = is_dir
        self.wake.set()

    def _drop(self) -> None:
        self.dropped += 1
        self.dropped_total += 1
        self.wake.set()

    # -- the tasks

    async def _dirs_loop(self) -> None:
        while not self.closed:
            await self.dirs_wake.wait()
            self.dirs_wake.clear()
            while self.new_dirs and not self.closed:
                path, _ = self.new_dirs.popitem(last=False)
                try:
                    reply = await self.add(path, report=True)
                except errors.SandboxError:
                    continue  # gone already (or the room is going)
                for sub, is_dir in reply.found:
                    self.queue_event("create", sub, is_dir)

    async def _send_loop(self) -> None:
        try:
            while not self.closed:
                await self.wake.wait()
                await asyncio.sleep(COALESCE_S)
                self.wake.clear()
                while self.queue and not self.closed:
                    (kind, path), is_dir = self.queue.popitem(last=False)
                    await self.notify(protocol.WatchEvent(
                        request_id=self.request_id, watch_id=self.id, event_type=kind,
                        path=path, is_directory=is_dir))
                    self.sent += 1
                if self.dropped and not self.closed:
                    dropped, self.dropped = self.dropped, 0
                    await self.notify(protocol.WatchEvent(
                        request_id=self.request_id, watch_id=self.id, event_type="overflow",
                        path=self.root, is_directory=True, dropped=dropped))
        except (ConnectionError, OSError):
            self.close()  # the connection went: so does the watch

    # -- the end

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if self.room.watches.get(self.id) is self:
            del self.room.watches[self.id]
        self.forget()

    def result(self) -> protocol.WatchResult:
        return protocol.WatchResult(watch_id=self.id, path=self.root,
                                    directories=len(self.dirs), truncated=self.truncated)


async def start(rooms: RoomManager, uid: int, room_id: str, path: str, *, recursive: bool,
                include: list[str] | None, exclude: list[str] | None, notify: Notify,
                request_id: protocol.RequestId, on_close: OnClose) -> Watch:
    room = await rooms.get_or_create(uid, room_id)
    cfg = rooms.config
    if len(room.watches) >= cfg.max_watches_per_room:
        raise errors.QuotaExceeded("too many watches in this sandbox",
                                   limit=cfg.max_watches_per_room, sandboxId=room.id,
                                   scope="watches")
    _, fds = await init_op(room, jm.NewInotify(), path)
    fd = fds[0]
    os.set_blocking(fd, False)
    flt = Filter(path, include, exclude)
    watch = Watch(room, f"w-{secrets.token_hex(8)}", fd, path, recursive, flt, notify,
                  request_id, max_dirs=cfg.max_watch_dirs, max_queue=cfg.watch_queue_events)
    room.watches[watch.id] = watch  # (counted against the ceiling before the next await)
    try:
        reply, _ = await init_op(room, jm.AddWatch(
            path=path, recursive=recursive, exclude=flt.exclude, limit=cfg.max_watch_dirs),
            path, fds=[fd])
        watch.root = flt.root = reply.path
        watch.adopt(reply)
    except BaseException:
        watch.close()
        raise
    if room.status != "ready" and room.status != "creating":
        watch.close()
        raise errors.SandboxUnavailable(f"sandbox {room.id} is going", sandboxId=room.id)
    watch.forget = on_close(watch.close)
    watch.start()
    return watch


def lookup(room: Room, watch_id: str) -> Watch:
    watch = room.watches.get(watch_id)
    if watch is None:
        raise errors.WatchNotFound(f"no watch {watch_id} in sandbox {room.id}",
                                   watchId=watch_id, sandboxId=room.id)
    return watch


__all__ = ["Filter", "Watch", "lookup", "parse", "start"]
