"""The daemon's side of the jail: its handles on the zygote and on each room init.

    AsyncChannel  a channel (``channel.py`` framing) on the daemon's event loop: requests
                  matched to their replies by ``id``/``re``, events to a callback
    Zygote        the fork server (``zygote.py``): start, spawn rooms, stop
    RoomHandle    one room init (``init.py``): spawn payloads, kill, file operations, and the
                  init's death (through a pidfd)

What crosses each channel is declared in ``messages.py``. The rule both handles keep: a peer
that sends what does not decode (``channel.BadMessage``), a reply of the wrong type for its
request, or the wrong number of fds, is broken. The channel closes; a room init is then killed
(a room without its channel is a dead room: the next call on it is SANDBOX_UNAVAILABLE), the
zygote is restarted by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec

from . import JailError, channel, messages
from ._syscalls import pidfd_send_signal
from .messages import ErrorReply, Message, Reply, Request

log = logging.getLogger("sandboxd.jail")

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Reply)

#: The reason of a channel the daemon closed itself (a teardown, a stop).
CLOSED_BY_US = "closed by the daemon"
#: The reason of a channel whose peer closed its end: a room init does so only by exiting.
PEER_CLOSED = "the peer closed the channel"
#: Wait statuses of room inits the zygote reported and nobody asked for yet (bounded).
EXIT_STATUSES_KEPT = 1024


class FdsTruncated(OSError):
    """A reply's fds were dropped by the kernel (MSG_CTRUNC): this process is out of fds."""

    def __init__(self) -> None:
        super().__init__(errno.EMFILE, "the daemon is out of file descriptors")


class AsyncChannel(Generic[M]):
    """Daemon side of a channel: request/reply by ``id``, events to ``on_event``; anything the
    peer sends that is not one of ``decoder``'s messages closes it (``on_close(reason)``)."""

    def __init__(self, sock: socket.socket, decoder: msgspec.msgpack.Decoder[M],
                 on_event: Callable[[M], None], on_close: Callable[[str], None]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._decoder = decoder
        self._on_event = on_event
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[M, list[int]]]] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False
        self.reason = ""

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, anc, flags, _a = self.sock.recvmsg(channel.MAX_MSG, channel.ANC,
                                                         socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.close(f"recvmsg failed: {err}")
                return
            try:
                msg, fds = channel.unpack(data, anc, self._decoder)
            except channel.ChannelClosed:
                self.close(PEER_CLOSED)
                return
            except channel.BadMessage as err:
                self.close(str(err))  # a peer speaking garbage is a dead room
                return
            if len(fds) != msg.nfds:
                channel.close_fds(fds)
                if flags & socket.MSG_CTRUNC and isinstance(msg, Reply):
                    # The kernel dropped fds it could not install: this process is out of fds
                    # (EMFILE). Callers say so instead of "malformed reply" (issue 23, D12).
                    fut = self._pending.pop(msg.re, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(FdsTruncated())
                    continue
                self.close(f"{type(msg).__name__} came with {len(fds)} fds, not {msg.nfds}")
                return
            if isinstance(msg, Reply):
                fut = self._pending.pop(msg.re, None)
                if fut is not None and not fut.done():
                    fut.set_result((msg, fds))
                else:  # its caller went away (a timeout, a client gone): nobody takes the fds
                    channel.close_fds(fds)
            else:
                self._on_event(msg)

    async def request(self, msg: Request[R], fds: list[int] | tuple[int, ...] = (),
                      timeout: float | None = None) -> tuple[R | ErrorReply, list[int]]:
        """Send ``msg`` (with ``fds``, which stay the caller's) and wait for its reply: the
        type the request declares, or an ErrorReply. Any other reply closes the channel."""
        if self.closed:
            raise channel.ChannelClosed(f"channel is closed: {self.reason}")
        rid = next(self._ids)
        fut: asyncio.Future[tuple[M, list[int]]] = self._loop.create_future()
        self._pending[rid] = fut
        try:
            channel.send(self.sock, msgspec.structs.replace(msg, id=rid), fds)
        except BlockingIOError:
            # The peer is not draining its socket: it is wedged; treat as dead.
            self._pending.pop(rid, None)
            raise channel.ChannelClosed("the peer is not reading its channel") from None
        except OSError as err:
            self._pending.pop(rid, None)
            raise channel.ChannelClosed(f"send failed: {err}") from err
        except BaseException:  # (a message over MAX_MSG: ValueError)
            self._pending.pop(rid, None)
            raise
        try:
            reply, got = await asyncio.wait_for(fut, timeout)
        except asyncio.CancelledError:
            # Cancelled just as the reply came in (a destroy, a client gone): nobody will take
            # the fds it carried (a pidfd, a file) — close them rather than leak them.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                channel.close_fds(fut.result()[1])
            raise
        finally:
            self._pending.pop(rid, None)
        expected = messages.reply_type(type(msg))
        if isinstance(reply, (expected, ErrorReply)):
            return reply, got
        channel.close_fds(got)
        why = f"{type(reply).__name__} in answer to {type(msg).__name__}"
        self.close(why)
        raise channel.ChannelClosed(f"protocol violation: {why}")

    def close(self, reason: str = CLOSED_BY_US, notify: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        if not notify:
            self._on_close = lambda _reason: None
        try:
            self._loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(channel.ChannelClosed(reason))
        self._pending.clear()
        self._on_close(reason)


class Zygote:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: AsyncChannel[messages.FromZygote] | None = None
        self._lock = asyncio.Lock()
        self.on_death: Callable[[], None] | None = None
        #: Bumped at every (re)start: a room made by an earlier zygote lost its init with it.
        self.generation = 0
        self._exits: OrderedDict[int, int] = OrderedDict()
        self._exit_waiters: dict[int, asyncio.Future[int]] = {}
        self._up = asyncio.Event()

    async def start(self) -> None:
        self.generation += 1
        mine, theirs = channel.pair()
        # The zygote is exec'd fresh (never a fork of this multi-threaded-capable event loop
        # process) and inherits exactly one fd: its end of the channel.
        # -I and cwd "/": sys.path[0] would otherwise be the daemon's cwd, a directory a room's
        # host uid might be able to write (issue 10, L3); the room inits are forks of this.
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "sandboxd.jail.zygote", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True, cwd="/")
        except BaseException:
            mine.close()  # (a restart under EMFILE must not leak the pair)
            raise
        finally:
            theirs.close()
        self.chan = AsyncChannel(mine, messages.from_zygote, self._event, self._closed)
        reply, _ = await self.chan.request(messages.Ping(), timeout=30)
        if not isinstance(reply, messages.Pong):
            raise JailError("zygote did not answer its first ping")
        self._up.set()

    def _event(self, msg: messages.FromZygote) -> None:
        match msg:
            case messages.Exited(pid=pid, status=status):
                waiter = self._exit_waiters.pop(pid, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(status)
                    return
                self._exits[pid] = status
                while len(self._exits) > EXIT_STATUSES_KEPT:
                    self._exits.popitem(last=False)
            case _:  # (replies never reach here: the channel routes them)
                pass

    async def exit_status(self, pid: int, timeout: float) -> int | None:
        """The wait status of room init ``pid`` as the zygote reaped it; None if it does not
        say within ``timeout`` (the zygote itself died, or is busy)."""
        if pid in self._exits:
            return self._exits.pop(pid)
        if self.chan is None or self.chan.closed:
            return None
        fut = self._exit_waiters.get(pid)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._exit_waiters[pid] = fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return None
        finally:
            if self._exit_waiters.get(pid) is fut and not fut.done():
                del self._exit_waiters[pid]

    def forget(self, pid: int) -> None:
        self._exits.pop(pid, None)
        fut = self._exit_waiters.pop(pid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    @property
    def alive(self) -> bool:
        return self.chan is not None and not self.chan.closed

    def _closed(self, reason: str) -> None:
        log.error("zygote channel closed: %s", reason)
        self._up.clear()
        for fut in self._exit_waiters.values():
            if not fut.done():
                fut.cancel()
        self._exit_waiters.clear()
        if self.on_death:
            self.on_death()

    async def reap(self) -> int | None:
        """Kill and reap the zygote process (no executor thread: this runs when resources may
        be short); its exit code, or None if it would not go within 5 s."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        for _ in range(500):
            code = proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.01)
        return None

    async def spawn(self, spec: messages.RoomSpec,
                    timeout: float) -> tuple[int, socket.socket, int]:
        if not self.alive:
            try:  # it may be restarting (daemon._zygote_died)
                await asyncio.wait_for(self._up.wait(), timeout)
            except TimeoutError:
                raise JailError("zygote is not running") from None
        async with self._lock:
            if self.chan is None:
                raise JailError("zygote is not running")
            try:
                reply, fds = await self.chan.request(messages.SpawnRoom(spec=spec),
                                                     timeout=timeout)
            except FdsTruncated:
                raise JailError(errno.EMFILE, "room set-up failed: the daemon is out of file "
                                "descriptors") from None
        if isinstance(reply, ErrorReply):
            raise JailError(f"room set-up failed: {reply.message}")
        return reply.pid, socket.socket(fileno=fds[0]), fds[1]

    async def stop(self) -> None:
        if self.chan:
            self.chan.close("the daemon stops", notify=False)  # not the zygote dying
        await self.reap()


class RoomHandle:
    """The daemon's side of one room init."""

    def __init__(self, room_id: str, pid: int, sock: socket.socket, pidfd: int) -> None:
        self.room_id = room_id
        self.pid = pid
        self.pidfd = pidfd
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[messages.Ready] = self._loop.create_future()
        # (a handle closed during set-up whose creator went away: no "never retrieved" noise)
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._dead: asyncio.Future[None] = self._loop.create_future()
        self.exits: dict[str, asyncio.Future[messages.Exit]] = {}
        self.chan: AsyncChannel[messages.FromInit] = AsyncChannel(
            sock, messages.from_init, self._event, self._closed)
        self._loop.add_reader(pidfd, self._pidfd_ready)

    # --- events -------------------------------------------------------------------------------

    def _event(self, msg: messages.FromInit) -> None:
        match msg:
            case messages.Exit(run=run):
                fut = self.exits.get(run)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            case messages.Ready():
                if not self._ready.done():
                    self._ready.set_result(msg)
            case messages.Failed(error=error):
                if not self._ready.done():
                    self._ready.set_exception(JailError(f"room init failed: {error}"))
            case _:  # (replies never reach here: the channel routes them)
                pass

    def _closed(self, reason: str) -> None:
        if not self._dead.done():
            # A room without its channel is a dead room, whatever the init still does: kill it
            # (its pidfd then reports the death). Usually it is dying already: a teardown
            # killed it, or it exited (EOF comes before the pidfd says so); otherwise it broke
            # the protocol, which is worth an error in the log.
            if reason not in (CLOSED_BY_US, PEER_CLOSED):
                log.error("room %s: init channel closed (%s): killing the init", self.room_id,
                          reason)
            self.kill()
        if not self._ready.done():
            self._ready.set_exception(JailError("room init closed its channel during set-up"))
        for fut in self.exits.values():
            if not fut.done():
                fut.set_exception(JailError("room init died"))

    def _pidfd_ready(self) -> None:
        try:
            self._loop.remove_reader(self.pidfd)
        except (ValueError, OSError):
            pass
        if not self._dead.done():
            self._dead.set_result(None)
        self.chan.close("the room init died")

    @property
    def alive(self) -> bool:
        return not self._dead.done() and not self.chan.closed

    async def wait_ready(self, timeout: float) -> messages.Ready:
        return await asyncio.wait_for(asyncio.shield(self._ready), timeout)

    # --- requests -----------------------------------------------------------------------------

    async def request(self, msg: Request[R], fds: list[int] | tuple[int, ...] = (),
                      timeout: float | None = 30.0) -> tuple[R | ErrorReply, list[int]]:
        try:
            return await self.chan.request(msg, fds, timeout=timeout)
        except channel.ChannelClosed as err:
            raise JailError(f"room {self.room_id} is gone ({err})") from err

    def expect_exit(self, run: str) -> asyncio.Future[messages.Exit]:
        """The future of ``run``'s exit event; make it before spawning so none is missed."""
        fut: asyncio.Future[messages.Exit] = self._loop.create_future()
        self.exits[run] = fut
        if not self.alive:
            fut.set_exception(JailError("room init died"))
        return fut

    async def spawn(self, run: str, argv: list[str], env: dict[str, str], cwd: str, user: str,
                    rlimits: dict[str, int], stdio: tuple[int, int, int],
                    cgroup_fds: list[int], pids_limited: bool = False, tty: bool = False) -> int:
        """Start a payload (after :meth:`expect_exit`); return its pid in the room."""
        if user not in ("root", "sandbox"):
            raise JailError(errno.EINVAL, f"no such room user {user!r}")
        reply, _ = await self.request(
            messages.Spawn(run=run, argv=argv, env=env, cwd=cwd,
                           user="sandbox" if user == "sandbox" else "root", rlimits=rlimits,
                           ncg=len(cgroup_fds), pids_limited=pids_limited, tty=tty),
            [*stdio, *cgroup_fds])
        if isinstance(reply, ErrorReply):
            raise JailError(f"spawn failed in room {self.room_id}: {reply.message}")
        return reply.pid

    def forget(self, run: str) -> None:
        self.exits.pop(run, None)

    async def kill_run(self, run: str, sig: int = signal.SIGKILL) -> None:
        try:
            await self.request(messages.Kill(run=run, sig=sig), timeout=5)
        except (JailError, TimeoutError):
            pass

    async def killall(self) -> None:
        await self.request(messages.KillAll(), timeout=5)

    async def ping(self) -> messages.Pong:
        reply, _ = await self.request(messages.Ping(), timeout=5)
        if isinstance(reply, ErrorReply):
            raise JailError(f"room {self.room_id}: ping failed: {reply.message}")
        return reply

    # --- teardown -----------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the init; the kernel then kills everything in the room's pid namespace."""
        if not self._dead.done() and self.pidfd >= 0:
            try:
                pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except OSError as err:
                log.warning("pidfd_send_signal on room %s init: %s", self.room_id, err)

    async def wait_dead(self, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._dead), timeout)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.chan.close()
        try:
            self._loop.remove_reader(self.pidfd)
        except (ValueError, OSError):
            pass
        try:
            os.close(self.pidfd)
        except OSError:
            pass
        self.pidfd = -1
