"""The jail's channels without privileges: every message of ``jail/messages.py`` through the real
framing over a socketpair, and the daemon's handles (``jail/handles.py``) against a fake room
init playing by — and breaking — the rules: garbage, a reply of the wrong type, the wrong number
of fds, an event of the wrong shape each close the channel and kill the init (a dead room)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import threading
import typing
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from sandboxd import errors
from sandboxd.jail import JailError, channel, handles, messages
from sandboxd.jail.user import IdMap

SPEC = messages.RoomSpec(room_id="u1000-r", rootfs="/", scratch="/state/rooms/u1000-r/mnt",
                         disk_bytes=1 << 20, hostname="sandbox", cgroup_procs=["/cg/procs"],
                         cgroup_home_by_dir=False, ids=IdMap(100000, 100000, 4096, 3),
                         seccomp_bpf=b"\x00bpf")

#: One sample of every message that crosses a channel (the test below fails for a message type
#: added to a union without a sample here).
SAMPLES: list[messages.Message] = [
    messages.SpawnRoom(id=1, spec=SPEC),
    messages.Ping(id=2),
    messages.RoomSpawned(re=1, pid=4242),
    messages.Pong(re=2, runs=3),
    messages.ErrorReply(re=3, errno=errno.ENOENT, message="gone", filename="/x"),
    messages.Exited(pid=4242, status=9),
    messages.Spawn(id=4, run="7", argv=["/bin/echo", "hé"], env={"A": "1"}, cwd="/tmp",
                   user="sandbox", rlimits={"fsize": 10, "core": 0}, ncg=1, pids_limited=True),
    messages.Kill(id=5, run="7", sig=signal.SIGTERM),
    messages.KillAll(id=6),
    messages.OpenRead(id=7, path="a.txt"),
    messages.Write(id=8, path="/workspace/b", size=12, append=True),
    messages.Exists(id=9, path="c"),
    messages.Delete(id=10, path="d"),
    messages.Rename(id=11, src="e", dst="f", into=True),
    messages.Mkdir(id=12, path="g/h", recursive=True),
    messages.ListDir(id=13, path="/", recursive=True, hidden=True, limit=5),
    messages.Code(id=14, action="prepare", name="py-abc", shared=True),
    messages.SpawnReply(re=4, pid=12),
    messages.KillReply(re=5, found=True),
    messages.KillAllReply(re=6),
    messages.Opened(re=7, path="/workspace/a.txt", size=3, mtime=1.5, mode=0o100644),
    messages.Written(re=8, path="/workspace/b", bytes_written=12),
    messages.Existence(re=9, path="/workspace/c", exists=True, type="file"),
    messages.PathReply(re=10, path="/workspace/d"),
    messages.Renamed(re=11, path="/workspace/e", new_path="/workspace/f"),
    messages.Listing(re=13, path="/", count=2, truncated=False),
    messages.CodeState(re=14, path="/tmp/.sandboxd/py-abc", sealed=True),
    messages.Exit(run="7", status=256, rusage=messages.Rusage(utime=0.5, stime=0.25,
                                                              maxrss_kb=900),
                  failure=messages.Failure(stage="exec", errno=errno.ENOENT), t=(1.0, 2.0)),
    messages.Ready(pid=1),
    messages.Failed(error="OSError: mount"),
    messages.Connect(id=15, port=8000, timeout_ms=250),
    messages.Connected(re=15, address="::1"),
    messages.OpenPty(id=16, cols=100, rows=30),
    messages.PtyOpened(re=16, name="/dev/pts/0"),
    messages.Listen(id=19, kind="udp", family=6),
    messages.Listening(re=19, address="::1", port=5353),
    messages.Namespaces(id=20),
    messages.NamespaceFds(re=20),
    messages.NewInotify(id=17),
    messages.Inotify(re=17),
    messages.AddWatch(id=18, path="/workspace", recursive=True, exclude=[".git"], limit=9,
                      report=True),
    messages.Watched(re=18, path="/workspace", dirs=[(1, "/workspace")],
                     found=[("/workspace/a", False)], truncated=False),
]

UNIONS = {
    "to_zygote": (messages.ToZygote, messages.to_zygote),
    "from_zygote": (messages.FromZygote, messages.from_zygote),
    "to_init": (messages.ToInit, messages.to_init),
    "from_init": (messages.FromInit, messages.from_init),
}


def _members(union: Any) -> set[type]:
    return set(typing.get_args(union))


def test_every_message_has_a_sample() -> None:
    declared = set().union(*(_members(u) for u, _ in UNIONS.values()))
    assert declared == {type(m) for m in SAMPLES}


def test_every_request_declares_a_reply_its_peer_may_send() -> None:
    pairs = [(messages.ToZygote, messages.FromZygote), (messages.ToInit, messages.FromInit)]
    for to, back in pairs:
        for req in _members(to):
            assert issubclass(req, messages.Request)
            assert messages.reply_type(req) in _members(back), req
        assert messages.ErrorReply in _members(back)


def test_defaults_live_in_the_structs() -> None:
    assert messages.Kill(run="1").sig == signal.SIGKILL
    spawn = messages.to_init.decode(msgspec.msgpack.encode({"op": "spawn", "run": "1",
                                                            "argv": ["x"]}))
    assert isinstance(spawn, messages.Spawn)
    assert (spawn.cwd, spawn.user, spawn.env, spawn.rlimits, spawn.ncg) == (
        "/workspace", "root", {}, {}, 0)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = channel.pair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_the_framing(msg: messages.Message,
                                        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    decoder = next(d for u, d in UNIONS.values() if type(msg) in _members(u))
    pipes = [os.pipe() for _ in range(msg.nfds)]
    try:
        channel.send(a, msg, [r for r, _ in pipes])
        got, fds = channel.recv(b, decoder)
        assert got == msg and type(got) is type(msg)
        assert len(fds) == msg.nfds
        for fd, (_, w) in zip(fds, pipes, strict=True):  # the same pipes, new numbers
            os.write(w, b"k")
            assert os.read(fd, 1) == b"k"
            assert not os.get_inheritable(fd)
            os.close(fd)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


GARBAGE = [
    b"\xc1",  # never a msgpack byte
    msgspec.msgpack.encode([1, 2, 3]),  # not a map
    msgspec.msgpack.encode({"re": 1}),  # no op
    msgspec.msgpack.encode({"op": "nope", "id": 1}),  # unknown op
    msgspec.msgpack.encode({"op": "spawn", "id": 1, "run": "1", "argv": 5}),  # wrong type
    msgspec.msgpack.encode({"op": "kill", "id": 1, "run": "1", "extra": 1}),  # unknown field
    msgspec.msgpack.encode({"op": "f_code", "id": 1, "action": "rm", "name": "x"}),  # enum
]


@pytest.mark.parametrize("data", GARBAGE, ids=repr)
def test_garbage_is_a_bad_message_and_its_fds_are_closed(
        data: bytes, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        socket.send_fds(a, [data], [r])
        with pytest.raises(channel.BadMessage):
            channel.recv(b, messages.to_init)
        os.close(r)
        # the received copy was closed: the pipe has no reader left
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")
    finally:
        os.close(w)


def test_eof_is_channel_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    with pytest.raises(channel.ChannelClosed):
        channel.recv(b, messages.to_init)


def test_an_oversized_message_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        channel.encode(messages.Spawn(run="1", argv=["x" * channel.MAX_MSG]))


# --- the daemon's handle on a fake room init --------------------------------------------------


class FakeInit:
    """The init's end of a room channel, in a thread: answers each request with ``answer``."""

    def __init__(self, sock: socket.socket,
                 answer: Callable[[messages.ToInit, list[int]], None]) -> None:
        self.sock = sock
        self.answer = answer
        self.seen: list[messages.ToInit] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                msg, fds = channel.recv(self.sock, messages.to_init)
            except (channel.ChannelClosed, OSError):
                return
            self.seen.append(msg)
            try:
                self.answer(msg, fds)
            except OSError:
                return
            finally:
                channel.close_fds(fds)

    def send(self, msg: messages.Message, fds: list[int] | None = None) -> None:
        channel.send(self.sock, msg, fds or [])


class Room:
    """A RoomHandle whose "init" is a sleeping process (killed the way a real one is: through
    its pidfd) and whose channel's other end is a FakeInit."""

    def __init__(self, answer: Callable[[FakeInit, messages.ToInit, list[int]], None]) -> None:
        self.proc = subprocess.Popen(["sleep", "60"])
        mine, theirs = channel.pair()
        self.handle = handles.RoomHandle("r", self.proc.pid, mine, os.pidfd_open(self.proc.pid))
        self.init = FakeInit(theirs, lambda m, f: answer(self.init, m, f))

    async def dead(self) -> int:
        """The fake init's exit status, once the handle's pidfd saw it die."""
        assert await self.handle.wait_dead(10)
        return self.proc.wait(5)

    def close(self) -> None:
        self.handle.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.init.thread.join(5)  # (our end closed: its recv saw EOF)
        self.init.sock.close()


def _run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


def _honest(init: FakeInit, msg: messages.ToInit, fds: list[int]) -> None:
    match msg:
        case messages.Ping():
            init.send(messages.Pong(re=msg.id, runs=1))
        case messages.Spawn():
            init.send(messages.SpawnReply(re=msg.id, pid=7))
            init.send(messages.Exit(run=msg.run, status=3 << 8))
        case messages.Kill():
            init.send(messages.KillReply(re=msg.id, found=msg.run == "1"))
        case messages.OpenRead():
            r, w = os.pipe()
            init.send(messages.Opened(re=msg.id, path=msg.path, size=0, mtime=0.0, mode=0),
                      [r])
            os.close(r)
            os.close(w)
        case _:
            init.send(messages.ErrorReply(re=msg.id, errno=errno.ENOSYS, message="no"))


def test_an_honest_init_is_answered_in_structs() -> None:
    async def main() -> None:
        room = Room(_honest)
        try:
            room.init.send(messages.Ready(pid=1))
            assert await room.handle.wait_ready(5) == messages.Ready(pid=1)
            assert (await room.handle.ping()).runs == 1
            fut = room.handle.expect_exit("1")
            r, w = os.pipe()
            try:
                pid = await room.handle.spawn("1", ["true"], {}, "/workspace", "root",
                                              {"core": 0}, (r, w, w), [])
            finally:
                os.close(r)
                os.close(w)
            assert pid == 7 and (await fut).status == 3 << 8
            spawn = room.init.seen[-1]
            assert isinstance(spawn, messages.Spawn) and spawn.rlimits == {"core": 0}
            await room.handle.kill_run("1")
            assert room.init.seen[-1] == messages.Kill(id=spawn.id + 1, run="1")
            reply, fds = await room.handle.request(messages.OpenRead(path="/x"))
            assert isinstance(reply, messages.Opened) and len(fds) == 1
            os.close(fds[0])
            reply, fds = await room.handle.request(messages.Exists(path="/x"))
            assert isinstance(reply, messages.ErrorReply) and reply.errno == errno.ENOSYS
            assert room.handle.alive and room.proc.poll() is None
        finally:
            room.close()

    _run(main)


def _pong_to_everything(init: FakeInit, msg: messages.ToInit, fds: list[int]) -> None:
    init.send(messages.Pong(re=msg.id))


def _opened_without_fd(init: FakeInit, msg: messages.ToInit, fds: list[int]) -> None:
    init.send(messages.Opened(re=msg.id, path="/x", size=0, mtime=0.0, mode=0))


def _garbage(init: FakeInit, msg: messages.ToInit, fds: list[int]) -> None:
    init.sock.send(b"\xc1")


def _bad_event(init: FakeInit, msg: messages.ToInit, fds: list[int]) -> None:
    init.sock.send(msgspec.msgpack.encode({"op": "exit", "run": 5, "status": "x"}))


def _bad_reply(init: FakeInit, msg: messages.ToInit, fds: list[int]) -> None:
    init.sock.send(msgspec.msgpack.encode({"op": "f_existence", "re": msg.id, "path": "/x",
                                           "exists": "yes"}))


@pytest.mark.parametrize("answer", [_pong_to_everything, _opened_without_fd, _garbage,
                                    _bad_event, _bad_reply], ids=lambda f: f.__name__)
def test_a_reply_of_the_wrong_shape_is_a_dead_room(
        answer: Callable[[FakeInit, messages.ToInit, list[int]], None],
        caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        room = Room(answer)
        try:
            fut = room.handle.expect_exit("9")
            with pytest.raises(JailError, match="room r is gone"):
                await room.handle.request(messages.OpenRead(path="/x"), timeout=10)
            assert room.handle.chan.closed and not room.handle.alive
            # ... and its init was killed (SIGKILL through the pidfd), not left running
            assert await room.dead() == -signal.SIGKILL
            with pytest.raises(JailError, match="died"):
                await fut  # a run waiting for its exit learns the room died
            with pytest.raises(JailError):
                await room.handle.ping()
        finally:
            room.close()

    _run(main)
    assert any("killing the init" in r.message for r in caplog.records
               if r.levelname == "ERROR")


def test_a_late_reply_is_dropped_not_fatal() -> None:
    async def main() -> None:
        room = Room(_honest)
        try:
            r, w = os.pipe()
            room.init.send(messages.Opened(re=999, path="/x", size=0, mtime=0.0, mode=0), [r])
            os.close(r)
            assert (await room.handle.ping()).runs == 1  # after the stray reply
            with pytest.raises(BrokenPipeError):  # the stray fd was closed, not kept
                os.write(w, b"x")
            os.close(w)
            assert room.handle.alive
        finally:
            room.close()

    _run(main)


def test_a_request_that_is_not_answered_times_out_and_the_room_stays() -> None:
    async def main() -> None:
        room = Room(lambda init, msg, fds: None)
        try:
            with pytest.raises(TimeoutError):
                await room.handle.request(messages.Ping(), timeout=0.05)
            assert room.handle.alive
        finally:
            room.close()

    _run(main)


def test_the_init_dying_fails_what_waits_on_it(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        room = Room(lambda init, msg, fds: None)
        try:
            ready = asyncio.ensure_future(room.handle.wait_ready(10))
            fut = room.handle.expect_exit("1")
            pending = asyncio.ensure_future(room.handle.request(messages.Ping(), timeout=10))
            for _ in range(1000):  # until the ping is in flight (sent, its reply awaited)
                if room.handle.chan._pending:
                    break
                await asyncio.sleep(0.001)
            assert room.handle.chan._pending, "the ping was never sent"
            room.proc.kill()
            assert await room.dead() == -signal.SIGKILL
            for f in (ready, fut, pending):
                with pytest.raises(JailError):
                    await f
            assert room.handle.chan.reason == "the room init died"
        finally:
            room.close()

    _run(main)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # a death is no error


def test_an_init_exiting_closes_its_channel_first_and_that_is_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """A teardown kills the init: its channel's EOF usually arrives before its pidfd says so
    (test_faults checks the daemon logs no ERROR for that)."""
    async def main() -> None:
        room = Room(lambda init, msg, fds: None)
        try:
            room.init.sock.shutdown(socket.SHUT_RDWR)  # EOF, the process still alive
            for _ in range(500):
                if room.handle.chan.closed:
                    break
                await asyncio.sleep(0.01)
            assert room.handle.chan.reason == handles.PEER_CLOSED
            assert await room.dead() == -signal.SIGKILL  # killed all the same
        finally:
            room.close()

    _run(main)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_failed_set_up_is_reported() -> None:
    async def main() -> None:
        room = Room(lambda init, msg, fds: None)
        try:
            room.init.send(messages.Failed(error="OSError: no rootfs"))
            with pytest.raises(JailError, match="no rootfs"):
                await room.handle.wait_ready(5)
        finally:
            room.close()

    _run(main)


# --- the zygote's handle ---------------------------------------------------------------------


def test_zygote_exit_statuses_and_spawn_errors(pair: tuple[socket.socket, socket.socket]
                                               ) -> None:
    a, b = pair

    def zygote() -> None:
        while True:
            try:
                msg, _ = channel.recv(b, messages.to_zygote)
            except (channel.ChannelClosed, OSError):
                return
            match msg:
                case messages.Ping():
                    channel.send(b, messages.Pong(re=msg.id))
                case messages.SpawnRoom():
                    channel.send(b, messages.Exited(pid=77, status=9))
                    channel.send(b, messages.ErrorReply(re=msg.id, errno=errno.EAGAIN,
                                                        message="OSError: no"))

    async def main() -> None:
        z = handles.Zygote()
        z.chan = handles.AsyncChannel(a, messages.from_zygote, z._event, z._closed)
        z._up.set()
        with pytest.raises(JailError, match="room set-up failed: OSError: no"):
            await z.spawn(SPEC, timeout=5)
        assert await z.exit_status(77, timeout=5) == 9
        assert await z.exit_status(78, timeout=0.01) is None
        deaths: list[bool] = []
        z.on_death = lambda: deaths.append(True)
        b.send(b"\xc1")  # garbage from the zygote: its channel is closed, the daemon told
        for _ in range(3000):
            if deaths:
                break
            await asyncio.sleep(0.01)
        assert deaths and not z.alive

    t = threading.Thread(target=zygote, daemon=True)
    t.start()
    _run(main)
    b.shutdown(socket.SHUT_RDWR)
    t.join(5)


def test_a_real_zygote_answers_in_structs_and_dies_of_garbage(tmp_path: Any) -> None:
    """The zygote process itself (no namespaces needed for this much): its first ping, a room
    whose set-up fails before unshare (a cgroup.procs file that does not exist) answered with the
    one error shape, and garbage ending it (the daemon then restarts it: on_death)."""
    async def main() -> None:
        z = handles.Zygote()
        await z.start()
        try:
            assert z.alive and z.generation == 1
            bad = msgspec.structs.replace(SPEC, cgroup_procs=[str(tmp_path / "none")],
                                          scratch=str(tmp_path))
            with pytest.raises(JailError, match=r"room set-up failed: .*No such file"):
                await z.spawn(bad, timeout=30)
            assert z.alive  # one failed room does not end the zygote
            deaths: list[bool] = []
            z.on_death = lambda: deaths.append(True)
            assert z.chan is not None
            z.chan.sock.send(b"\xc1")
            assert z.proc is not None
            for _ in range(500):
                if deaths:
                    break
                await asyncio.sleep(0.01)
            assert deaths and not z.alive
            code = await asyncio.get_running_loop().run_in_executor(None, z.proc.wait, 10)
            assert code == 1  # it exited on the garbage itself, nobody killed it
        finally:
            await z.stop()

    _run(main)


# --- the jail's failures as wire errors (errors.py, one place) ------------------------------


def test_a_room_lost_is_sandbox_unavailable_with_its_reason() -> None:
    tomb = errors.room_lost("r", "sandbox r died", reason="oom", incarnation=3)
    assert isinstance(tomb, errors.SandboxUnavailable)
    assert tomb.to_wire() == {"code": errors.APPLICATION_ERROR, "message": "sandbox r died",
                              "data": {"code": "SANDBOX_UNAVAILABLE", "sandboxId": "r",
                                       "reason": "oom", "incarnation": 3}}
    back = errors.from_wire(tomb.to_wire())
    assert type(back) is errors.RoomLost and (back.reason, back.incarnation) == ("oom", 3)
    # A channel that broke under a call: SANDBOX_UNAVAILABLE, no reason (nothing is known yet)
    broken = errors.room_failure(JailError("room r is gone (protocol violation)"), "r", "ping")
    assert isinstance(broken, errors.RoomLost) and broken.reason is None
    assert broken.to_wire()["data"] == {"code": "SANDBOX_UNAVAILABLE", "sandboxId": "r"}
    # ... and an init that does not answer is the sandbox breaking, not the room dying
    late = errors.room_failure(TimeoutError(), "r", "f_exists within 30 s")
    assert type(late) is errors.InternalError
