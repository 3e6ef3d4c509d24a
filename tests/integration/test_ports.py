"""Ports of a room (issue 13, docs/ports.md) against a real daemon: waitForPort for real servers
(python3 -m http.server, node), exposePort serving HTTP, a WebSocket echo, 50 concurrent
connections and a 100 MiB round trip intact, nothing left listening after destroy and
shutdown, and a second tenant kept out.

Servers are started by an ``exec`` on a connection of their own (``serve``), which keeps them
running for the test while other connections call waitForPort/exposePort (execs run
concurrently; an exec kills what it leaves, so the server lives as long as that exec). Once
background processes exist (startProcess), these should start their servers with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import SANDBOXCTL, DaemonProc, as_user, skip_unless_ci
from test_tenants import ROOT, call, tenants  # noqa: F401 - tenants is a fixture

from sandboxd import errors
from sandboxd.client import Client, Sandbox
from sandboxd.config import DaemonConfig
from sandboxd.rooms import room_key

pytestmark = pytest.mark.integration

ECHO = """\
import asyncio, sys
async def echo(r, w):
    while d := await r.read(65536):
        w.write(d)
        await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(echo, "127.0.0.1", int(sys.argv[1]), backlog=128)
    await srv.serve_forever()
asyncio.run(main())
"""

WS_ECHO = """\
import asyncio, base64, hashlib, struct, sys
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
async def ws(r, w):
    head = await r.readuntil(b"\\r\\n\\r\\n")
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\\r\\n")
           if l.lower().startswith(b"sec-websocket-key:")][0]
    acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
    w.write(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\n"
            b"Connection: Upgrade\\r\\nSec-WebSocket-Accept: " + acc + b"\\r\\n\\r\\n")
    while True:
        b0, b1 = await r.readexactly(2)
        op, n = b0 & 15, b1 & 127
        if n == 126:
            n, = struct.unpack(">H", await r.readexactly(2))
        elif n == 127:
            n, = struct.unpack(">Q", await r.readexactly(8))
        mask = await r.readexactly(4) if b1 & 128 else bytes(4)
        data = bytes(x ^ mask[i % 4] for i, x in enumerate(await r.readexactly(n)))
        if op == 8:
            w.write(b"\\x88\\x00")
            await w.drain()
            w.close()
            return
        size = bytes([n]) if n < 126 else b"\\x7e" + struct.pack(">H", n)
        w.write(bytes([0x80 | op]) + size + data)
        await w.drain()
async def main():
    srv = await asyncio.start_server(ws, "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
"""

GREETER = """\
import socket, sys
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    c, _ = s.accept()
    c.sendall(b"hello\\n")
    c.close()
"""


@pytest.fixture
def sb(client: Client, room_id: str) -> Iterator[Sandbox]:
    box = client.sandbox(room_id)
    box.get()
    yield box
    with contextlib.suppress(errors.SandboxError):
        box.destroy()


def serve(d: DaemonProc, room: str, command: str, seconds: int = 120) -> str:
    """Start ``command`` in ``room`` as a background process (startProcess) for up to
    ``seconds``; it ends with the test's destroy. Returns its process id."""
    with d.client() as c:  # type: ignore[attr-defined]
        proc = c.sandbox(room).start_process(
            f"cd /workspace && exec timeout {seconds} {command}")
    assert proc.record.status == "running", proc.record
    return str(proc.id)


def start_script(d: DaemonProc, sb: Sandbox, name: str, source: str, port: int) -> None:
    sb.write_file(f"/workspace/{name}", source)
    serve(d, sb.id, f"python3 {name} {port}")
    assert sb.wait_for_port(port, timeout=30).ready is True


def _host_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except ConnectionRefusedError:
        return True


def _listening(port: int) -> bool:
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                         check=True).stdout
    return bool(out.strip())


def _socket_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


# --- waitForPort ---------------------------------------------------------------------------------


def test_wait_for_port_python_http_server(daemon: DaemonProc, sb: Sandbox) -> None:
    sb.write_file("/workspace/index.html", "hi from the room\n")
    serve(daemon, sb.id, "python3 -m http.server 8000 --bind 127.0.0.1")
    got = sb.wait_for_port(8000, mode="http", timeout=30)
    assert (got.ready, got.port, got.status) == (True, 8000, 200)
    assert sb.wait_for_port(8000).ready is True  # tcp mode
    # A path that answers 404 is not ready: the wait runs out, saying why.
    with pytest.raises(errors.ProcessReadyTimeout, match="answered 404") as info:
        sb.wait_for_port(8000, mode="http", path="/nope", timeout=0.5)
    assert info.value.context["port"] == 8000


def test_wait_for_port_node_server(daemon: DaemonProc, sb: Sandbox) -> None:
    if not sb.exec("command -v node").stdout.strip():
        skip_unless_ci("no node in the test rootfs")
    js = "require('http').createServer((q, s) => s.end('node ok')).listen(8001)"
    sb.write_file("/workspace/server.js", js)
    serve(daemon, sb.id, "node server.js")
    got = sb.wait_for_port(8001, mode="http", timeout=30)
    assert got.status == 200
    # node listens on :: (dual stack); a node server on ::1 only is reached through ::1.
    js6 = "require('http').createServer((q, s) => s.end('v6')).listen(8002, '::1')"
    sb.write_file("/workspace/server6.js", js6)
    serve(daemon, sb.id, "node server6.js")
    assert sb.wait_for_port(8002, mode="http", timeout=30).status == 200


def test_wait_for_port_times_out_when_nothing_listens(sb: Sandbox) -> None:
    with pytest.raises(errors.ProcessReadyTimeout, match="refused") as info:
        sb.wait_for_port(8003, timeout=0.3)
    assert info.value.context["timeout"] == 300


def test_wait_for_port_of_a_process_that_exits_first(sb: Sandbox) -> None:
    # A server that dies before it listens: PROCESS_EXITED_BEFORE_READY with its exit code,
    # long before the timeout; an unknown process id is PROCESS_NOT_FOUND.
    proc = sb.start_process("echo starting; sleep 0.3; exit 3", process_id="web")
    with pytest.raises(errors.ProcessExitedBeforeReady) as info:
        proc.wait_for_port(8000, timeout=60)
    assert info.value.context["exitCode"] == 3
    assert info.value.context["processId"] == "web"
    with pytest.raises(errors.ProcessNotFound):
        sb.wait_for_port(8000, process_id="nobody", timeout=1)


# --- exposePort ----------------------------------------------------------------------------------


def test_expose_port_serves_http_and_unexpose_closes_it(daemon: DaemonProc, sb: Sandbox) -> None:
    token = secrets.token_hex(8)
    sb.write_file("/workspace/index.html", token)
    serve(daemon, sb.id, "python3 -m http.server 8000 --bind 127.0.0.1")
    sb.wait_for_port(8000, mode="http", timeout=30)
    exposed = sb.expose_port(8000, name="web")
    assert (exposed.port, exposed.name) == (8000, "web")
    assert exposed.url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(exposed.url + "/index.html", timeout=30) as resp:
        assert resp.read().decode() == token
    assert [e.raw for e in sb.get_exposed_ports()] == [exposed.raw]
    with pytest.raises(errors.PortAlreadyExposed):
        sb.expose_port(8000)
    assert sb.unexpose_port(8000).unexposed is True
    assert sb.unexpose_port(8000).unexposed is False  # idempotent
    assert sb.get_exposed_ports() == []
    assert _refused(_host_port(exposed.url))


def test_an_exposed_port_with_nothing_behind_it_closes_the_connection(sb: Sandbox) -> None:
    exposed = sb.expose_port(8004)
    with socket.create_connection(("127.0.0.1", _host_port(exposed.url)), timeout=30) as c:
        c.settimeout(30)
        assert c.recv(1) == b""  # closed, as a refused port would be
    assert sb.exec("true").exit_code == 0  # the room is fine


def test_websocket_echo_through_an_exposed_port(daemon: DaemonProc, sb: Sandbox) -> None:
    start_script(daemon, sb, "ws.py", WS_ECHO, 8005)
    port = _host_port(sb.expose_port(8005).url)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        key = base64.b64encode(os.urandom(16))
        c.sendall(b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        f = c.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 101")
        headers = {}
        while (line := f.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        want = base64.b64encode(hashlib.sha1(
            key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
        assert headers["sec-websocket-accept"] == want
        for text in ("hello ws", "x" * 300):
            data = text.encode()
            mask = os.urandom(4)
            size = bytes([0x80 | len(data)]) if len(data) < 126 else \
                b"\xfe" + struct.pack(">H", len(data))
            c.sendall(b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
            b0, b1 = f.read(2)
            n = b1 & 127
            if n == 126:
                (n,) = struct.unpack(">H", f.read(2))
            assert (b0, f.read(n)) == (0x81, data)
        c.sendall(b"\x88\x80" + os.urandom(4))
        assert f.read(2) == b"\x88\x00"


def test_fifty_concurrent_connections(daemon: DaemonProc, sb: Sandbox) -> None:
    start_script(daemon, sb, "echo.py", ECHO, 8006)
    port = _host_port(sb.expose_port(8006).url)

    async def one(i: int) -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        payload = f"{i}:".encode() + os.urandom(64 * 1024 + i)
        w.write(payload)
        await w.drain()
        got = await r.readexactly(len(payload))
        w.close()
        return got if got == payload else b""

    async def main() -> list[bytes]:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(50))), 120)

    got = asyncio.run(main())
    assert all(got) and len(got) == 50


def test_a_100_mib_round_trip_arrives_intact(daemon: DaemonProc, sb: Sandbox) -> None:
    """Echoed both ways through the daemon, with a half-close at the end: the hashes match
    (backpressure: the client sends far more than any buffer while it reads)."""
    start_script(daemon, sb, "echo.py", ECHO, 8007)
    port = _host_port(sb.expose_port(8007).url)
    size, chunk = 100 * 1024 * 1024, 1024 * 1024
    sent, received = hashlib.sha256(), hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        def send() -> None:
            block = os.urandom(chunk)
            for i in range(size // chunk):
                piece = block[i % 7:] + block[:i % 7]
                sent.update(piece)
                c.sendall(piece)
            c.shutdown(socket.SHUT_WR)  # half-close: the echo still comes back

        t = threading.Thread(target=send)
        t.start()
        n = 0
        while data := c.recv(1 << 20):
            received.update(data)
            n += len(data)
        t.join()
    assert n == size and received.hexdigest() == sent.hexdigest()


def test_quota_of_exposed_ports(sb: Sandbox) -> None:
    limit = DaemonConfig(socket="", state_dir="", rootfs="").max_exposed_ports_per_room
    for p in range(9000, 9000 + limit):
        sb.expose_port(p)
    with pytest.raises(errors.QuotaExceeded) as info:
        sb.expose_port(9999)
    assert info.value.context["limit"] == limit
    sb.unexpose_port(9000)
    sb.expose_port(9999)  # room again


def test_unix_socket_exposure(daemon: DaemonProc, client: Client) -> None:
    # The longest room id: its socket path must still fit in sun_path.
    sb = client.sandbox("u" * 63)
    try:
        _unix_socket_exposure(daemon, sb)
    finally:
        sb.destroy()


def _unix_socket_exposure(daemon: DaemonProc, sb: Sandbox) -> None:
    start_script(daemon, sb, "greet.py", GREETER, 8008)
    exposed = sb.expose_port(8008, unix_socket=True)
    path = exposed.path
    assert exposed.get("url") is None and os.path.basename(os.path.dirname(path)) == "ports"
    assert os.path.basename(path).startswith("8008-")  # (not the room key: sun_path is short)
    st = os.stat(path)
    # The daemon runs as the test user, the caller is root: a rootless daemon cannot chown,
    # so the file is the daemon's and every peer is checked instead (docs/ports.md).
    assert st.st_uid == daemon.user.pw_uid and (st.st_mode & 0o777) == 0o666
    assert (os.stat(os.path.dirname(path)).st_mode & 0o777) == 0o711
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(30)
        c.connect(path)
        assert c.recv(16) == b"hello\n"
    assert sb.unexpose_port(8008).unexposed is True
    assert not os.path.exists(path)


def test_cli_port_and_unport(daemon: DaemonProc, sb: Sandbox) -> None:
    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([SANDBOXCTL, "--socket", daemon.socket, *args],
                              capture_output=True, text=True, timeout=60, check=False)

    out = ctl("port", sb.id, "8009")
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    assert url.startswith("http://127.0.0.1:") and _listening(_host_port(url))
    listed = ctl("port", sb.id)
    assert listed.stdout.split() == ["8009", "8009", url]
    assert ctl("unport", sb.id, "8009").returncode == 0
    assert not _listening(_host_port(url))
    again = ctl("unport", sb.id, "8009")
    assert again.returncode == 0 and "was not exposed" in again.stderr


# --- exposures go with their room ----------------------------------------------------------------


def _expose_live(d: DaemonProc, c: Client, room: str) -> tuple[list[int], str, socket.socket]:
    sb = c.sandbox(room)
    start_script(d, sb, "echo.py", ECHO, 8010)
    ports = [_host_port(sb.expose_port(8010).url), _host_port(sb.expose_port(8011).url)]
    path = sb.expose_port(8012, unix_socket=True).path
    live = socket.create_connection(("127.0.0.1", ports[0]), timeout=30)
    live.sendall(b"ping")
    assert live.recv(4) == b"ping"  # a forwarded connection is open
    return ports, path, live


def test_destroy_leaves_no_listener_or_socket(fresh_daemon: DaemonProc) -> None:
    d = fresh_daemon
    d.start()
    pid = d.proc.pid  # type: ignore[union-attr]
    with d.client() as c:  # type: ignore[attr-defined]
        c.sandbox("ports").get()
        before = _socket_fds(pid)
        ports, path, live = _expose_live(d, c, "ports")
        assert _socket_fds(pid) > before and all(_listening(p) for p in ports)
        with live:
            assert c.sandbox("ports").destroy().destroyed is True
            live.settimeout(30)
            assert live.recv(4) == b""  # the forwarded connection was closed
        assert not any(_listening(p) for p in ports)
        assert all(_refused(p) for p in ports) and not os.path.exists(path)
        for _ in range(100):  # (the server's exec connection goes when its thread sees it)
            if _socket_fds(pid) <= before:
                break
            time.sleep(0.05)
        assert _socket_fds(pid) <= before, os.listdir(f"/proc/{pid}/fd")


def test_shutdown_leaves_no_listener(fresh_daemon: DaemonProc) -> None:
    d = fresh_daemon
    d.start()
    with d.client() as c:  # type: ignore[attr-defined]
        ports, path, live = _expose_live(d, c, "ports")
    with live:
        assert d.stop() == 0, d.log()
        live.settimeout(30)
        with contextlib.suppress(ConnectionResetError):
            assert live.recv(4) == b""
    assert not any(_listening(p) for p in ports) and not os.path.exists(path)
    assert not d.leftovers()


def test_room_death_closes_its_ports(daemon: DaemonProc, sb: Sandbox) -> None:
    port = _host_port(sb.expose_port(8013).url)
    assert _listening(port)
    with open(os.path.join(daemon.state_dir, "rooms", room_key(0, sb.id), "room.json")) as f:
        os.kill(int(json.load(f)["initPid"]), signal.SIGKILL)  # (as the OOM killer would)
    for _ in range(200):
        if not _listening(port):
            break
        time.sleep(0.05)
    assert not _listening(port) and _refused(port)
    with pytest.raises(errors.SandboxUnavailable):
        sb.get_exposed_ports()


# --- tenants -------------------------------------------------------------------------------------


def _connect_as(user: pwd.struct_passwd, path: str) -> str:
    prog = ("import socket, sys\n"
            "c = socket.socket(socket.AF_UNIX)\n"
            "c.settimeout(30)\n"
            f"c.connect({path!r})\n"
            "print('connected', repr(c.recv(16)))\n")
    res = subprocess.run(as_user(user, [sys.executable, "-c", prog]), capture_output=True,
                         text=True, timeout=60, check=False)
    return res.stdout.strip() or res.stderr.strip().splitlines()[-1]


def test_a_second_tenant_cannot_reach_anothers_ports(tenants: Any) -> None:  # noqa: F811
    d, alice, bob = tenants
    room = f"alice-{secrets.token_hex(3)}"
    assert call(alice, d, "writeFile", {"sandboxId": room, "path": "/workspace/greet.py",
                                        "content": GREETER})["success"]
    prog = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from sandboxd.client import Client\n"
            f"Client({d.socket!r}, timeout=300).sandbox({room!r}).exec("
            "'cd /workspace && exec timeout 120 python3 greet.py 8000')\n")
    server = subprocess.Popen(as_user(alice, [sys.executable, "-c", prog]))
    try:
        assert call(alice, d, "waitForPort", {"sandboxId": room, "port": 8000,
                                              "timeout": 30000})["ready"] is True
        exposed = call(alice, d, "exposePort", {"sandboxId": room, "port": 8000,
                                                "unixSocket": True})
        path = exposed["path"]
        assert _connect_as(alice, path) == "connected b'hello\\n'"
        # Bob reaches the file (it is 0666 under a rootless daemon) but is not served.
        assert _connect_as(bob, path) == "connected b''"
        # By id, bob only ever reaches a room of his own: nothing listed, nothing to unexpose.
        assert call(bob, d, "getExposedPorts", {"sandboxId": room}) == {"ports": []}
        assert call(bob, d, "unexposePort", {"sandboxId": room, "port": 8000}) == {
            "port": 8000, "unexposed": False}
        assert call(alice, d, "getExposedPorts", {"sandboxId": room}) == {"ports": [exposed]}
        assert _connect_as(alice, path) == "connected b'hello\\n'"
    finally:
        call(alice, d, "destroy", {"sandboxId": room})
        call(bob, d, "destroy", {"sandboxId": room})
        server.kill()
        server.wait(30)
