"""daemon.py in-process, without rooms: the real ``Daemon.run`` with the disabled cgroup backend,
a real zygote (a child process), the real server on a temporary socket and systemd's
notification socket faked by a datagram socket of ours. What is checked is what the daemon
promises: one daemon per state dir, READY=1 only once it answers, an orderly stop on SIGTERM
(STOPPING=1, socket removed, zygote gone, exit 0), a new zygote when one dies and exit 1 when
they keep dying, fail-closed seccomp, start-up errors as exit codes."""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sandboxd import config, daemon, errors
from sandboxd.client import Client


class Notify:
    """A stand-in for systemd's NOTIFY_SOCKET: collects every datagram sent to it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.seen: list[str] = []

    def read(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.seen


@pytest.fixture
def tmp() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="sbxd-") as d:
        yield d


@pytest.fixture
def notify(tmp: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Notify]:
    n = Notify(os.path.join(tmp, "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", n.path)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(var, raising=False)
    # The daemon makes itself non-dumpable; the pytest process it runs in stays as it is.
    dumpable: list[bool] = []
    monkeypatch.setattr(daemon.caps, "non_dumpable", lambda: dumpable.append(False))
    yield n
    n.sock.close()


def cfg(tmp: str, **settings: Any) -> config.DaemonConfig:
    base = config.load(None, {"socket": os.path.join(tmp, "run", "s.sock"),
                              "state_dir": os.path.join(tmp, "state"), "rootfs": "host"})
    return msgspec.structs.replace(base, cgroup_backend="disabled", **settings)


async def until(cond: Callable[[], bool], what: str, tries: int = 4000) -> None:
    for _ in range(tries):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def ping(path: str) -> dict[str, Any]:
    with Client(path, timeout=30) as c:
        return dict(c.ping().raw)


def test_run_serves_then_stops_in_order_on_sigterm(tmp: str, notify: Notify) -> None:
    c = cfg(tmp)

    async def body() -> None:
        d = daemon.Daemon(c)
        task = asyncio.ensure_future(d.run())
        await until(lambda: "READY=1\nSTATUS=serving" in notify.read() or task.done(),
                    "READY=1")
        assert not task.done(), task.exception()
        # READY=1 was sent once the socket answers: ping right away
        pong = await asyncio.get_running_loop().run_in_executor(None, ping, c.socket)
        caps = pong["capabilities"]
        assert caps["cgroup"]["backend"] == "disabled"
        assert caps["seccomp"]["enabled"] is True and caps["seccomp"]["rules"] > 0
        assert d.zygote.alive and d.zygote.proc is not None
        zygote = d.zygote.proc
        assert os.path.exists(os.path.join(c.state_dir, "rooms"))
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler takes it
        assert await task == 0
        assert "STOPPING=1" in notify.read()
        assert notify.seen.index("STOPPING=1") > notify.seen.index("READY=1\nSTATUS=serving")
        assert not os.path.exists(c.socket)
        assert zygote.poll() is not None

    asyncio.run(body())


def test_one_daemon_per_state_dir(tmp: str, notify: Notify) -> None:
    c = cfg(tmp)
    os.makedirs(c.state_dir)
    fd = os.open(os.path.join(c.state_dir, "sandboxd.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another daemon holds it

        async def body() -> None:
            with pytest.raises(errors.ValidationError, match="another sandboxd uses the state"):
                await daemon.Daemon(c).run()

        asyncio.run(body())
        assert not os.path.exists(c.socket) and "READY=1\nSTATUS=serving" not in notify.read()
    finally:
        os.close(fd)


def test_a_dead_zygote_is_replaced_and_repeated_deaths_stop_the_daemon(
        tmp: str, notify: Notify) -> None:
    c = cfg(tmp)

    async def body() -> None:
        d = daemon.Daemon(c)
        task = asyncio.ensure_future(d.run())
        await until(lambda: "READY=1\nSTATUS=serving" in notify.read() or task.done(), "ready")
        loop = asyncio.get_running_loop()
        for generation in range(2, daemon.ZYGOTE_RESTARTS_PER_MIN + 2):
            old = d.zygote.proc
            assert old is not None
            old.kill()
            # (alive turns true before the new zygote's first ping: wait for the restart)
            def restarted(n: int = generation) -> bool:
                r = d._zygote_restart
                return (d.zygote.generation == n and r is not None and r.done()) or task.done()

            await until(restarted, f"zygote generation {generation}")
            assert d.zygote.alive
            assert not task.done()
            assert d.zygote.proc is not old and old.poll() is not None
            pong = await loop.run_in_executor(None, ping, c.socket)  # still serving
            assert pong["message"] == "pong"
        # one death more than ZYGOTE_RESTARTS_PER_MIN within a minute: stop, exit 1
        assert d.zygote.proc is not None
        d.zygote.proc.kill()
        assert await task == 1
        assert not os.path.exists(c.socket)

    asyncio.run(body())


def test_a_zygote_that_cannot_restart_stops_the_daemon(tmp: str, notify: Notify,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    c = cfg(tmp)

    async def body() -> None:
        d = daemon.Daemon(c)
        task = asyncio.ensure_future(d.run())
        await until(lambda: "READY=1\nSTATUS=serving" in notify.read() or task.done(), "ready")

        async def broken() -> None:
            raise OSError("no python here")

        monkeypatch.setattr(d.zygote, "start", broken)
        assert d.zygote.proc is not None
        d.zygote.proc.kill()
        assert await task == 1

    asyncio.run(body())


def test_seccomp_off_only_by_configuration(tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    d = daemon.Daemon(cfg(tmp, seccomp=False))
    assert d._build_seccomp() is None
    assert d.seccomp == {"enabled": False, "reason": "disabled by configuration"}
    d = daemon.Daemon(cfg(tmp))
    bpf = d._build_seccomp()
    assert bpf and len(bpf) % 8 == 0 and d.seccomp["enabled"] is True
    from sandboxd.jail import seccomp

    def fail() -> bytes:
        raise RuntimeError("libseccomp went away")

    monkeypatch.setattr(seccomp, "build_filter", fail)
    with pytest.raises(errors.InternalError, match="cannot build the seccomp filter"):
        daemon.Daemon(cfg(tmp))._build_seccomp()  # fail closed: no filter, no daemon


def test_watchdog_pings_at_half_the_interval(tmp: str, notify: Notify,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))

    async def body() -> None:
        t = asyncio.ensure_future(daemon._watchdog())
        await until(lambda: notify.read().count("WATCHDOG=1") >= 2, "two watchdog pings")
        t.cancel()

    asyncio.run(body())
    monkeypatch.delenv("WATCHDOG_USEC")

    async def none() -> None:
        await daemon._watchdog()  # no watchdog asked for: returns at once

    asyncio.run(none())


def test_inherited_socket_from_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    assert daemon._inherited_socket() is None


def test_raise_fd_limit_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        daemon.raise_fd_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_id_plan_is_the_running_user(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int, int]] = []

    def plan(name: str, uid: int, gid: int) -> Any:
        seen.append((name, uid, gid))
        return "plan"

    monkeypatch.setattr(daemon.idmaps, "plan", plan)
    assert daemon._id_plan() == "plan"
    import pwd

    assert seen == [(pwd.getpwuid(os.getuid()).pw_name, os.getuid(), os.getgid())]


def test_main_config_errors_exit_2(tmp: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = Path(tmp) / "bad.toml"
    bad.write_text("no_such_setting = 1\n")
    with pytest.raises(SystemExit) as info:
        daemon.main(["--config", str(bad), "--socket", os.path.join(tmp, "s")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("sandboxd: ")


def test_main_runs_the_daemon_and_exits_with_its_code(
        tmp: str, monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[config.DaemonConfig] = []

    async def run(self: daemon.Daemon) -> int:
        got.append(self.config)
        return 3

    monkeypatch.setattr(daemon.Daemon, "run", run)
    monkeypatch.setattr(daemon, "raise_fd_limit", lambda: None)
    state = os.path.join(tmp, "st")
    with pytest.raises(SystemExit) as info:
        daemon.main(["--socket", os.path.join(tmp, "s"), "--state-dir", state,
                     "--rootfs", "host", "--log-level", "warning"])
    assert info.value.code == 3
    assert got[0].state_dir == state and got[0].log_level == "warning"

    async def refuse(self: daemon.Daemon) -> int:
        raise errors.ValidationError("another sandboxd uses the state dir x")

    monkeypatch.setattr(daemon.Daemon, "run", refuse)
    with pytest.raises(SystemExit) as info:
        daemon.main(["--socket", os.path.join(tmp, "s"), "--state-dir", state])
    assert info.value.code == 1


def test_parse_args() -> None:
    a = daemon.parse_args(["--socket", "/x", "--log-level", "debug"])
    assert (a.socket, a.log_level, a.state_dir, a.config) == ("/x", "debug", None, None)
    with pytest.raises(SystemExit):
        daemon.parse_args(["--log-level", "loud"])
