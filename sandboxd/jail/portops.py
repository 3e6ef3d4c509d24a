"""Connections into the room's ports, made by the room init (``messages.Connect``).

Theory of operation. A room has its own network namespace with loopback only: nothing on the
host can route to it. The room init lives in that namespace, so it is the one process that can
connect to a server a payload runs there. For each ``Connect`` it opens a non-blocking TCP
socket to 127.0.0.1:PORT (then ::1, if that is refused or the room has no IPv6 loopback) and, as
soon as the kernel says the connect finished, hands the connected socket to the daemon as the
reply's fd (SCM_RIGHTS); the daemon reads and writes it directly (``sandboxd/ports.py``). The
init never reads or writes a byte of it.

A loopback connect completes or is refused at once, unless the server's accept backlog is full:
then it stays in progress, and the init must not wait for it — a :class:`Connector` is polled
by the init's loop (EVENT_WRITE) like any job, with a deadline after which it answers ETIMEDOUT.
Imported by the room init: the standard library only.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from . import messages

#: Tried in order; the next one when a connect is refused (or the family does not exist here).
ADDRESSES = (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6))
_NEXT = frozenset((errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.ENETUNREACH,
                   errno.EAFNOSUPPORT, errno.EHOSTUNREACH))


class Connector:
    """One ``Connect`` in progress. :meth:`start` and :meth:`step` return the reply once the
    socket is connected, None while it is in progress (poll :attr:`fd` for writing, which may
    change between calls), or raise the OSError to answer."""

    def __init__(self, msg: messages.Connect, now: float | None = None) -> None:
        if not 1 <= msg.port <= 65535:
            raise OSError(errno.EINVAL, f"port {msg.port} is not in 1-65535")
        self.msg = msg
        self.deadline = (time.monotonic() if now is None else now) + max(msg.timeout_ms, 1) / 1e3
        self.sock: socket.socket | None = None
        self._next = 0
        self._address = ""

    @property
    def fd(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def start(self) -> messages.Connected | None:
        while self._next < len(ADDRESSES):
            address, family = ADDRESSES[self._next]
            self._next += 1
            self._drop()
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                     | socket.SOCK_CLOEXEC)
            except OSError as err:
                if err.errno in _NEXT:
                    continue
                raise
            self.sock, self._address = sock, address
            num = sock.connect_ex((address, self.msg.port))
            if num == 0:
                return self._connected()
            if num in (errno.EINPROGRESS, errno.EAGAIN):
                return None
            if num not in _NEXT:
                raise OSError(num, f"connect to {address} port {self.msg.port}: "
                              f"{os.strerror(num)}")
        self._drop()
        raise OSError(errno.ECONNREFUSED, f"nothing listens on port {self.msg.port} in the "
                      "room (127.0.0.1, ::1)")

    def step(self) -> messages.Connected | None:
        """The socket became writable: the connect finished, one way or the other."""
        if self.sock is None:
            return self.start()
        num = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if num == 0:
            return self._connected()
        if num in _NEXT:
            return self.start()
        raise OSError(num, f"connect to {self._address} port {self.msg.port}: "
                      f"{os.strerror(num)}")

    def expired(self, now: float) -> bool:
        return now >= self.deadline

    def timeout_error(self) -> OSError:
        return OSError(errno.ETIMEDOUT, f"connect to port {self.msg.port} in the room did not "
                       f"complete within {self.msg.timeout_ms} ms (its accept backlog is full?)")

    def _connected(self) -> messages.Connected:
        return messages.Connected(address=self._address)

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self._drop()


def listen(msg: messages.Listen) -> tuple[messages.Listening, int]:
    """A non-blocking socket on the room's loopback, on a port the kernel picks (so no payload
    can have taken it first): the egress forwarder's listener, or the room's DNS server."""
    family, address = ((socket.AF_INET, "127.0.0.1") if msg.family == 4
                       else (socket.AF_INET6, "::1"))
    kind = socket.SOCK_STREAM if msg.kind == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(1024)
        port = sock.getsockname()[1]
        return messages.Listening(address=address, port=port), sock.detach()
    except BaseException:
        sock.close()
        raise
