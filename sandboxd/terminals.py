"""Terminals: a pty in a room, driven from the wire (issue 15, docs/interactive.md).

Theory of operation. ``openTerminal`` asks the room init for a pty pair of the room's own
devpts (``jail/ptyops.py``: the master and the slave come back as fds over the channel), then
starts the terminal's program as a run (``runs.run`` with ``RunSpec.tty``): its own cgroup
``room-<id>/runs/run-<r>``, a session leader with the slave as its stdin, stdout, stderr and
controlling terminal, as the room user asked for. Like a background process (``processes``) the
run belongs to a task the room owns, so it outlives the request, counts as one of the room's
active runs (quotas, the idle reaper), and dies with the room. The daemon drops its copy of
the slave once the program has it, and keeps the master:

  output  a reader task waits for the master to be readable, reads at most CHUNK bytes, appends
          them to the replay ring (the newest REPLAY_BYTES) and sends them as a
          ``terminal.output`` notification to the attached connection, *awaiting* the send: a
          client that does not read makes the server's send wait for it to drain, the reader
          stops reading, the pty's buffer fills and the program blocks in write(2). Nothing in
          the daemon grows without bound (the server drops a client that stalls for good).
          Detached, the reader keeps reading into the ring only.
  input   ``writeTerminal`` writes to the (non-blocking) master, waiting for room as needed.
  size    ``resizeTerminal``: TIOCSWINSZ on the master; the kernel sends SIGWINCH to the
          terminal's foreground process group.

One connection at a time is attached (the opener, then whoever called ``attachTerminal`` last:
it gets the ring replayed first, under the same lock the reader sends with, so no byte is lost
or repeated between replay and live output). When the attached connection goes away the
terminal waits ``terminal_grace_s`` for an attach, then is closed. ``closeTerminal`` hangs up:
the run is killed through its cgroup (the whole tree). When the program ends, what it left in
its cgroup is killed (``runs.run``), the rest of its output is read, ``terminal.exit`` is sent
and the terminal is gone; if nobody was attached it waits for the grace period so that a
reconnecting client still gets the replay and the exit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from . import errors, protocol, runs
from .jail import JailError
from .jail import messages as jm
from .jail.ptyops import set_size
from .processes import LogRing
from .rooms import iso

if TYPE_CHECKING:
    from .context import Notify, OnClose
    from .rooms import Room, RoomManager

log = logging.getLogger("sandboxd.terminals")

#: attachTerminal replays at most this much of what the program wrote (the Cloudflare SDK's)
REPLAY_BYTES = 256 * 1024
#: one terminal.output notification carries at most this many bytes
CHUNK = 16 * 1024
#: after the program ended, how long its last output may take to be read and sent
DRAIN_S = 2.0
#: how long closeTerminal waits for the run to report its end
CLOSE_WAIT_S = 10.0
#: the default program: the room's login shell
LOGIN_SHELL = ["/bin/sh", "-c",
               "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Sink:
    """The attached connection: where output goes, under which request id."""

    def __init__(self, notify: Notify, request_id: protocol.RequestId,
                 on_close: OnClose, gone: Callable[[Sink], None]) -> None:
        self.notify = notify
        self.request_id = request_id
        self.forget = on_close(lambda: gone(self))


class Terminal:
    def __init__(self, room: Room, terminal_id: str, master: int, tty: str, command: str,
                 cols: int, rows: int) -> None:
        self.room = room
        self.id = terminal_id
        self.master = master
        self.tty = tty
        self.command = command
        self.cols, self.rows = cols, rows
        self.created_at = time.time()
        self.pid = 0
        self.ring = LogRing(REPLAY_BYTES)
        self.sink: Sink | None = None
        self.lock = asyncio.Lock()  # sends: the reader's, attach's replay, the exit
        self.write_lock = asyncio.Lock()
        self.control = runs.RunControl()
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.grace: asyncio.TimerHandle | None = None
        self.grace_s = 60.0

    @property
    def ended(self) -> bool:
        return self.done.done()

    def info(self) -> protocol.TerminalInfo:
        fields: dict[str, Any] = {}
        if self.ended:
            fields = {"exit_code": self.exit_code if self.exit_code is not None else -1,
                      "signal": self.signal}
        return protocol.TerminalInfo(
            terminal_id=self.id, sandbox_id=self.room.id, pid=self.pid, tty=self.tty,
            command=self.command, cols=self.cols, rows=self.rows,
            status="exited" if self.ended else "running", attached=self.sink is not None,
            created_at=iso(self.created_at), **fields)

    # --- who gets the output -------------------------------------------------------------------

    def attach(self, sink: Sink) -> None:
        old, self.sink = self.sink, sink
        if old is not None:
            old.forget()
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None

    def _gone(self, sink: Sink) -> None:
        """The attached connection ended: wait for an attach, then close."""
        if self.sink is not sink:
            return
        self.sink = None
        self._start_grace()

    def _start_grace(self) -> None:
        if self.grace is None:
            self.grace = asyncio.get_running_loop().call_later(
                self.grace_s, lambda: self.room.track(close(self)))

    async def _send(self, data: bytes) -> None:
        """To the attached connection (under ``lock``); a dropped one detaches."""
        sink = self.sink
        if sink is None:
            return
        for i in range(0, len(data), CHUNK):
            try:
                await sink.notify(protocol.TerminalOutput(
                    request_id=sink.request_id, terminal_id=self.id,
                    data=base64.b64encode(data[i:i + CHUNK]).decode()))
            except (ConnectionError, OSError):
                self._gone(sink)
                return

    async def _send_exit(self) -> None:
        sink = self.sink
        if sink is None or not self.ended:
            return
        with contextlib.suppress(ConnectionError, OSError):
            await sink.notify(protocol.TerminalExit(
                request_id=sink.request_id, terminal_id=self.id,
                exit_code=self.exit_code if self.exit_code is not None else -1,
                signal=self.signal))

    async def replay(self) -> None:
        """The ring (and the exit, if it came) to the newly attached connection."""
        async with self.lock:
            data, _end, _cut = self.ring.read(self.ring.start)
            await self._send(data)
            if self.ended:
                await self._send_exit()
        if self.ended and self.sink is not None:
            self._drop()

    # --- the master ----------------------------------------------------------------------------

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = os.read(self.master, CHUNK)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(self.master, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(self.master)
                continue
            except OSError as err:
                if err.errno == errno.EIO:  # every slave fd is closed: the program is gone
                    return
                raise
            if not data:
                return
            async with self.lock:
                self.ring.append(data)
                await self._send(data)

    async def write(self, data: bytes) -> int:
        loop = asyncio.get_running_loop()
        async with self.write_lock:
            view = memoryview(data)
            while view:
                if self.ended:
                    break
                try:
                    n = os.write(self.master, view)
                except BlockingIOError:
                    ready: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(self.master, _wake, ready)
                    try:
                        either: list[asyncio.Future[None]] = [ready, self.done]
                        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        loop.remove_writer(self.master)
                    continue
                except OSError as err:
                    if err.errno == errno.EIO:
                        break
                    raise
                view = view[n:]
            return len(data) - len(view)

    def resize(self, cols: int, rows: int) -> None:
        if not self.ended:
            set_size(self.master, cols, rows)
        self.cols, self.rows = cols, rows

    def _drop(self) -> None:
        """Forget the terminal (its program ended and whoever wanted to know knows)."""
        if self.room.terminals.get(self.id) is self:
            del self.room.terminals[self.id]
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        if self.sink is not None:
            self.sink.forget()
            self.sink = None


def _new_id(room: Room) -> str:
    while True:
        tid = f"term-{secrets.token_hex(6)}"
        if tid not in room.terminals:
            return tid


def lookup(rooms: RoomManager, uid: int, terminal_id: str) -> Terminal:
    """The caller's terminal ``terminal_id`` (in any of its rooms); TERMINAL_NOT_FOUND."""
    for room in rooms.visible_rooms(uid):
        term = room.terminals.get(terminal_id)
        if term is not None:
            return term
    raise errors.TerminalNotFound(f"no terminal {terminal_id}", terminalId=terminal_id)


async def open_terminal(rooms: RoomManager, uid: int, room_id: str, argv: list[str] | None,
                        command: str, *, check_limits: Callable[[protocol.RunLimits, int | None],
                                                                None],
                        env: Mapping[str, str | None] | None, cwd: str | None, user: str,
                        cols: int, rows: int, notify: Notify,
                        request_id: protocol.RequestId, on_close: OnClose) -> Terminal:
    room = await rooms.get_or_create(uid, room_id)
    cfg = rooms.config
    live = [t for t in room.terminals.values() if not t.ended]
    if len(live) >= cfg.max_terminals_per_room:
        raise errors.QuotaExceeded("too many open terminals in this sandbox",
                                   limit=cfg.max_terminals_per_room, sandboxId=room.id,
                                   scope="terminals")
    merged: dict[str, str | None] = {"TERM": "xterm-256color", **(env or {})}
    # The spec is checked (identity, environment, limits) before anything exists in the room.
    runs.check_run_quotas(rooms, room, uid)
    spec0 = runs.prepare(rooms, room, argv or LOGIN_SHELL, check_limits=check_limits,
                         env=merged, cwd=cwd, stdin=b"", user=user, limits=None,
                         timeout_ms=None, on_output=None)
    try:
        reply, fds = await room.handle.request(jm.OpenPty(cols=cols, rows=rows), timeout=10)
    except (JailError, TimeoutError) as err:
        raise errors.room_failure(err, room.id, "open a pty") from err
    if isinstance(reply, jm.ErrorReply):
        if reply.errno == errno.ENOSPC:
            raise errors.QuotaExceeded("the sandbox has no pty left", sandboxId=room.id,
                                       scope="ptys")
        raise errors.InternalError(f"sandbox {room.id}: opening a pty failed: {reply.message}")
    master, slave = fds
    try:
        os.set_blocking(master, False)
        # Re-checked: another open may have passed the quotas while this one awaited the pty.
        if len([t for t in room.terminals.values() if not t.ended]) \
                >= cfg.max_terminals_per_room:
            raise errors.QuotaExceeded("too many open terminals in this sandbox",
                                       limit=cfg.max_terminals_per_room, sandboxId=room.id,
                                       scope="terminals")
        runs.check_run_quotas(rooms, room, uid)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    term = Terminal(room, _new_id(room), master, reply.name, command, cols, rows)
    term.grace_s = cfg.terminal_grace_s
    spec = runs.RunSpec(
        argv=spec0.argv, env=spec0.env, cwd=spec0.cwd, user=spec0.user,
        output_bytes=runs.DEFAULT_OUTPUT_BYTES, keep_output=False, control=term.control,
        tty=slave)
    # From here to the task, nothing awaits: the quotas above cannot be passed twice.
    room.terminals[term.id] = term
    term.attach(Sink(notify, request_id, on_close, term._gone))
    room.active_runs += 1
    task = asyncio.ensure_future(_supervise(room, term, spec, slave))
    room.track(task)
    started = term.control.spawned
    first: list[asyncio.Future[Any]] = [started, task]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if started.done() and not started.cancelled() and started.exception() is None:
        term.pid = started.result()
        return term
    await asyncio.wait([task])
    failure = started.exception() if started.done() and not started.cancelled() else None
    term._drop()
    if isinstance(failure, JailError) and not room.handle.alive:
        raise await rooms.lost(room, failure) from failure
    raise errors.InternalError(f"sandbox {room.id}: the terminal's program did not start"
                               + (f": {failure}" if failure else ""))


async def _supervise(room: Room, term: Terminal, spec: runs.RunSpec, slave: int) -> None:
    """The terminal's life: its run and its reader; then the exit, and the master closed."""
    reader: asyncio.Future[None] | None = None

    def spawned(_f: asyncio.Future[int]) -> None:
        # The program has the slave now (or never will): ours must go, or the master would
        # never read EIO once the program is gone.
        os.close(slave)

    term.control.spawned.add_done_callback(spawned)
    try:
        reader = asyncio.ensure_future(term.read_loop())
        res: runs.RunResult | None = None
        try:
            res = await runs.run(room, spec)
        except (JailError, errors.SandboxError) as err:
            log.info("room %s: terminal %s ended with its run: %s", room.key, term.id, err)
        if res is not None:
            term.exit_code, term.signal = res.exit_code, res.signal
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), DRAIN_S)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("room %s: terminal %s failed", room.key, term.id)
    finally:
        if not term.control.spawned.done():  # (its cgroup could not be made)
            term.control.spawned.set_exception(JailError("the terminal's run did not start"))
        room.active_runs -= 1
        room.touch()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
        with contextlib.suppress(OSError):
            os.close(term.master)
        if not term.done.done():
            term.done.set_result(None)
    async with term.lock:
        await term._send_exit()
    if term.sink is not None:
        term._drop()
    else:
        term._start_grace()  # a reconnecting client still gets the replay and the exit


async def close(term: Terminal) -> Terminal:
    """Hang up: the terminal's whole tree is killed (its run's cgroup); it is forgotten."""
    term.room.terminals.pop(term.id, None)
    if term.grace is not None:
        term.grace.cancel()
        term.grace = None
    if not term.ended:
        term.control.kill("closed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(term.done), CLOSE_WAIT_S)
    if term.sink is not None:
        term.sink.forget()
        term.sink = None
    return term


def decode_input(data: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as err:
        raise errors.ValidationError("data is not base64", field="data") from err
    if len(raw) > protocol.MAX_TERMINAL_WRITE:
        raise errors.ValidationError("too much data in one writeTerminal", field="data",
                                     maxBytes=protocol.MAX_TERMINAL_WRITE)
    return raw
