"""The systemd units and snippets, and sandboxd._systemd (sd_notify, socket activation, watchdog).

`systemd-analyze verify` exits 0 even for a misspelt key: it only prints a warning. So the test
fails on any output on stderr. Debian 12's systemd (252) does not know DelegateSubgroup= (254) and
warns about it, so the verify runs with the systemd of the trixie tree that tests/systemd builds
(systemd-nspawn, non-boot, --volatile=overlay so the cached tree stays pristine), unless the host's
own systemd-analyze is new enough.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sandboxd import _systemd

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
sys.path.insert(0, str(ROOT / "tests" / "systemd"))
import nspawn  # noqa: E402

DAEMON_BIN = "/opt/sandboxd/venv/bin/sandboxd"


# --- systemd-analyze verify ----------------------------------------------------------------------

def _systemd_version(analyze: str) -> int:
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=True)
    m = re.match(r"systemd (\d+)", out.stdout)
    return int(m.group(1)) if m else 0


VERIFY_SCRIPT = textwrap.dedent("""\
    set -e
    # verify checks that ExecStart= is executable; the tree has no sandboxd installed
    mkdir -p /opt/sandboxd/venv/bin
    printf '#!/bin/sh\\n' > /opt/sandboxd/venv/bin/sandboxd
    chmod +x /opt/sandboxd/venv/bin/sandboxd
    rc=0
    for step in "systemd-analyze verify /units/sandboxd.socket /units/sandboxd.service" \\
                "systemd-sysusers /units/sysusers.d/sandboxd.conf" \\
                "systemd-tmpfiles --create /units/tmpfiles.d/sandboxd.conf"; do
        SYSTEMD_LOG_LEVEL=notice $step 2>/tmp/err || rc=$?
        echo "== $step"; cat /tmp/err
    done
    echo "== state"
    getent passwd sandboxd | cut -d: -f1,6,7
    stat -c '%U:%G %a %n' /run/sandboxd /var/lib/sandboxd /var/lib/sandboxd/state
    exit $rc
    """)


def _verify(units: Path) -> subprocess.CompletedProcess[str]:
    """Run VERIFY_SCRIPT on `units` with a systemd that knows every setting we use."""
    if (why := nspawn.missing_requirements()) is not None:
        pytest.skip(f"systemd-analyze verify needs systemd >= 254 or the nspawn tree: {why}")
    tree = nspawn.build_tree()
    return nspawn.run_in_tree(tree, ["/bin/sh", "-c", VERIFY_SCRIPT],
                              binds_ro=[(str(units), "/units")])


def _sections(out: str) -> dict[str, str]:
    parts = re.split(r"^== (.*)$", out, flags=re.M)
    return {parts[i].split()[0]: parts[i + 1].strip() for i in range(1, len(parts), 2)}


def test_units_and_snippets_verify_without_any_warning() -> None:
    res = _verify(UNITS)
    sections = _sections(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    # Each step's stderr, captured separately inside the container: must be empty.
    assert sections["systemd-analyze"] == "", sections["systemd-analyze"]
    assert sections["systemd-sysusers"] == "", sections["systemd-sysusers"]
    assert sections["systemd-tmpfiles"] == "", sections["systemd-tmpfiles"]
    assert "sandboxd:/var/lib/sandboxd:/usr/sbin/nologin" in sections["state"]
    for d in ("/run/sandboxd", "/var/lib/sandboxd", "/var/lib/sandboxd/state"):
        assert f"sandboxd:sandboxd 755 {d}" in sections["state"]


def test_verify_catches_a_misspelt_key(tmp_path: Path) -> None:
    """The check above is only worth something if a typo makes it fail (verify still exits 0)."""
    units = tmp_path / "units"
    shutil.copytree(UNITS, units)
    svc = units / "sandboxd.service"
    svc.write_text(svc.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    sections = _sections(_verify(units).stdout)
    assert "ProtectSystm" in sections["systemd-analyze"]


def test_host_systemd_analyze_agrees_except_for_newer_keys() -> None:
    """On an older host systemd the only complaint may be about keys newer than it."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze on the host")
    res = subprocess.run([analyze, "verify", str(UNITS / "sandboxd.socket"),
                          str(UNITS / "sandboxd.service")], capture_output=True, text=True,
                         env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    newer = {"DelegateSubgroup": 254}
    version = _systemd_version(analyze)
    allowed = [k for k, v in newer.items() if version < v]
    unexpected = [ln for ln in lines
                  if not any(f"Unknown key name '{k}'" in ln or f"Unknown key '{k}'" in ln
                             for k in allowed)
                  and "is not executable" not in ln and "No such file" not in ln]
    assert unexpected == [], res.stderr


def test_unit_settings_that_matter() -> None:
    svc = (UNITS / "sandboxd.service").read_text()
    sock = (UNITS / "sandboxd.socket").read_text()
    settings = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in svc.splitlines()
                if "=" in ln and not ln.startswith("#")}
    assert settings["Type"] == "notify"
    assert settings["User"] == "sandboxd"
    assert settings["Delegate"] == "yes"
    assert settings["DelegateSubgroup"] == "supervisor"
    assert settings["Restart"] == "on-failure"
    assert settings["OOMPolicy"] == "continue"
    assert settings["RuntimeDirectoryPreserve"] == "yes"
    assert "NoNewPrivileges" not in settings  # newuidmap is setuid
    assert "ListenStream=/run/sandboxd/sandboxd.sock" in sock
    assert "SocketMode=0660" in sock and "SocketGroup=sandboxd" in sock
    # Each hardening setting that is not used says why, on one line.
    for name in ("NoNewPrivileges", "PrivateUsers", "ProtectKernelTunables",
                 "ProtectControlGroups", "ProtectHostname", "MemoryDenyWriteExecute"):
        assert re.search(rf"^# {name}=\S*: \S", svc, re.M), name


# --- sd_notify -----------------------------------------------------------------------------------

def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(address)
    sock.settimeout(5)
    return sock


def _recv_with_pid(sock: socket.socket) -> tuple[bytes, int]:
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = 0
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = int.from_bytes(payload[:4], sys.byteorder)
    return data, pid


def test_notify_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with _receiver(path) as rx:
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert _systemd.notify("READY=1\nSTATUS=serving") is True
        data, pid = _recv_with_pid(rx)
    assert data == b"READY=1\nSTATUS=serving"
    assert pid == os.getpid()  # what NotifyAccess=main checks


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"sandboxd-test-{uuid.uuid4().hex}"
    with _receiver("\0" + name) as rx:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert _systemd.notify("STOPPING=1") is True
        assert rx.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_is_a_no_op(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert _systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert _systemd.notify("READY=1") is False  # logged, never raised
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert _systemd.notify("READY=1") is False


# --- watchdog ------------------------------------------------------------------------------------

def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert _systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert _systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert _systemd.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # armed for another process
    assert _systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert _systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "5000000")
    assert _systemd.watchdog_interval(unset_environment=True) == 5.0
    assert "WATCHDOG_USEC" not in os.environ and "WATCHDOG_PID" not in os.environ


# --- socket activation ---------------------------------------------------------------------------

def test_listen_fds_ignores_fds_meant_for_another_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "sandboxd.socket")
    assert _systemd.listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)
    assert _systemd.listen_fds() == []  # nothing passed at all


CHILD = textwrap.dedent("""\
    import json, os, socket, sys
    from sandboxd import _systemd
    got = _systemd.listen_fds_with_names()
    info = {"names": [n for n, _ in got], "fds": [s.fileno() for _, s in got],
            "family": [int(s.family) for _, s in got], "type": [int(s.type) for _, s in got],
            "inheritable": [os.get_inheritable(s.fileno()) for _, s in got],
            "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
            "again": len(_systemd.listen_fds())}
    print(json.dumps(info), flush=True)
    conn, _ = got[0][1].accept()
    conn.sendall(b"hello from fd 3")
    conn.close()
    """)


def test_listen_fds_takes_the_socket_at_fd_3(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    # fd 3 in the child is our listener; LISTEN_PID=$$ survives the exec, as with systemd.
    argv = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" -c "$1"', sys.executable, CHILD]
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api",
           "PYTHONPATH": str(ROOT)}
    out_r, out_w = os.pipe()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=[
        (os.POSIX_SPAWN_DUP2, listener.fileno(), 3),
        (os.POSIX_SPAWN_DUP2, out_w, 1)])
    os.close(out_w)
    listener.close()  # the child now holds the only copy
    try:
        with os.fdopen(out_r) as out:
            info = json.loads(out.readline())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(10)
            c.connect(path)
            assert c.recv(100) == b"hello from fd 3"
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert info == {"names": ["api"], "fds": [3], "family": [int(socket.AF_UNIX)],
                    "type": [int(socket.SOCK_STREAM)], "inheritable": [False], "env": [],
                    "again": 0}


def _activate_cmd(sock: str, *env: str) -> list[str]:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed (apt-get install systemd)")
    # systemd-socket-activate passes only the variables named with -E.
    return [tool, "--listen", sock, *(f"-E{e}" for e in ("PATH", "HOME", *env))]


def test_systemd_socket_activate_starts_a_listener(tmp_path: Path) -> None:
    sock = str(tmp_path / "act.sock")
    child = ("from sandboxd import _systemd\n"
             "s = _systemd.listen_fds()[0]\n"
             "c, _ = s.accept(); c.sendall(b'activated'); c.close()\n")
    proc = subprocess.Popen([*_activate_cmd(sock, f"PYTHONPATH={ROOT}"), sys.executable, "-c",
                             child], stderr=subprocess.DEVNULL)
    try:
        # The path appears at bind(), before listen(): retry the connect until it listens.
        c = _connect_when_listening(sock, 30)
        with c:
            c.settimeout(30)  # the connection starts the child, which accepts on fd 3
            assert c.recv(100) == b"activated"
    finally:
        proc.terminate()
        proc.wait(10)


def _connect_when_listening(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            c.connect(path)
            return c
        except (FileNotFoundError, ConnectionRefusedError):
            c.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_systemd_socket_activate_starts_sandboxd(tmp_path: Path) -> None:
    """The real daemon on a passed socket: READY=1 on NOTIFY_SOCKET, ping works, the daemon
    served systemd's socket (same inode) and left it in place at exit (systemd owns it)."""
    if not (ROOT / "sandboxd" / "daemon.py").exists():
        pytest.skip("sandboxd/daemon.py does not exist yet")
    sock = str(tmp_path / "sandboxd.sock")
    notify_path = str(tmp_path / "notify")
    state = tmp_path / "state"
    cmd = [*_activate_cmd(sock, f"PYTHONPATH={ROOT}", f"NOTIFY_SOCKET={notify_path}"),
           sys.executable, "-m", "sandboxd", "--socket", sock, "--state-dir", str(state),
           "--rootfs", "host", "--log-level", "info"]
    log = tmp_path / "daemon.log"
    with _receiver(notify_path) as rx, open(log, "w") as logf:
        rx.settimeout(0.2)
        proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, start_new_session=True)
        try:
            _wait_for(lambda: os.path.exists(sock), 10, "systemd-socket-activate to listen")
            inode = os.stat(sock).st_ino
            # systemd-socket-activate starts the daemon on the first connection.
            from sandboxd.client import Client
            start = time.monotonic()
            messages: list[bytes] = []
            # The path appears at bind(), before listen(): the first connection (which starts
            # the daemon) is retried until it is accepted, then the client's is the second.
            _connect_when_listening(sock, 30).close()
            with Client(sock, 30) as client:
                result = client.ping()
            while not any(b"READY=1" in m.split(b"\n") for m in messages):
                if time.monotonic() - start > 30:
                    raise TimeoutError(f"no READY=1; got {messages}\n{log.read_text()}")
                try:
                    messages.append(rx.recv(4096))
                except TimeoutError:
                    pass
            assert result, log.read_text()
            assert os.stat(sock).st_ino == inode, "the daemon re-bound the socket"
            proc.send_signal(signal.SIGTERM)  # the daemon alone, as KillMode=mixed does
            assert proc.wait(30) == 0, log.read_text()
            with pytest.raises(TimeoutError):
                while True:
                    messages.append(rx.recv(4096))
            assert any(b"STOPPING=1" in m.split(b"\n") for m in messages), messages
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    assert os.path.exists(sock), "the daemon removed a socket it did not create"
