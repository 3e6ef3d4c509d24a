"""The room init's dispatch, unprivileged: a real ``init.Init`` whose channel is a socketpair held
by the test (the daemon's end), its requests decoded structs, its payloads real processes started
in a temporary directory. Namespaces, mounts and the seccomp filter are the integration tier's;
what is checked here is the init's side of the channel: one reply per request (the declared type
or ErrorReply), events for exits, fds closed, and garbage ending the init."""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sandboxd.jail import channel, fileops, messages
from sandboxd.jail import init as room_init
from sandboxd.jail.user import IdMap

SPEC = messages.RoomSpec(room_id="u0-t", rootfs="/", scratch="/nonexistent", disk_bytes=1 << 20,
                         hostname="sandbox", cgroup_procs=[], cgroup_home_by_dir=False,
                         ids=IdMap(0, 0, 1))


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.daemon, ctl = channel.pair()
        self.init = room_init.Init(SPEC, ctl)
        # (the room's /proc/self/oom_score_adj; a file will do)
        self.init.oom_fd = os.open(tmp / ".oom_score_adj", os.O_WRONLY | os.O_CREAT, 0o600)
        self.ids = iter(range(1, 1 << 30))

    def recv(self, timeout: float = 10.0) -> tuple[messages.FromInit, list[int]]:
        ready, _, _ = select.select([self.daemon], [], [], timeout)
        assert ready, "the init sent nothing"
        return channel.recv(self.daemon, messages.from_init)

    def call(self, msg: messages.Request[Any], fds: list[int] | None = None
             ) -> tuple[messages.FromInit, list[int]]:
        msg = msgspec.structs.replace(msg, id=next(self.ids))
        self.init.dispatch(msg, list(fds or []))
        reply, got = self.recv()
        assert isinstance(reply, messages.Reply) and reply.re == msg.id
        return reply, got

    def wait_exit(self) -> messages.Exit:
        """Reap until the init reports an exit (SIGCHLD is not wired up here)."""
        for _ in range(1000):
            self.init.reap()
            ready, _, _ = select.select([self.daemon], [], [], 0.01)
            if ready:
                event, _ = channel.recv(self.daemon, messages.from_init)
                assert isinstance(event, messages.Exit)
                return event
        raise AssertionError("no exit event")

    def close(self) -> None:
        self.daemon.close()
        self.init.ctl.close()
        os.close(self.init.oom_fd)
        for fd in (self.init.wake_r, self.init.wake_w):
            os.close(fd)
        self.init.sel.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    cwd = os.getcwd()  # the fast spawn path steps into a run's cwd and back to "/"
    harness = Harness(tmp_path)
    yield harness
    harness.close()
    os.chdir(cwd)


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as err:
        return err.errno == errno.EBADF
    return False


def test_ping_kill_killall(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    reply, _ = h.call(messages.Ping())
    assert isinstance(reply, messages.Pong) and reply.runs == 0
    reply, _ = h.call(messages.Kill(run="nope"))
    assert reply == messages.KillReply(re=reply.re, found=False)
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(room_init.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    reply, _ = h.call(messages.KillAll())
    assert isinstance(reply, messages.KillAllReply)
    assert kills == [(-1, signal.SIGKILL)]  # from PID 1: everything of the room but the init


def _stdio() -> tuple[list[int], list[int]]:
    """([stdin, stdout, stderr] for the payload, [stdout, stderr] read ends for the test)."""
    in_r, in_w = os.pipe()
    os.close(in_w)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    return [in_r, out_w, err_w], [out_r, err_r]


def _read(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    os.close(fd)
    return out


def test_spawn_fast_path_runs_and_reports_the_exit(h: Harness, tmp_path: Path) -> None:
    give, keep = _stdio()
    reply, _ = h.call(messages.Spawn(run="1", argv=["sh", "-c", "pwd; echo $A; exit 3"],
                                     env={"A": "x", "PATH": "/usr/bin:/bin"}, cwd=str(tmp_path),
                                     rlimits={"core": 0}), give)
    assert isinstance(reply, messages.SpawnReply) and reply.pid > 0
    assert all(_closed(fd) for fd in give)  # the init's copies are closed after the spawn
    assert h.init.runs[reply.pid][0] == "1"
    reply2, _ = h.call(messages.Ping())
    assert isinstance(reply2, messages.Pong) and reply2.runs == 1
    exit_ = h.wait_exit()
    assert (exit_.run, exit_.status, exit_.failure) == ("1", 3 << 8, None)
    assert exit_.t is not None and exit_.t[0] <= exit_.t[1]
    assert _read(keep[0]) == f"{tmp_path}\nx\n".encode()
    _read(keep[1])
    assert os.getcwd() == "/"  # the init stepped back out of the run's cwd


def test_spawn_of_a_missing_program_is_an_exit_127_not_an_error(h: Harness,
                                                                 tmp_path: Path) -> None:
    give, keep = _stdio()
    msg = messages.Spawn(id=41, run="2", argv=["no-such-program"], env={"PATH": "/nonexistent"},
                         cwd=str(tmp_path))
    h.init.dispatch(msg, give)
    event, _ = h.recv()  # the exit comes first: nothing was started
    assert isinstance(event, messages.Exit)
    assert (event.run, event.status) == ("2", 127 << 8)
    assert event.failure == messages.Failure(stage="exec", errno=errno.ENOENT)
    reply, _ = h.recv()
    assert reply == messages.SpawnReply(re=41, pid=0)
    assert b"no-such-program: No such file" in _read(keep[1])
    _read(keep[0])


def test_spawn_fork_path_reports_the_failed_stage(h: Harness, tmp_path: Path) -> None:
    # rlimits other than core take the fork path; a missing cwd fails at "chdir", before any
    # step that needs privileges, so this runs the same as root and as a user.
    give, keep = _stdio()
    reply, _ = h.call(messages.Spawn(run="3", argv=["true"], cwd=str(tmp_path / "gone"),
                                     rlimits={"fsize": 1 << 20}), give)
    assert isinstance(reply, messages.SpawnReply) and reply.pid > 0
    exit_ = h.wait_exit()
    assert exit_.failure == messages.Failure(stage="chdir", errno=errno.ENOENT)
    assert os.waitstatus_to_exitcode(exit_.status) == 1
    assert b"sandboxd: cwd " in _read(keep[1])
    _read(keep[0])


def test_spawn_without_stdio_is_an_error_reply_and_its_fds_are_closed(h: Harness) -> None:
    r, w = os.pipe()
    reply, _ = h.call(messages.Spawn(run="4", argv=["true"]), [r])
    assert isinstance(reply, messages.ErrorReply) and reply.errno == errno.EINVAL
    assert _closed(r)
    os.close(w)


def test_file_operations_through_the_dispatch(h: Harness, tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    reply, _ = h.call(messages.Mkdir(path=str(d), recursive=True))
    assert reply == messages.PathReply(re=reply.re, path=str(d))
    reply, _ = h.call(messages.Exists(path=str(d)))
    assert isinstance(reply, messages.Existence) and (reply.exists, reply.type) == (
        True, "directory")
    # Write is a job: the init replies once the pipe delivered ``size`` bytes
    r, w = os.pipe()
    target = d / "f.txt"
    msg = messages.Write(id=77, path=str(target), size=5)
    h.init.dispatch(msg, [r])
    assert not _closed(r)  # the job's now
    os.write(w, b"hello")
    os.close(w)
    [key] = [k for k in h.init.sel.get_map().values() if isinstance(k.data, tuple)]
    h.init._step_job(*key.data)
    reply, _ = h.recv()
    assert reply == messages.Written(re=77, path=str(target), bytes_written=5)
    assert target.read_bytes() == b"hello" and _closed(r)
    reply, fds = h.call(messages.OpenRead(path=str(target)))
    assert isinstance(reply, messages.Opened) and reply.size == 5 and len(fds) == 1
    assert os.pread(fds[0], 10, 0) == b"hello"
    os.close(fds[0])
    reply, fds = h.call(messages.ListDir(path=str(tmp_path), recursive=True))
    assert isinstance(reply, messages.Listing) and (reply.count, reply.truncated) == (3, False)
    rows = msgspec.msgpack.decode(_read(fds[0]))
    assert [row[1] for row in rows] == ["a", "a/b", "a/b/f.txt"]
    reply, _ = h.call(messages.Rename(src=str(target), dst=str(tmp_path), into=True))
    assert reply == messages.Renamed(re=reply.re, path=str(target),
                                     new_path=str(tmp_path / "f.txt"))
    reply, _ = h.call(messages.Delete(path=str(tmp_path / "f.txt")))
    assert isinstance(reply, messages.PathReply)
    reply, _ = h.call(messages.Delete(path=str(d)))
    assert isinstance(reply, messages.ErrorReply)
    assert (reply.errno, reply.filename) == (errno.EISDIR, str(d))


def test_an_os_error_is_the_one_error_shape(h: Harness, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    reply, fds = h.call(messages.OpenRead(path=missing))
    assert isinstance(reply, messages.ErrorReply) and fds == []
    assert (reply.errno, reply.filename) == (errno.ENOENT, missing)
    reply, _ = h.call(messages.Code(action="state", name="../x"))
    assert isinstance(reply, messages.ErrorReply) and reply.errno == errno.EINVAL


def test_a_failing_job_replies_its_error(h: Harness, tmp_path: Path) -> None:
    r, w = os.pipe()
    h.init.dispatch(messages.Write(id=5, path=str(tmp_path / "short"), size=10), [r])
    os.write(w, b"abc")
    os.close(w)  # fewer bytes than announced: the daemon's request was cancelled
    [key] = [k for k in h.init.sel.get_map().values() if isinstance(k.data, tuple)]
    h.init._step_job(*key.data)
    reply, _ = h.recv()
    assert isinstance(reply, messages.ErrorReply) and reply.errno == errno.ECANCELED
    # nothing left: neither the target nor the temporary file the write went to
    assert [p.name for p in tmp_path.iterdir()] == [".oom_score_adj"]


def test_a_request_that_raises_is_answered_not_fatal(h: Harness,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(msg: messages.Exists) -> messages.Existence:
        raise KeyError("bug")

    monkeypatch.setattr(fileops, "exists", boom)
    reply, _ = h.call(messages.Exists(path="/x"))
    assert isinstance(reply, messages.ErrorReply)
    assert (reply.errno, reply.message) == (errno.EIO, "KeyError: 'bug'")


@pytest.mark.parametrize("data", [
    b"\xc1",
    msgspec.msgpack.encode({"op": "spawn", "id": 1, "run": "1", "argv": "sh"}),
    msgspec.msgpack.encode({"op": "f_unlink", "id": 1, "path": "/"}),
    msgspec.msgpack.encode({"op": "ping", "id": 1, "sig": 9}),
], ids=["not msgpack", "wrong type", "unknown op", "unknown field"])
def test_garbage_ends_the_init(h: Harness, data: bytes) -> None:
    # A ping first: served; then the garbage: serve() raises, and main() exits the init (the
    # kernel then kills the room's pid namespace with it).
    channel.send(h.daemon, messages.Ping(id=1))
    h.daemon.send(data)
    with pytest.raises(channel.BadMessage):
        h.init.serve()
    reply, _ = h.recv()
    assert reply == messages.Pong(re=1)


def test_the_daemon_going_away_ends_serve(h: Harness) -> None:
    h.daemon.shutdown(socket.SHUT_WR)
    assert h.init.serve() is None


def test_error_reply_of_any_exception() -> None:
    err = room_init.error_reply(FileNotFoundError(errno.ENOENT, "No such file", b"/raw"))
    assert (err.errno, err.filename) == (errno.ENOENT, "b'/raw'")
    assert room_init.error_reply(OSError("no errno")).errno == errno.EIO
    assert room_init.error_reply(ValueError("v")) == messages.ErrorReply(
        errno=errno.EIO, message="ValueError: v")
