"""Parent/child channels: SOCK_SEQPACKET socketpairs carrying small msgpack messages and fds.

Each message is one datagram (a dict with an ``op``), with up to MAX_FDS descriptors attached
by SCM_RIGHTS. Bulk data never crosses the channel: pipes and open files are passed as fds and
read or written directly by the daemon, so a message stays far below the socket buffer.

The synchronous side (zygote, room init) uses :func:`send` / :func:`recv`; the daemon uses
:class:`AsyncChannel`, which dispatches replies by ``id`` and everything else to a callback.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import os
import socket
from collections.abc import Callable
from typing import Any

import msgspec

MAX_MSG = 256 * 1024
MAX_FDS = 16
#: key set on a received message whose fds the kernel truncated (see AsyncChannel)
TRUNCATED = "_fds_truncated"
_ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class ChannelClosed(ConnectionError):
    pass


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = _enc.encode(msg)
    if len(data) > MAX_MSG:
        raise ValueError(f"channel message of {len(data)} bytes exceeds {MAX_MSG}")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def _unpack(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        for fd in fds:
            os.close(fd)
        raise ChannelClosed("peer closed the channel")
    msg = _dec.decode(data)
    if not isinstance(msg, dict):
        for fd in fds:
            os.close(fd)
        raise ValueError("channel message is not a map")
    return msg, fds


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MSG, _ANC, socket.MSG_CMSG_CLOEXEC)
    return _unpack(data, ancdata)


class AsyncChannel:
    """Daemon side of a channel: request/reply by ``id``, events to ``on_event``."""

    def __init__(self, sock: socket.socket,
                 on_event: Callable[[dict[str, Any], list[int]], None],
                 on_close: Callable[[], None]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._on_event = on_event
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], list[int]]]] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)
        self.closed = False

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, anc, _f, _a = self.sock.recvmsg(MAX_MSG, _ANC, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()
                return
            try:
                msg, fds = _unpack(data, anc)
            except ChannelClosed:
                self.close()
                return
            except (ValueError, msgspec.DecodeError):
                self.close()  # a peer speaking garbage is a dead room
                return
            if _f & socket.MSG_CTRUNC:
                # The kernel dropped fds it could not install: this process is out of fds
                # (EMFILE). Callers say so instead of "malformed reply" (issue 23, D12).
                msg[TRUNCATED] = True
            fut = self._pending.pop(msg.get("re", -1), None) if "re" in msg else None
            if fut is not None:
                if not fut.done():
                    fut.set_result((msg, fds))
                else:
                    for fd in fds:
                        os.close(fd)
            else:
                self._on_event(msg, fds)

    async def request(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = (),
                      timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        if self.closed:
            raise ChannelClosed("channel is closed")
        rid = next(self._ids)
        fut: asyncio.Future[tuple[dict[str, Any], list[int]]] = self._loop.create_future()
        self._pending[rid] = fut
        try:
            send(self.sock, {**msg, "id": rid}, fds)
        except BlockingIOError:
            # The init is not draining its socket: it is wedged; treat as dead.
            self._pending.pop(rid, None)
            raise ChannelClosed("room init is not reading its channel") from None
        except OSError as err:
            self._pending.pop(rid, None)
            raise ChannelClosed(f"send to room init failed: {err}") from err
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.CancelledError:
            # Cancelled just as the reply came in (a destroy, a client gone): nobody will take
            # the fds it carried (a pidfd, a file) — close them rather than leak them.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                for fd in fut.result()[1]:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            raise
        finally:
            self._pending.pop(rid, None)

    def notify(self, msg: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        if not self.closed:
            try:
                send(self.sock, msg, fds)
            except OSError:
                self.close()

    def close(self, notify: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        if not notify:
            self._on_close = lambda: None
        try:
            self._loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        self.sock.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("room channel closed"))
        self._pending.clear()
        self._on_close()
