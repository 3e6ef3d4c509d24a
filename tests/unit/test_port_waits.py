"""sandboxd/ports.py without a room: waitForPort's decisions (a process that ended first, a
port that refuses until the deadline, an HTTP status that is not ready), the HTTP status line,
and the splice (both directions, half-close, an error closing both)."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import msgspec
import pytest

from sandboxd import errors, ports
from sandboxd.jail import messages as jm


class FakeHandle:
    """A room init that answers every Connect with ``errno`` (0: a socket to ``peer``)."""

    def __init__(self, num: int = errno.ECONNREFUSED) -> None:
        self.num = num
        self.connects = 0
        self.peers: list[socket.socket] = []

    async def request(self, msg: jm.Connect, fds: Any = (), timeout: float | None = None
                      ) -> tuple[Any, list[int]]:
        self.connects += 1
        if self.num:
            return jm.ErrorReply(re=msg.id, errno=self.num, message="refused"), []
        raise AssertionError("no socket in this fake")


class FakeRoom:
    def __init__(self, handle: FakeHandle) -> None:
        self.id = "r"
        self.key = "u0-r"
        self.handle = handle
        self.touched = 0

    def touch(self) -> None:
        self.touched += 1


class Record(msgspec.Struct):
    exit_code: int
    status: str = "failed"


def _wait(room: FakeRoom, **kw: Any) -> Any:
    return asyncio.run(ports.wait_for_port(room, 8000, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("record", [Record(exit_code=3), {"exitCode": 3, "status": "failed"}])
def test_a_process_that_ended_first_is_exited_before_ready(record: Any) -> None:
    room = FakeRoom(FakeHandle())
    seen: list[str] = []

    async def ended(r: Any, pid: str) -> Any:
        seen.append(pid)
        return record

    with pytest.raises(errors.ProcessExitedBeforeReady) as info:
        _wait(room, process_id="web", ended=ended, timeout_ms=60_000)
    assert info.value.context == {"sandboxId": "r", "port": 8000, "processId": "web",
                                  "exitCode": 3}
    assert seen == ["web"] and room.handle.connects == 0


def test_a_process_still_running_keeps_the_wait_going_until_it_ends() -> None:
    room = FakeRoom(FakeHandle())
    calls = 0

    async def ended(r: Any, pid: str) -> Any:
        nonlocal calls
        calls += 1
        return Record(exit_code=0) if calls == 3 else None

    with pytest.raises(errors.ProcessExitedBeforeReady):
        _wait(room, process_id="web", ended=ended, timeout_ms=60_000)
    assert room.handle.connects == 2  # tried while it ran


def test_the_seam_is_the_process_table() -> None:
    # waitForPort's processId asks the background processes (issue 13's other half).
    from sandboxd import processes

    assert ports.process_ended is processes.process_ended


def test_refused_until_the_deadline_is_ready_timeout() -> None:
    room = FakeRoom(FakeHandle())
    with pytest.raises(errors.ProcessReadyTimeout, match="refused") as info:
        _wait(room, timeout_ms=100)
    assert info.value.context == {"sandboxId": "r", "port": 8000, "timeout": 100}
    assert room.handle.connects >= 1


def test_a_stuck_connect_says_so() -> None:
    with pytest.raises(errors.ProcessReadyTimeout, match="timed out"):
        _wait(FakeRoom(FakeHandle(errno.ETIMEDOUT)), timeout_ms=50)


def _status(answer: bytes) -> int:
    async def main() -> int:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(answer)
        b.shutdown(socket.SHUT_WR)
        try:
            return await ports.http_status(a, 8000, "/health")
        finally:
            got = b.recv(4096)
            assert got.startswith(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
            a.close()
            b.close()
    return asyncio.run(main())


def test_http_status_line() -> None:
    assert _status(b"HTTP/1.1 204 No Content\r\n\r\n") == 204
    assert _status(b"HTTP/1.0 503 Service Unavailable\r\n") == 503
    with pytest.raises(ValueError):
        _status(b"SSH-2.0-OpenSSH\r\n")
    with pytest.raises(ValueError):
        _status(b"")


def test_splice_copies_both_ways_and_passes_half_close_on() -> None:
    async def main() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        client, a = socket.socketpair()
        b, server = socket.socketpair()
        for s in (client, a, b, server):
            s.setblocking(False)
        task = asyncio.ensure_future(ports.splice(a, b))
        big = bytes(range(256)) * 8192  # 2 MiB: more than any socket buffer

        async def send() -> None:
            await loop.sock_sendall(client, big)
            client.shutdown(socket.SHUT_WR)  # half-close: the server still answers

        sender = asyncio.ensure_future(send())
        got = b""
        while len(got) < len(big):
            got += await loop.sock_recv(server, 1 << 20)
        await sender
        assert await asyncio.wait_for(loop.sock_recv(server, 1), 10) == b""  # EOF came through
        await loop.sock_sendall(server, b"answer")
        server.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := await loop.sock_recv(client, 100):
            back += chunk
        await asyncio.wait_for(task, 10)  # both directions done: the splice ends
        for s in (client, a, b, server):
            s.close()
        return got, back

    got, back = asyncio.run(main())
    assert got == bytes(range(256)) * 8192 and back == b"answer"


def test_an_error_on_one_side_ends_the_splice() -> None:
    async def main() -> None:
        client, a = socket.socketpair()
        b, server = socket.socketpair()
        for s in (client, a, b, server):
            s.setblocking(False)
        task = asyncio.ensure_future(ports.splice(a, b))
        await asyncio.sleep(0)
        b.close()  # (the room's side breaks: the splice's reads and writes on it fail)
        await asyncio.wait_for(task, 10)
        for s in (client, a, server):
            s.close()

    asyncio.run(main())
