"""Egress from the wire (issue 14): no network by default; an allowed name:port is reachable by
urllib, a raw socket, curl, git and node; other ports and names are refused fast and logged;
wildcards; SNI and Host are checked as names; the SSRF guard (a name pinned to a loopback
address is refused unless that literal address is listed); bandwidth; a policy change on a live
room; counters; remote gitCheckout; two rooms with different policies; nothing left behind.

Every server here is the test's own, on the host's 127.0.0.1: rooms reach them only through
names pinned by ``hosts`` (a room's own 127.0.0.1 is its own loopback). No test opens a
connection to any other address.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProc
from test_limits import _daemon_pids, host_ok

from sandboxd import errors

pytestmark = pytest.mark.integration


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/big/"):
            size = int(self.path.rsplit("/", 1)[1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"x" * 65536
            left = size
            while left > 0:
                self.wfile.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
            return
        body = f"hello {self.headers.get('Host')} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _GitHandler(http.server.BaseHTTPRequestHandler):
    """Smart HTTP (what a shallow clone needs): each request through ``git http-backend``."""

    root = ""

    def log_message(self, *args: Any) -> None:
        pass

    def _cgi(self) -> None:
        path, _, query = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = {"GIT_PROJECT_ROOT": self.root, "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
               "QUERY_STRING": query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "PATH": os.environ["PATH"]}
        out = subprocess.run(["git", "http-backend"], input=body, env=env,
                             capture_output=True, check=False).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.split(b"\r\n"):
            k, _, v = line.decode().partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _cgi


class Server:
    def __init__(self, directory: str | None = None) -> None:
        if directory is None:
            handler: Any = _Handler
        else:
            handler = type("Git", (_GitHandler,), {"root": directory})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def web() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def policy(port: int, *extra: str, hosts: dict[str, str] | None = None,
           **kw: Any) -> dict[str, Any]:
    return {"allow": [f"allowed.test:{port}", "127.0.0.1", *extra],
            "hosts": {"allowed.test": "127.0.0.1", **(hosts or {})}, **kw}


PY_GET = ("import sys, urllib.request\n"
          "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode(), end='')")
PY_CONNECT = ("import socket, sys, time\nt = time.monotonic()\n"
              "try:\n"
              "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)\n"
              "    s.sendall(b'GET / HTTP/1.0\\r\\nHost: ' + sys.argv[1].encode()"
              " + b'\\r\\n\\r\\n')\n"
              "    d = s.recv(100)\n    print('read', len(d))\n"
              "except OSError as e:\n    print('error', type(e).__name__)\n"
              "print('took', round(time.monotonic() - t, 2))")


def test_no_network_by_default(client: Any, web: Server, room_id: str) -> None:
    sb = client.sandbox(room_id)
    r = sb.exec("python3", ["-c", PY_CONNECT, "1.2.3.4", "80"])  # (never leaves the room)
    assert r.stdout.startswith("error"), r.raw
    with pytest.raises(errors.InvalidParams):
        client.call("getSandbox", {"sandboxId": room_id + "x", "options": {"network": 3}})
    with pytest.raises(errors.ValidationError, match=r"not\.an:entry:x"):
        client.sandbox(room_id + "y").get({"network": {"allow": ["not.an:entry:x"]}})


def test_allowed_name_is_reachable_by_every_client(client: Any, daemon: DaemonProc,
                                                   web: Server, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.get({"network": policy(web.port)})
    url = f"http://allowed.test:{web.port}/x"
    r = sb.exec("python3", ["-c", PY_GET, url])
    assert r.stdout == f"hello allowed.test:{web.port} /x\n", (r.stderr, sb.get_network_log())
    r = sb.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(web.port)])
    assert r.stdout.startswith("read "), r.raw
    r = sb.exec("curl", ["-sS", "--max-time", "10", url])
    assert r.stdout == f"hello allowed.test:{web.port} /x\n", r.raw
    r = sb.exec("node", ["-e", f"fetch('{url}').then(r => r.text()).then(t => process.stdout"
                               ".write(t), e => { console.error(e); process.exit(1) })"])
    assert r.stdout == f"hello allowed.test:{web.port} /x\n", r.raw
    log = sb.get_network_log()
    assert log.stats.connections >= 4 and all(e.allowed for e in log.entries
                                              if e.protocol == "tcp"), log
    st = client.stats(room_id)
    assert st.sandboxes[0].network.connections >= 4, st
    host_ok(daemon, sb)


def test_other_ports_and_names_are_refused_fast_and_logged(client: Any, web: Server,
                                                           room_id: str) -> None:
    sb = client.sandbox(room_id)
    other = Server()
    try:
        sb.get({"network": policy(web.port, hosts={"other.test": "127.0.0.1"})})
        # the same host on another port
        r = sb.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(other.port)])
        out = r.stdout.split()
        assert out[0] == "error" and float(out[-1]) < 5, r.raw
        # a name pinned by hosts but not allowed: resolvable, not reachable
        r = sb.exec("python3", ["-c", PY_CONNECT, "other.test", str(web.port)])
        assert r.stdout.startswith("error"), r.raw
        # a name neither allowed nor pinned does not even resolve
        r = sb.exec("python3", ["-c", "import socket\ntry:\n socket.getaddrinfo('nope.test', 80)"
                                      "\nexcept socket.gaierror as e: print('gaierror')"])
        assert r.stdout == "gaierror\n", r.raw
        # UDP other than DNS is refused at once
        r = sb.exec("python3", ["-c", "import socket\ns = socket.socket(socket.AF_INET, "
                                      "socket.SOCK_DGRAM)\ns.connect(('198.51.100.1', 9))\n"
                                      "try:\n s.send(b'x'); s.send(b'x'); print('sent')\n"
                                      "except OSError as e: print('refused', e.errno)"])
        assert r.stdout.startswith("refused"), r.raw
        entries = sb.get_network_log().entries
        refused = [(e.protocol, e.name, e.port) for e in entries if not e.allowed]
        assert ("tcp", "allowed.test", other.port) in refused, entries
        assert ("tcp", "other.test", web.port) in refused, entries
        assert ("dns", "nope.test", 53) in refused, entries
        assert all(e.reason for e in entries if not e.allowed)
    finally:
        other.close()


def test_wildcards_and_hosts(client: Any, web: Server, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.get({"network": {"allow": [f"*.svc.test:{web.port}", "127.0.0.1"],
                        "hosts": {"a.svc.test": "127.0.0.1", "b.x.svc.test": "127.0.0.1",
                                  "svc.test": "127.0.0.1"}}})
    for name, ok in (("a.svc.test", True), ("b.x.svc.test", True), ("svc.test", False)):
        r = sb.exec("python3", ["-c", PY_CONNECT, name, str(web.port)])
        assert r.stdout.startswith("read ") is ok, (name, r.raw)


def _tls_server(tmp: Path) -> tuple[socket.socket, int]:
    key, cert = tmp / "k.pem", tmp / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=allowed.test"],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()

    def serve() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError):
                s = ctx.wrap_socket(c, server_side=True)
                s.sendall(b"tls-hello")
                s.close()
    threading.Thread(target=serve, daemon=True).start()
    return ls, ls.getsockname()[1]


def test_sni_and_host_are_checked_as_names(client: Any, web: Server, room_id: str,
                                           tmp_path: Path) -> None:
    ls, tls_port = _tls_server(tmp_path)
    try:
        sb = client.sandbox(room_id)
        sb.get({"network": policy(tls_port, f"allowed.test:{web.port}",
                                  hosts={"other.test": "127.0.0.1"})})
        tls = ("import socket, ssl, sys\nctx = ssl.create_default_context()\n"
               "ctx.check_hostname = False\nctx.verify_mode = ssl.CERT_NONE\n"
               f"s = socket.create_connection(('allowed.test', {tls_port}), timeout=10)\n"
               "try:\n    t = ctx.wrap_socket(s, server_hostname=sys.argv[1])\n"
               "    print(t.recv(100).decode())\n"
               "except OSError as e:\n    print('error', type(e).__name__)")
        assert sb.exec("python3", ["-c", tls, "allowed.test"]).stdout == "tls-hello\n"
        r = sb.exec("python3", ["-c", tls, "other.test"])
        assert r.stdout.startswith("error"), r.raw
        # plain HTTP: the Host header, to the same address and port
        host = ("import socket, sys\n"
                f"s = socket.create_connection(('allowed.test', {web.port}), timeout=10)\n"
                "s.sendall(b'GET / HTTP/1.1\\r\\nHost: ' + sys.argv[1].encode() + "
                "b'\\r\\nConnection: close\\r\\n\\r\\n')\n"
                "try:\n    print(s.recv(200).split(b'\\r\\n')[0].decode())\n"
                "except OSError as e:\n    print('error', type(e).__name__)")
        assert sb.exec("python3", ["-c", host, "allowed.test"]).stdout == "HTTP/1.0 200 OK\n"
        r = sb.exec("python3", ["-c", host, "other.test"])
        assert r.stdout.startswith("error") or r.stdout == "\n", r.raw
        reasons = [e.reason or "" for e in sb.get_network_log().entries if not e.allowed]
        assert any("SNI other.test" in x for x in reasons), reasons
        assert any("Host other.test" in x for x in reasons), reasons
    finally:
        ls.close()


def test_the_ssrf_guard(client: Any, web: Server, room_id: str) -> None:
    # A name that resolves to a loopback address is refused unless that literal is listed.
    sb = client.sandbox(room_id)
    sb.get({"network": {"allow": [f"allowed.test:{web.port}"],
                        "hosts": {"allowed.test": "127.0.0.1"}}})
    r = sb.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(web.port)])
    assert r.stdout.startswith("error"), r.raw
    reason = [e.reason for e in sb.get_network_log().entries if not e.allowed][-1]
    assert "loopback" in (reason or ""), reason
    sb.set_network_policy({"allow": [f"allowed.test:{web.port}", "127.0.0.0/8"],
                           "hosts": {"allowed.test": "127.0.0.1"}})
    r = sb.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(web.port)])
    assert r.stdout.startswith("read "), r.raw


def test_bandwidth_is_within_20_percent(client: Any, web: Server, room_id: str) -> None:
    sb = client.sandbox(room_id)
    rate = 1 << 20
    sb.get({"network": policy(web.port, bandwidthBytesPerSec=rate)})
    size = 3 * rate
    r = sb.exec("python3", ["-c", "import sys, time, urllib.request\nt = time.monotonic()\n"
                                  "n = len(urllib.request.urlopen(sys.argv[1]).read())\n"
                                  "print(n, time.monotonic() - t)",
                            f"http://allowed.test:{web.port}/big/{size}"], timeout=60)
    n, took = r.stdout.split()
    assert int(n) == size, r.raw
    measured = size / float(took)
    assert 0.8 * rate <= measured <= 1.2 * rate, (measured, rate)


def test_a_live_policy_change_and_null_cut_the_room_off(client: Any, web: Server,
                                                        room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.get({"network": policy(web.port)})
    # A slow download in the background: null must close it.
    proc = sb.start_process("python3", ["-c", "import sys, urllib.request\ntry:\n"
                                        " r = urllib.request.urlopen(sys.argv[1]); r.read()\n"
                                        " print('complete')\nexcept Exception as e:\n"
                                        " print('cut', type(e).__name__)",
                                        f"http://allowed.test:{web.port}/big/{64 << 20}"])
    sb.set_network_policy({"allow": ["127.0.0.1"], "hosts": {}, "bandwidthBytesPerSec": 65536})
    r = sb.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(web.port)])
    assert r.stdout.startswith("error"), r.raw  # no longer allowed (nor resolvable)
    sb.set_network_policy(None)
    proc.wait(timeout=30)
    assert proc.logs().stdout.startswith("cut"), proc.logs()
    assert sb.get().options.get("network") is None
    sb.set_network_policy(policy(web.port))
    r = sb.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(web.port)])
    assert r.stdout.startswith("read "), r.raw


def test_remote_git_checkout(client: Any, room_id: str, tmp_path: Path) -> None:
    repo = tmp_path / "src"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME":
           "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q", "-b", "main", str(repo)],
                ["git", "-C", str(repo), "commit", "-q", "--allow-empty", "-m", "one"],
                ["git", "-C", str(repo), "checkout", "-q", "-b", "dev"],
                ["sh", "-c", f"echo dev > {repo}/f && git -C {repo} add f && "
                             f"git -C {repo} commit -q -m two"],
                ["git", "clone", "-q", "--bare", str(repo), str(tmp_path / "srv" / "r.git")],
                ["git", "-C", str(tmp_path / "srv" / "r.git"), "update-server-info"]):
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    srv = Server(str(tmp_path / "srv"))
    try:
        sb = client.sandbox(room_id)
        sb.get({"network": {"allow": [f"git.test:{srv.port}", "127.0.0.1"],
                            "hosts": {"git.test": "127.0.0.1"}}})
        res = sb.git_checkout(f"http://git.test:{srv.port}/r.git", branch="dev",
                              target_dir="/workspace/r", depth=1)
        assert res.branch == "dev"
        assert sb.exec("cat /workspace/r/f").stdout == "dev\n"
        assert sb.exec("git -C /workspace/r rev-list --count HEAD").stdout == "1\n"
        with pytest.raises(errors.GitRepositoryNotFound):
            sb.git_checkout(f"http://git.test:{srv.port}/missing.git", target_dir="/workspace/m")
        with pytest.raises(errors.GitCloneFailed):
            sb.git_checkout(f"http://refused.test:{srv.port}/r.git", target_dir="/workspace/n")
    finally:
        srv.close()


def test_two_rooms_with_different_policies(client: Any, web: Server, room_id: str) -> None:
    a, b = client.sandbox(room_id + "-a"), client.sandbox(room_id + "-b")
    a.get({"network": policy(web.port)})
    b.get({"network": {"allow": ["127.0.0.1"], "hosts": {"allowed.test": "127.0.0.1"}}})
    assert a.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(web.port)]
                  ).stdout.startswith("read ")
    assert b.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(web.port)]
                  ).stdout.startswith("error")
    a.destroy()
    b.destroy()


def test_ping_says_egress_is_available(client: Any) -> None:
    eg = client.ping().capabilities.egress
    assert eg["available"] is True and "nftables" in eg["mechanism"], eg


def test_destroy_leaves_no_listener_behind(client: Any, daemon: DaemonProc, web: Server,
                                           room_id: str) -> None:
    pid = _daemon_pids(daemon)[0]

    def sockets() -> int:
        n = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        return n
    client.ping()
    base = sockets()
    sb = client.sandbox(room_id)
    sb.get({"network": policy(web.port)})
    assert sb.exec("python3", ["-c", PY_CONNECT, "allowed.test", str(web.port)]
                   ).stdout.startswith("read ")
    assert sockets() >= base + 4  # (the forwarder's listeners and the DNS sockets, at least)
    sb.destroy()
    deadline = time.monotonic() + 10
    while sockets() > base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sockets() == base
    host_ok(daemon, client.sandbox(room_id))
