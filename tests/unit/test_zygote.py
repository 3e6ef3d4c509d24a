"""The zygote's side of its channel, in this process: ``zygote.handle`` answering the daemon's
structs over a socketpair, a room whose set-up fails before unshare (a fork of this process that
reports its error on the sync socket), and the exit status of a reaped room init as an event."""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from sandboxd.jail import channel, messages, zygote
from sandboxd.jail.user import IdMap


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    daemon, z = channel.pair()
    yield daemon, z
    daemon.close()
    z.close()


def _recv(sock: socket.socket) -> tuple[messages.FromZygote, list[int]]:
    ready, _, _ = select.select([sock], [], [], 30)
    assert ready, "the zygote sent nothing"
    return channel.recv(sock, messages.from_zygote)


def test_ping(pair: tuple[socket.socket, socket.socket]) -> None:
    daemon, z = pair
    zygote.handle(messages.Ping(id=5), z)
    assert _recv(daemon) == (messages.Pong(re=5), [])


def test_a_room_whose_set_up_fails_is_an_error_reply(pair: tuple[socket.socket, socket.socket],
                                                     tmp_path: Path) -> None:
    daemon, z = pair
    spec = messages.RoomSpec(room_id="u0-z", rootfs="/", scratch=str(tmp_path), disk_bytes=1,
                             hostname="sandbox", cgroup_procs=[str(tmp_path / "no-cgroup")],
                             cgroup_home_by_dir=False, ids=IdMap(os.getuid(), os.getgid(), 1))
    zygote.handle(messages.SpawnRoom(id=9, spec=spec), z)
    reply, fds = _recv(daemon)
    assert fds == [] and isinstance(reply, messages.ErrorReply) and reply.re == 9
    assert "room set-up failed" in reply.message and "No such file" in reply.message
    assert reply.errno == errno.EIO  # (the set-up process's error arrives as text)


def test_a_reaped_room_init_is_reported_with_its_status(
        pair: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, z = pair
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    monkeypatch.setattr(zygote, "_INITS", {pid})
    for _ in range(1000):
        zygote._reap(z)
        ready, _, _ = select.select([daemon], [], [], 0.01)
        if ready:
            break
    event, _ = _recv(daemon)
    assert event == messages.Exited(pid=pid, status=3 << 8)
    assert not zygote._INITS


def test_garbage_ends_serve(pair: tuple[socket.socket, socket.socket]) -> None:
    daemon, z = pair
    daemon.send(msgspec.msgpack.encode({"op": "spawn", "id": 1, "spec": {"room_id": 5}}))
    old = signal.getsignal(signal.SIGCHLD)
    try:
        with pytest.raises(channel.BadMessage):
            zygote.serve(z)
    finally:  # (serve installs the zygote's SIGCHLD wake-up in this process)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, old)
