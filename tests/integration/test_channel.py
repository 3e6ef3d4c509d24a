"""Garbage on a real room's channel is a dead room (issue 12, jail/messages.py).

The test (root) takes a copy of one end of a live room's channel with pidfd_getfd(2) — the
daemon's end, to speak to the real init as a broken daemon would, or the init's end (with the
init stopped), to answer the real daemon as a broken init would — and checks that the room is
reported dead (SANDBOX_UNAVAILABLE on the next call, with the reason of its tombstone), is torn
down without leftovers, and that the daemon and another room are unaffected.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import DaemonProc, make_daemon

from sandboxd import errors
from sandboxd.client import Client
from sandboxd.jail import channel, messages
from sandboxd.rooms import room_key

pytestmark = pytest.mark.integration

_SYS_PIDFD_GETFD = 438  # x86_64 and the generic table alike
_libc = ctypes.CDLL(None, use_errno=True)


def _getfd(pid: int, fd: int) -> socket.socket:
    """A copy of process ``pid``'s fd ``fd`` (PTRACE_MODE_ATTACH: root may)."""
    pidfd = os.pidfd_open(pid)
    try:
        got = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            num = ctypes.get_errno()
            raise OSError(num, f"pidfd_getfd({pid}, {fd}): {os.strerror(num)}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=got)


def _seqpackets(pid: int) -> set[int]:
    """The fds of ``pid`` that are Unix SEQPACKET sockets (channels)."""
    out = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                continue
            sock = _getfd(pid, int(name))
        except OSError:
            continue
        with sock:
            if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET:
                out.add(int(name))
    return out


@pytest.fixture(scope="module")
def own(test_user: Any) -> Iterator[DaemonProc]:
    """A daemon of this module's own: its rooms are broken on purpose."""
    d = make_daemon(test_user)
    d.start()
    yield d
    code = d.stop()
    assert code == 0, d.log()[-4000:]
    assert d.leftovers() == []


@pytest.fixture
def c(own: DaemonProc) -> Iterator[Client]:
    client = Client(own.socket, timeout=60)
    yield client
    client.close()


def _init_pid(d: DaemonProc, room: str) -> int:
    meta = json.loads(Path(d.state_dir, "rooms", room_key(0, room), "room.json").read_text())
    return int(meta["initPid"])


def _tombstone(sb: Any, timeout: float = 20.0) -> errors.SandboxError:
    """The SANDBOX_UNAVAILABLE of a room once its death is classified (it has a reason)."""
    deadline = time.monotonic() + timeout
    while True:
        with pytest.raises(errors.SandboxUnavailable) as info:
            sb.exists("x")
        if info.value.context.get("reason") or time.monotonic() > deadline:
            return info.value
        time.sleep(0.05)


def _healthy(own: DaemonProc, c: Client, bystander: str) -> None:
    assert own.proc is not None and own.proc.poll() is None
    assert c.sandbox(bystander).exec("echo", ["still here"]).stdout == "still here\n"


def _clean(own: DaemonProc, c: Client, *rooms: str) -> None:
    for r in rooms:
        c.sandbox(r).destroy()
    assert own.leftovers() == []


GARBAGE_TO_INIT = {
    "not msgpack": b"\xc1\xc1",
    "wrong type": msgspec.msgpack.encode({"op": "spawn", "id": 1, "run": "1", "argv": 7}),
    "unknown op": msgspec.msgpack.encode({"op": "f_chmod", "id": 1, "path": "/", "mode": 511}),
}


@pytest.mark.parametrize("data", GARBAGE_TO_INIT.values(), ids=GARBAGE_TO_INIT.keys())
def test_garbage_sent_to_a_room_init_is_a_dead_room(own: DaemonProc, c: Client, room_id: str,
                                                    data: bytes) -> None:
    victim, bystander = room_id, "b" + room_id[1:]
    assert own.proc is not None
    c.sandbox(bystander).get()
    before = _seqpackets(own.proc.pid)
    c.sandbox(victim).get()
    [fd] = _seqpackets(own.proc.pid) - before  # the daemon's end of the new room's channel
    with _getfd(own.proc.pid, fd) as daemon_end:
        daemon_end.send(data)
    err = _tombstone(c.sandbox(victim))
    # The init itself gave up on the garbage (exit 1), nobody had to kill it.
    assert err.context["reason"] == "crashed", err
    assert "exited with status 1" in err.message, err
    _healthy(own, c, bystander)
    # Getting it again is a new, working incarnation.
    info = c.sandbox(victim).get()
    assert info.incarnation == 2
    assert c.sandbox(victim).exec("echo", ["again"]).stdout == "again\n"
    _clean(own, c, victim, bystander)


def _bad_reply(kind: str, request: messages.ToInit) -> bytes:
    if kind == "wrong reply type":
        return channel.encode(messages.Pong(re=request.id))
    if kind == "malformed reply":
        return msgspec.msgpack.encode({"op": "f_existence", "re": request.id, "path": "/x",
                                       "exists": "maybe"})
    return b"\x92\xc1"  # garbage


@pytest.mark.parametrize("kind", ["wrong reply type", "malformed reply", "garbage"])
def test_a_reply_of_the_wrong_shape_from_the_init_is_a_dead_room(own: DaemonProc, c: Client,
                                                                  room_id: str,
                                                                  kind: str) -> None:
    victim, bystander = room_id, "b" + room_id[1:]
    c.sandbox(bystander).get()
    c.sandbox(victim).get()
    pid = _init_pid(own, victim)
    [fd] = _seqpackets(pid)  # the init's only channel: its end of the daemon's
    with _getfd(pid, fd) as init_end:
        os.kill(pid, signal.SIGSTOP)  # the real init reads nothing now: we answer instead
        outcome: list[BaseException | object] = []

        def call() -> None:
            try:
                outcome.append(c.sandbox(victim).exists("x"))
            except BaseException as err:  # noqa: BLE001 - examined below
                outcome.append(err)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        init_end.settimeout(20)
        request, fds = channel.recv(init_end, messages.to_init)
        channel.close_fds(fds)
        assert isinstance(request, messages.Exists)
        init_end.send(_bad_reply(kind, request))
        t.join(30)
    [got] = outcome
    assert isinstance(got, errors.SandboxUnavailable), got
    # The daemon killed the init (SIGKILL goes through a stop) and buried the room.
    err = _tombstone(c.sandbox(victim))
    assert err.context["reason"] == "killed" and "SIGKILL" in err.message, err
    assert not Path(f"/proc/{pid}/status").exists() or "zombie" in Path(
        f"/proc/{pid}/status").read_text()
    assert "init channel closed" in own.log()
    _healthy(own, c, bystander)
    _clean(own, c, victim, bystander)
