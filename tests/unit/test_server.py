"""The server and the handlers, unprivileged: a real ``server.Server`` on a temporary Unix
socket, spoken to by the real client, over a fake room manager whose room inits are a few lines
of Python (file operations on a temporary directory, fds passed as the real init passes them).
Runs are faked at ``runs.run`` (the kernel side is the integration tier's)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from sandboxd import config, errors, runs
from sandboxd.client import Client
from sandboxd.coderun.service import CodeRunService
from sandboxd.context import Services
from sandboxd.facts import HostFacts
from sandboxd.jail import JailError, messages
from sandboxd.jail.cgroup.disabled import DisabledBackend
from sandboxd.jail.user import IdPlan
from sandboxd.server import Server


class FakeHandle:
    """The room init's side of the file ops, on a host directory standing in for the room."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.broken: BaseException | None = None

    def _host(self, path: str) -> str:
        full = path if path.startswith("/") else f"/workspace/{path}"
        return self.root + full

    async def ping(self) -> messages.Pong:
        if self.broken is not None:
            raise self.broken
        return messages.Pong(runs=2)

    async def request(self, msg: messages.Request[Any], fds: list[int],
                      timeout: float = 0) -> tuple[messages.Reply, list[int]]:
        if self.broken is not None:
            raise self.broken
        try:
            match msg:
                case messages.Write(path=path, append=append):
                    host = self._host(path)
                    loop = asyncio.get_running_loop()
                    data = await loop.run_in_executor(None, _read_all, fds[0])
                    os.makedirs(os.path.dirname(host), exist_ok=True)
                    with open(host, "ab" if append else "wb") as f:
                        f.write(data)
                    return messages.Written(path=path, bytes_written=len(data)), []
                case messages.OpenRead(path=path):
                    host = self._host(path)
                    if os.path.isdir(host):
                        raise IsADirectoryError(errno.EISDIR, "Is a directory")
                    st = os.stat(host)
                    return messages.Opened(path=path, size=st.st_size, mtime=st.st_mtime,
                                           mode=st.st_mode), [
                        os.open(host, os.O_RDONLY | os.O_CLOEXEC)]
                case messages.Delete(path=path):
                    os.unlink(self._host(path))
                    return messages.PathReply(path=path), []
                case messages.Mkdir(path=path, recursive=recursive):
                    (os.makedirs if recursive else os.mkdir)(self._host(path))
                    return messages.PathReply(path=path), []
                case messages.Exists(path=path):
                    host = self._host(path)
                    return messages.Existence(path=path, exists=os.path.exists(host),
                                              type="file" if os.path.isfile(host) else None), []
                case messages.Rename(src=src_path, dst=dst_path, into=into):
                    src, dst = self._host(src_path), self._host(dst_path)
                    if into and os.path.isdir(dst):
                        dst = os.path.join(dst, os.path.basename(src))
                    os.rename(src, dst)
                    return messages.Renamed(path=src_path, new_path=dst[len(self.root):]), []
                case messages.ListDir(path=path):
                    host = self._host(path)
                    rows = [(n, n, "file", os.path.getsize(os.path.join(host, n)), 0.0,
                             "rw-r--r--") for n in sorted(os.listdir(host))]
                    rows.append((b"\xff", b"\xff", "file", 0, 0.0, "rw-r--r--"))
                    fd = os.memfd_create("listing", os.MFD_CLOEXEC)
                    os.write(fd, msgspec.msgpack.encode(rows))
                    return messages.Listing(path=path, count=len(rows), truncated=False), [fd]
                case messages.Code(name=name):
                    return messages.CodeState(path=f"/tmp/.sandboxd/{name}"), []
        except OSError as err:
            return messages.ErrorReply(errno=err.errno or errno.EIO, message=str(err)), []
        return messages.ErrorReply(errno=errno.ENOSYS, message="unknown op"), []


def _read_all(fd: int) -> bytes:
    out = bytearray()
    os.set_blocking(fd, True)
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    return bytes(out)


class FakeRoom:
    def __init__(self, room_id: str, owner: int, root: str) -> None:
        self.id, self.owner, self.status, self.incarnation = room_id, owner, "ready", 1
        self.created_at = self.last_activity_wall = 1764187200.0
        self.options = config.RoomOptions(env={"ROOMVAR": "1"})
        self.cgroup = DisabledBackend("test").create_room(room_id, self.options.limits)
        self.handle = FakeHandle(root)
        self.active_runs = 0
        self.ids = None
        self.egress = None

    def touch(self) -> None:
        pass

    def options_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self.options)
        return out


class FakeRooms:
    def __init__(self, cfg: config.DaemonConfig, root: str) -> None:
        self.config, self.root = cfg, root
        self.rooms: dict[tuple[int, str], FakeRoom] = {}
        self.dead: dict[tuple[int, str], Any] = {}
        self.ids = IdPlan("single", os.getuid(), os.getgid(), reason="test")
        self.sleeper = None

    def is_admin(self, uid: int) -> bool:
        return False

    async def get_or_create(self, uid: int, room_id: str, options: Any = None, *,
                            explicit: bool = False) -> FakeRoom:
        config.check_sandbox_id(room_id)
        return self.rooms.setdefault((uid, room_id), FakeRoom(room_id, uid, self.root))

    def get(self, uid: int, room_id: str) -> FakeRoom:
        try:
            return self.rooms[(uid, room_id)]
        except KeyError:
            raise errors.SandboxNotFound(f"sandbox {room_id} not found",
                                         sandboxId=room_id) from None

    def visible_rooms(self, uid: int) -> list[FakeRoom]:
        return [r for (o, _), r in self.rooms.items() if o == uid]

    async def destroy(self, uid: int, room_id: str) -> bool:
        return self.rooms.pop((uid, room_id), None) is not None

    async def lost(self, room: FakeRoom, err: Exception) -> errors.SandboxError:
        return errors.SandboxUnavailable(f"sandbox {room.id} failed: {err}", sandboxId=room.id)


class Daemon:
    """A server on its own loop in a thread (the blocking client talks to it)."""

    def __init__(self, d: str, **settings: Any) -> None:
        self.path = os.path.join(d, "s.sock")
        os.makedirs(os.path.join(d, "room", "workspace"))
        self.cfg = msgspec.structs.replace(
            config.load(None, {"socket": self.path, "state_dir": d, "rootfs": "host"}),
            **settings)
        self.rooms = FakeRooms(self.cfg, os.path.join(d, "room"))
        facts = HostFacts(self.cfg, DisabledBackend("test"), self.rooms.ids)
        self.server = Server(self.cfg, Services(
            rooms=self.rooms, config=self.cfg, facts=facts,  # type: ignore[arg-type]
            coderun=CodeRunService("host")))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Daemon:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(self.path), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="sbxs-") as d, Daemon(d) as dm:
        yield dm


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.path, timeout=10) as c:
        yield c


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> list[runs.RunSpec]:
    specs: list[runs.RunSpec] = []

    async def run(room: Any, spec: runs.RunSpec) -> runs.RunResult:
        specs.append(spec)
        if spec.on_output is not None:
            await spec.on_output("stdout", "streamed\n")
            await spec.on_output("stderr", "oops\n")
        if spec.argv[0] == "explode":
            raise JailError("the init's channel broke")
        code = 3 if spec.argv[-1].endswith("fail") else 0
        return runs.RunResult(exit_code=code, status="RE" if code else "OK",
                              stdout=" ".join(spec.argv), stderr="", wall_time_ms=7,
                              cpu_time_ms=1, memory_peak_bytes=None, pids_peak=1,
                              error="boom" if spec.argv[0] == "xx" else None)

    monkeypatch.setattr(runs, "run", run)
    return specs


def raw(path: str, *lines: bytes) -> list[Any]:
    """Send raw lines, read one reply per line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"".join(lines))
        buf = b""
        while buf.count(b"\n") < len(lines):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return [json.loads(x) for x in buf.splitlines()]


# --- rooms ---------------------------------------------------------------------------------------


def test_ping_room_lifecycle_and_stats(client: Client, daemon: Daemon) -> None:
    pong = client.ping()
    assert pong.message == "pong" and pong.capabilities.cgroup is not None
    assert pong.capabilities.limits == sorted(daemon.server.services.facts  # type: ignore[union-attr]
                                              .enforceable_limits())
    assert "sandbox" not in pong
    sb = client.sandbox("r1")
    assert sb.ping().sandbox.runs == 2  # type: ignore[union-attr]
    info = sb.get({"limits": {"pids": 64}})
    assert (info.sandbox_id, info.status, info.incarnation) == ("r1", "ready", 1)
    assert info.created_at is not None and info.last_activity_at is None
    assert "lastActivityAt" not in info.raw  # never sent as null
    [listed] = client.list_sandboxes()
    assert listed.last_activity_at is not None and "owner" not in listed.raw
    st = client.stats()
    assert st.backend == "disabled" and st.sandboxes[0].usage.cpu_time_ms is None
    assert client.stats("r1").sandboxes[0].active_runs == 0
    with pytest.raises(errors.SandboxNotFound):
        client.stats("nope")
    assert sb.destroy().destroyed is True
    assert sb.destroy().destroyed is False


def test_a_broken_init_is_one_wire_error(client: Client, daemon: Daemon) -> None:
    client.sandbox("r1").get()
    room = daemon.rooms.rooms[(os.getuid(), "r1")]
    room.handle.broken = JailError("gone")
    with pytest.raises(errors.SandboxUnavailable, match="is gone"):
        client.sandbox("r1").ping()
    with pytest.raises(errors.SandboxUnavailable, match="is gone"):
        client.sandbox("r1").exists("x")
    room.handle.broken = TimeoutError()
    with pytest.raises(errors.InternalError, match="did not answer f_exists"):
        client.sandbox("r1").exists("x")


# --- exec and code -------------------------------------------------------------------------------


def test_exec_result_streaming_and_limits(client: Client, fake_run: list[runs.RunSpec]) -> None:
    seen: list[tuple[str, str]] = []
    res = client.sandbox("r1").exec("echo", ["hi"], env={"A": "1", "LANG": None}, cwd="sub",
                                    timeout=2, on_output=lambda s, d: seen.append((s, d)))
    assert (res.success, res.exit_code, res.stdout, res.command) == (True, 0, "echo hi",
                                                                     "echo hi")
    assert res.duration == 7 and "error" not in res.raw and res.timestamp.endswith("Z")
    assert seen == [("stdout", "streamed\n"), ("stderr", "oops\n")]
    spec = fake_run[-1]
    assert spec.cwd == "/workspace/sub" and spec.wall_time_ms == 2000
    assert spec.env["A"] == "1" and spec.env["ROOMVAR"] == "1" and "LANG" not in spec.env
    assert client.sandbox("r1").exec("false || fail").status == "RE"
    assert fake_run[-1].argv == ["/bin/sh", "-c", "false || fail"]
    assert client.sandbox("r1").exec("xx", []).raw["error"] == "boom"
    with pytest.raises(errors.LimitUnavailable, match="memoryBytes"):
        client.sandbox("r1").exec("x", [], limits={"memoryBytes": 64 << 20})
    with pytest.raises(errors.LimitUnavailable, match="subordinate"):
        client.sandbox("r1").exec("x", [], user="sandbox")
    with pytest.raises(errors.ValidationError, match="NUL"):
        client.sandbox("r1").exec("x", ["a\x00b"])
    with pytest.raises(errors.SandboxUnavailable, match="channel broke"):
        client.sandbox("r1").exec("explode", [])


def test_run_quotas(client: Client, daemon: Daemon, fake_run: list[runs.RunSpec]) -> None:
    client.sandbox("r1").get()
    room = daemon.rooms.rooms[(os.getuid(), "r1")]
    room.active_runs = daemon.cfg.max_runs_per_room
    with pytest.raises(errors.QuotaExceeded, match="this sandbox"):
        client.sandbox("r1").exec("x", [])
    room.active_runs = daemon.cfg.max_runs_per_uid
    with pytest.raises(errors.QuotaExceeded):
        client.sandbox("r2").exec("x", [])


def test_git_checkout(client: Client, fake_run: list[runs.RunSpec]) -> None:
    res = client.sandbox("r1").git_checkout("/srv/origin.git", branch="dev", depth=1)
    assert (res.success, res.target_dir) == (True, "/workspace/origin")
    assert fake_run[0].argv[-4:] == ["1", "--", "/srv/origin.git", "/workspace/origin"]
    with pytest.raises(errors.InvalidGitUrl):
        client.sandbox("r1").git_checkout("ext::sh -c id")
    with pytest.raises(errors.ValidationError):
        client.sandbox("r1").git_checkout("/srv/o.git", branch="-x")


def test_code_languages_and_a_run(client: Client, fake_run: list[runs.RunSpec],
                                  daemon: Daemon) -> None:
    langs = {lang.id: lang for lang in client.list_languages()}
    assert "python" in langs
    with pytest.raises(errors.UnsupportedLanguage):
        client.sandbox("r1").run_code("cobol", "x")
    # Debian always has /usr/bin/python3 (the daemon's own venv is built from it).
    assert langs["python"].available, "no python3 on this host's PATH for the host rootfs"
    res = client.sandbox("r1").run_code("python", "print(1)", stdin="in")
    assert res.status == "OK" and res.cached is False and res.compile is None
    written = os.listdir(os.path.join(daemon.rooms.root, "tmp", ".sandboxd"))
    assert len(written) == 1  # the sources went through roomfiles.write, not the API
    ex = client.sandbox("r1").run_example_code()
    assert {r.language for r in ex} == set(langs)


# --- files ---------------------------------------------------------------------------------------


def test_files_round_trip(client: Client, daemon: Daemon) -> None:
    sb = client.sandbox("r1")
    assert sb.write_file("a.txt", "héllo").bytes_written == 6
    sb.write_file("a.txt", b"\xff", append=True)
    got = sb.read_file("a.txt")
    assert (got.data, got.is_binary, got.encoding) == ("héllo".encode() + b"\xff", True,
                                                       "base64")
    assert sb.read_file("a.txt", encoding="utf-8").content.startswith("héllo")
    chunks: list[bytes] = []
    streamed = sb.read_file("a.txt", stream=chunks.append)
    assert b"".join(chunks) == got.data and streamed["stream"] is True
    assert b"".join(c for c in [sb.read_file("a.txt", encoding="utf8", stream=True).data]) \
        .startswith("héllo".encode())
    assert sb.exists("a.txt") and not sb.exists("b.txt")
    names = [f.name for f in sb.list_files()]
    assert names == ["a.txt", "\ufffd"]
    odd = sb.list_files()[1]
    assert odd.name_base64 == "/w==" and "nameBase64" not in sb.list_files()[0].raw
    assert sb.mkdir("d").path == "d"
    assert sb.move_file("a.txt", "d").new_path == "/workspace/d/a.txt"
    assert sb.rename_file("d/a.txt", "d/b.txt").success
    assert sb.delete_file("d/b.txt").success


def test_file_errors(client: Client) -> None:
    sb = client.sandbox("r1")
    with pytest.raises(errors.FileNotFound) as info:
        sb.read_file("missing")
    assert info.value.context["path"] == "missing"
    with pytest.raises(errors.IsDirectory):
        sb.read_file("/workspace")
    with pytest.raises(errors.FileExists):
        sb.mkdir("/workspace")
    with pytest.raises(errors.FileNotFound) as info:
        sb.rename_file("nope", "other")
    assert info.value.context["newPath"] == "other"
    with pytest.raises(errors.ValidationError, match="base64"):
        sb.client.call("writeFile", {"sandboxId": "r1", "path": "x", "content": "!!",
                                     "encoding": "base64"})
    with pytest.raises(errors.ValidationError, match="NUL"):
        sb.write_file("a\x00b", "x")
    with pytest.raises(errors.ValidationError, match="empty"):
        sb.delete_file("")


# --- the server itself ---------------------------------------------------------------------------


def test_envelope_errors_batches_and_notifications(daemon: Daemon) -> None:
    ping = b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n'
    replies = raw(daemon.path, b"not json\n", b'{"jsonrpc":"1.0","id":2,"method":"ping"}\n',
                  b'{"jsonrpc":"2.0","id":3,"method":"nope"}\n',
                  b'{"jsonrpc":"2.0","id":4,"method":"exec","params":{"sandboxId":"a"}}\n',
                  b"[]\n", ping)
    by = {r.get("id"): r for r in replies}
    assert {r["error"]["code"] for r in replies if r.get("id") is None} == {-32700, -32600}
    assert by[3]["error"]["code"] == -32601 and by[4]["error"]["code"] == -32602
    assert by[1]["result"]["message"] == "pong"
    [batch] = raw(daemon.path, b'[{"jsonrpc":"2.0","id":"a","method":"ping"},'
                  b'{"jsonrpc":"2.0","method":"ping"},{"jsonrpc":"2.0","id":"b","method":"x"}]\n')
    assert [r["id"] for r in batch] == ["a", "b"]  # the notification got no answer
    big = b"[" + b",".join([b'{"jsonrpc":"2.0","id":1,"method":"ping"}'] * 10_000) + b"]\n"
    [over] = raw(daemon.path, big)
    assert over["error"]["data"]["code"] == "REQUEST_TOO_LARGE"


def test_internal_errors_and_host_exhaustion(daemon: Daemon,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from sandboxd import api

    async def crash(ctx: Any, p: Any) -> Any:
        raise ZeroDivisionError

    async def full(ctx: Any, p: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space", "/var/lib/secret")

    async def wrong(ctx: Any, p: Any) -> Any:
        return {"message": "pong"}

    for fn, code in ((crash, "INTERNAL_ERROR"), (full, "HOST_RESOURCE_EXHAUSTED"),
                     (wrong, "INTERNAL_ERROR")):
        monkeypatch.setitem(api.HANDLERS, "ping", fn)
        [r] = raw(daemon.path, b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        assert r["error"]["data"]["code"] == code and "/var/lib" not in json.dumps(r)


def test_reply_too_large_is_answered(tmp_path: Any) -> None:
    with tempfile.TemporaryDirectory(prefix="sbxs-") as d, Daemon(d, max_reply_bytes=300) as dm:
        [r] = raw(dm.path, b'{"jsonrpc":"2.0","id":9,"method":"ping"}\n')
        assert r["id"] == 9 and r["error"]["data"]["code"] == "REQUEST_TOO_LARGE"


def test_connection_caps_and_idle_timeout() -> None:
    with tempfile.TemporaryDirectory(prefix="sbxs-") as d, \
            Daemon(d, max_connections=1, connection_idle_timeout_s=1.0) as dm, \
            socket.socket(socket.AF_UNIX) as first:
        first.connect(dm.path)
        # Readiness: an answer on the first connection means the daemon counts it.
        first.settimeout(5)
        first.sendall(b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        assert json.loads(first.recv(4096).splitlines()[0])["result"]["message"] == "pong"
        with socket.socket(socket.AF_UNIX) as second:
            second.settimeout(5)
            second.connect(dm.path)
            msg = json.loads(second.recv(4096).splitlines()[0])
            assert msg["error"]["data"]["code"] == "QUOTA_EXCEEDED"
        first.settimeout(5)
        assert first.recv(10) == b""  # idle: closed by the daemon


def test_oversized_line_is_skipped_and_answered() -> None:
    with tempfile.TemporaryDirectory(prefix="sbxs-") as d, \
            Daemon(d, max_request_bytes=1000, free_line_bytes=100) as dm:
        replies = raw(dm.path, b'{"x":"' + b"a" * 400_000 + b'"}\n',
                      b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        assert replies[0]["error"]["data"]["code"] == "REQUEST_TOO_LARGE"
        assert replies[1]["result"]["message"] == "pong"


def test_server_replaces_a_stale_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="sbxs-") as d:
        stale = os.path.join(d, "s.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(stale)
        s.close()
        with Daemon(d) as dm:
            assert raw(dm.path, b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')[0]["result"]


def test_not_serving_yet_is_shutting_down() -> None:
    with tempfile.TemporaryDirectory(prefix="sbxs-") as d, Daemon(d) as dm:
        dm.server.services = None
        [r] = raw(dm.path, b'{"jsonrpc":"2.0","id":1,"method":"ping"}\n')
        assert r["error"]["data"]["code"] == "SHUTTING_DOWN"
