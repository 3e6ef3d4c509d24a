"""Fixtures and helpers of the security suite: a daemon of its own, client users, host probes,
latency. (Not a conftest.py: a second module named ``conftest`` would shadow the root one for
tests that ``from conftest import ...``; test modules import the fixtures they use from here.)

The suite's daemon runs as a dedicated unprivileged user (``sbxsec``, set up with ``sandboxctl
setup`` like any user) rather than the session's ``sbxtest``: v1 cgroup parents are per daemon
user, and a second daemon of the same user reconciles (kills) the first one's room cgroups at its
start-up — other suites running in parallel must not be able to turn an attack test into a
false pass or fail. Its socket belongs to group ``sbxclients`` (``socket_group``), so the two
unprivileged client users ``sbxtest`` and ``sbxother`` can both connect.

Host-side checks run as root here: they plant secrets, look up host pids, and play "the
attacker after an escape" by running code under a room's host uid (setpriv).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DaemonProc,
    _ensure_user,
    _setup_user,
    as_user,
    make_daemon,
    skip_unless_ci,
)

from sandboxd.client import Client

SEC_USER = "sbxsec"
CLIENT_GROUP = "sbxclients"
LATENCY_LOG = Path(os.environ.get("SANDBOXD_LATENCY_LOG", "/tmp/sandboxd-attack-latency.json"))


def client_of(d: DaemonProc, timeout: float | None = 120) -> Client:
    """A typed client of ``d`` (DaemonProc.client is typed ``object``)."""
    return Client(d.socket, timeout=timeout)


# --- users and daemons -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sec_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        skip_unless_ci("security tests need root to create users and inspect the host")
    return _setup_user(SEC_USER)


@pytest.fixture(scope="session")
def client_users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    """Two unprivileged client users (not the daemon's), both in the socket's group."""
    if os.geteuid() != 0:
        skip_unless_ci("needs root to create users")
    return (_ensure_user("sbxtest", groups=(CLIENT_GROUP,)),
            _ensure_user("sbxother", groups=(CLIENT_GROUP,)))


def write_config(d: DaemonProc, **settings: object) -> None:
    """Give ``d`` a TOML config (before start)."""
    path = os.path.join(os.path.dirname(d.state_dir), "sandboxd.toml")
    lines = []
    for k, v in settings.items():
        lines.append(f"{k} = {json.dumps(v)}")
    Path(path).write_text("\n".join(lines) + "\n")
    os.chmod(path, 0o644)
    d.extra_args += ["--config", path]


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` (the daemon, usually), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> set[int]:
    """Host pids below ``pid`` (the zygote, room inits and payloads of a daemon)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def stop_and_check(d: DaemonProc) -> None:
    mine = descendants(d.proc.pid) if d.proc is not None else set()
    code = d.stop()
    # The daemon's descendants get a generous 10 s to be gone (reaped by their parents or
    # init), polled, then whatever is left is a leftover: no fixed 200 ms pause.
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in mine) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = d.leftovers() + [f"process {p}" for p in sorted(mine)
                            if Path(f"/proc/{p}").exists()]
    if code == 0 and not left:
        shutil.rmtree(os.path.dirname(d.state_dir), ignore_errors=True)
    assert code == 0, f"sandboxd exited {code}:\n{d.log()[-4000:]}"
    assert not left, f"left behind: {left}"


#: "single" runs the suite's daemons in single-id mode (the room's root is the daemon's uid),
#: as a host without newuidmap would: scripts/test.sh runs the escape suite a second time so.
ID_MODE = os.environ.get("SANDBOXD_TEST_ID_MODE", "subordinate")
if ID_MODE not in ("subordinate", "single"):
    raise RuntimeError(f"SANDBOXD_TEST_ID_MODE={ID_MODE!r}: subordinate or single")


def start_daemon(user: pwd.struct_passwd, *, rootfs: str | None = None,
                 id_mode: str | None = None, **settings: object) -> DaemonProc:
    d = make_daemon(user, rootfs=rootfs)
    if (id_mode or ID_MODE) == "single":
        d.env = {"PATH": "/nonexistent"}  # no newuidmap/newgidmap: the single-id fallback
    write_config(d, **settings)
    d.start()
    with Client(d.socket) as c:
        mode = c.ping()["capabilities"]["idMapping"]
    assert mode == (id_mode or ID_MODE), f"daemon maps ids as {mode!r}"
    return d


@pytest.fixture(scope="session")
def sec_daemon(sec_user: pwd.struct_passwd,
               client_users: tuple[pwd.struct_passwd, pwd.struct_passwd]) -> Iterator[DaemonProc]:
    # The daemon's user must be in the group to hand the socket to it (chown rules).
    subprocess.run(["usermod", "-aG", CLIENT_GROUP, sec_user.pw_name], check=True)
    d = start_daemon(pwd.getpwnam(sec_user.pw_name), socket_group=CLIENT_GROUP)
    yield d
    stop_and_check(d)


@pytest.fixture
def sec_client(sec_daemon: DaemonProc) -> Iterator[Any]:
    c = client_of(sec_daemon)
    yield c
    c.close()


@pytest.fixture
def rooms(sec_client: Any, room_id: str) -> Iterator[Any]:
    """rooms(n) -> n fresh sandbox handles, destroyed after the test."""
    made: list[Any] = []

    def make(n: int = 1) -> list[Any]:
        out = [sec_client.sandbox(f"{room_id[:50]}-{len(made) + i}") for i in range(n)]
        made.extend(out)
        return out

    yield make
    for sb in made:
        with contextlib.suppress(Exception):
            sb.destroy()


# --- host probes -------------------------------------------------------------------------------


def daemon_pid(d: DaemonProc) -> int:
    assert d.proc is not None
    return d.proc.pid


def proc_uids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def host_pids_of(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in Path(f"/proc/{name}/cmdline").read_bytes():
                out.append(int(name))
    return out


def wait_for_pids(marker: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = host_pids_of(marker)
        if pids:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"no process with {marker!r} appeared")


def slice_range(d: DaemonProc) -> tuple[int, int]:
    with client_of(d) as c:
        s = c.ping()["capabilities"]["idSlices"]
    assert s["mode"] == "subordinate", s
    return s["uidStart"], s["uidStart"] + s["slices"] * s["sliceSize"]


def as_host_uid(uid: int, code: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` on the host as ``uid`` (gid = uid, no groups, no capabilities):
    what a process that escaped its room's namespaces would be."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--", sys.executable, "-I", "-c", code]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def run_as_client(user: pwd.struct_passwd, socket: str, code: str,
                  timeout: float = 60) -> Any:
    """Run a client snippet as ``user``; it gets ``c`` (a connected Client) and ``errors``, and
    must assign a JSON-serialisable ``out``; errors become {"error": CODE}."""
    prog = (
        "import json, sys\n"
        "sys.path.insert(0, '/work/main')\n"
        "from sandboxd.client import Client\n"
        "from sandboxd import errors\n"
        "out = None\n"
        f"c = Client({socket!r}, timeout=30)\n"
        "try:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except errors.SandboxError as err:\n"
        "    out = {'error': err.code}\n"
        "print(json.dumps(out))\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    argv = as_user(user, [sys.executable, "-c", prog.replace("/work/main", root)])
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


# --- neighbour latency during attacks ----------------------------------------------------------


class Latency:
    """Pings a neighbouring room in a loop (its own connection) while an attack runs."""

    def __init__(self, d: DaemonProc, room: str, name: str) -> None:
        self.d = d
        self.room = room
        self.name = name
        self.samples: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with client_of(self.d, timeout=30) as c:
            sb = c.sandbox(self.room)
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    sb.ping()
                    self.samples.append((time.perf_counter() - t) * 1000)
                except Exception as err:  # noqa: BLE001 - recorded and asserted on
                    self.errors.append(repr(err))
                self._stop.wait(0.05)

    def __enter__(self) -> Latency:
        with client_of(self.d) as c:
            c.sandbox(self.room).exec("true")  # create the neighbour before the attack
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # An attack the jail ends fast (a room-wide OOM takes ~100 ms) may leave fewer than
        # three pings inside it: keep pinging until there are three, so check() always has
        # figures from the attack and right after it (the neighbour must answer throughout).
        deadline = time.monotonic() + 30
        while (len(self.samples) + len(self.errors) < 3 and self._thread.is_alive()
               and time.monotonic() < deadline):
            time.sleep(0.02)
        self._stop.set()
        self._thread.join(40)
        self.record()

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        return {"attack": self.name, "samples": len(s),
                "p50_ms": round(statistics.median(s), 1) if s else None,
                "max_ms": round(s[-1], 1) if s else None, "errors": len(self.errors)}

    def record(self) -> None:
        data: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(LATENCY_LOG.read_text())
        data[self.name] = self.summary()
        LATENCY_LOG.write_text(json.dumps(data, indent=1))
        print(f"neighbour ping during {self.name}: {self.summary()}")

    def check(self, max_ms: float = 2000) -> None:
        s = self.summary()
        assert not self.errors, self.errors[:3]
        assert s["samples"] >= 3, s
        assert s["max_ms"] < max_ms, s


@pytest.fixture
def latency(sec_daemon: DaemonProc, room_id: str) -> Any:
    def make(name: str) -> Latency:
        return Latency(sec_daemon, f"{room_id[:40]}-nb", name)

    return make


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
