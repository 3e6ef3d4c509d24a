"""Parent/child channels: SOCK_SEQPACKET socketpairs carrying small msgpack messages and fds.

Each message is one datagram: a struct of ``messages.py`` (tagged by ``op``), with up to MAX_FDS
descriptors attached by SCM_RIGHTS. Bulk data never crosses the channel: pipes and open files
are passed as fds and read or written directly by the daemon, so a message stays far below the
socket buffer.

This is the framing both sides share: the synchronous side (zygote, room init) uses :func:`send`
/ :func:`recv` directly; the daemon's ``handles.AsyncChannel`` reads with :func:`unpack` from its
event loop. A datagram that does not decode, as what the receiver expects, is :class:`BadMessage`
(its fds closed): the receiver treats its peer as dead. Nothing here imports asyncio: the room
init imports this module.
"""

from __future__ import annotations

import array
import os
import socket
from typing import TypeVar

import msgspec

from .messages import Message

MAX_MSG = 256 * 1024
MAX_FDS = 16
ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

_enc = msgspec.msgpack.Encoder()

M = TypeVar("M", bound=Message)


class ChannelClosed(ConnectionError):
    pass


class BadMessage(ValueError):
    """A datagram that is not one of the messages the receiver expects: garbage, a wrong type,
    a reply of the wrong shape. The channel is then as good as closed."""


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def encode(msg: Message) -> bytes:
    data = _enc.encode(msg)
    if len(data) > MAX_MSG:
        raise ValueError(f"channel message of {len(data)} bytes exceeds {MAX_MSG}")
    return data


def send(sock: socket.socket, msg: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = encode(msg)
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def unpack(data: bytes, ancdata: list[tuple[int, int, bytes]],
           decoder: msgspec.msgpack.Decoder[M]) -> tuple[M, list[int]]:
    """The message and fds of one datagram (``recvmsg``'s data and ancillary data)."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    for fd in fds:
        os.set_inheritable(fd, False)
    if not data:
        close_fds(fds)
        raise ChannelClosed("peer closed the channel")
    try:
        msg = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        close_fds(fds)
        raise BadMessage(f"undecodable channel message: {err}") from None
    return msg, fds


def recv(sock: socket.socket, decoder: msgspec.msgpack.Decoder[M]) -> tuple[M, list[int]]:
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MSG, ANC, socket.MSG_CMSG_CLOEXEC)
    return unpack(data, ancdata, decoder)
