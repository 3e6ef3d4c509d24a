"""The jail: everything that turns a room spec into live namespaces, seen from the daemon.

    Zygote        the daemon's handle on the fork server (``zygote.py``): start, spawn, stop
    RoomHandle    the daemon's handle on one room init (``init.py``): spawn payloads, kill,
                  file operations, and the init's death (through a pidfd)

The room set-up order itself (one step per line, each constraint commented) lives where it runs:
``zygote._setup_process`` (cgroup, unshare, maps) and ``init.main``/``Init.setup`` (mounts,
network, hostname, serve). ``jail`` knows nothing of JSON-RPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import channel
from ._syscalls import pidfd_send_signal

log = logging.getLogger("sandboxd.jail")


class JailError(OSError):
    """The sandbox machinery failed (never the payload)."""


#: Wait statuses of room inits the zygote reported and nobody asked for yet (bounded).
EXIT_STATUSES_KEPT = 1024


class Zygote:
    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.chan: channel.AsyncChannel | None = None
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
        self.chan = channel.AsyncChannel(mine, self._event, self._closed)
        reply, _ = await self.chan.request({"op": "ping"}, timeout=30)
        if reply.get("op") != "pong":
            raise JailError("zygote did not answer its first ping")
        self._up.set()

    def _event(self, msg: dict[str, Any], fds: list[int]) -> None:
        # Also the replies to spawns whose caller went away: their fds are closed here.
        for fd in fds:
            os.close(fd)
        if msg.get("op") == "exited" and isinstance(msg.get("pid"), int):
            pid, status = int(msg["pid"]), int(msg.get("status", 0))
            waiter = self._exit_waiters.pop(pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(status)
                return
            self._exits[pid] = status
            while len(self._exits) > EXIT_STATUSES_KEPT:
                self._exits.popitem(last=False)

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

    def _closed(self) -> None:
        log.error("zygote channel closed")
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

    async def spawn(self, spec: dict[str, Any], timeout: float) -> tuple[int, socket.socket, int]:
        if not self.alive:
            try:  # it may be restarting (daemon._zygote_died)
                await asyncio.wait_for(self._up.wait(), timeout)
            except TimeoutError:
                raise JailError("zygote is not running") from None
        async with self._lock:
            if self.chan is None:
                raise JailError("zygote is not running")
            reply, fds = await self.chan.request({"op": "spawn", "spec": spec}, timeout=timeout)
        if "error" in reply or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            if reply.get(channel.TRUNCATED):
                raise JailError(errno.EMFILE, "room set-up failed: the daemon is out of file "
                                "descriptors")
            raise JailError(f"room set-up failed: {reply.get('error', 'no channel returned')}")
        return int(reply["pid"]), socket.socket(fileno=fds[0]), fds[1]

    async def stop(self) -> None:
        if self.chan:
            self.chan.close(notify=False)  # an orderly stop is not the zygote dying
        await self.reap()


class RoomHandle:
    """The daemon's side of one room init."""

    def __init__(self, room_id: str, pid: int, sock: socket.socket, pidfd: int) -> None:
        self.room_id = room_id
        self.pid = pid
        self.pidfd = pidfd
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._dead: asyncio.Future[None] = self._loop.create_future()
        self.exits: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.chan = channel.AsyncChannel(sock, self._event, self._closed)
        self._loop.add_reader(pidfd, self._pidfd_ready)

    # --- events -------------------------------------------------------------------------------

    def _event(self, msg: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        op = msg.get("op")
        if op == "exit":
            fut = self.exits.get(str(msg.get("run")))
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif op == "ready" and not self._ready.done():
            self._ready.set_result(msg)
        elif op == "failed" and not self._ready.done():
            self._ready.set_exception(JailError(f"room init failed: {msg.get('error')}"))

    def _closed(self) -> None:
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
        self.chan.close()

    @property
    def alive(self) -> bool:
        return not self._dead.done() and not self.chan.closed

    async def wait_ready(self, timeout: float) -> dict[str, Any]:
        return await asyncio.wait_for(asyncio.shield(self._ready), timeout)

    # --- requests -----------------------------------------------------------------------------

    async def request(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = (),
                      timeout: float | None = 30.0) -> tuple[dict[str, Any], list[int]]:
        try:
            return await self.chan.request(msg, fds, timeout=timeout)
        except channel.ChannelClosed as err:
            raise JailError(f"room {self.room_id} is gone") from err

    def expect_exit(self, run: str) -> asyncio.Future[dict[str, Any]]:
        """The future of ``run``'s exit event; make it before spawning so none is missed."""
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self.exits[run] = fut
        if not self.alive:
            fut.set_exception(JailError("room init died"))
        return fut

    async def spawn(self, run: str, argv: list[str], env: dict[str, str], cwd: str, user: str,
                    rlimits: dict[str, int], stdio: tuple[int, int, int],
                    cgroup_fds: list[int], pids_limited: bool = False) -> int:
        """Start a payload (after :meth:`expect_exit`); return its pid in the room."""
        reply, _ = await self.request(
            {"op": "spawn", "run": run, "argv": argv, "env": env, "cwd": cwd, "user": user,
             "rlimits": rlimits, "ncg": len(cgroup_fds), "pids_limited": pids_limited},
            [*stdio, *cgroup_fds])
        if "error" in reply:
            raise JailError(f"spawn failed in room {self.room_id}: {reply['error']}")
        return int(reply["pid"])

    def forget(self, run: str) -> None:
        self.exits.pop(run, None)

    async def kill_run(self, run: str, sig: int = signal.SIGKILL) -> None:
        try:
            await self.request({"op": "kill", "run": run, "sig": sig}, timeout=5)
        except (JailError, TimeoutError):
            pass

    async def killall(self) -> None:
        await self.request({"op": "killall"}, timeout=5)

    async def ping(self) -> dict[str, Any]:
        reply, _ = await self.request({"op": "ping"}, timeout=5)
        return reply

    # --- teardown -----------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL the init; the kernel then kills everything in the room's pid namespace."""
        if not self._dead.done():
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
