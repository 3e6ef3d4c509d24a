"""Fixtures shared by every tier.

Integration and security tests drive a **real** sandboxd started as an unprivileged user, the
way a user runs it: the fixture (running as root) creates the user, runs ``sandboxctl setup`` for
it, starts ``sandboxd`` under that uid with its own socket and state dir, and at the end checks
the host side: no room process, cgroup, state file or mount of the daemon's is left behind.

Environment knobs:
  SANDBOXD_TEST_USER    the unprivileged user (default sbxtest; created if missing)
  SANDBOXD_TEST_ROOTFS  rootfs for the daemon (default "host"; the built tree for language tests)
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
SANDBOXD = str(VENV_BIN / "sandboxd")
SANDBOXCTL = str(VENV_BIN / "sandboxctl")
TEST_USER = os.environ.get("SANDBOXD_TEST_USER", "sbxtest")
OTHER_USER = "sbxother"
CGROUP_V1 = "/sys/fs/cgroup"


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        return pwd.getpwnam(name)


def as_user(user: pwd.struct_passwd, argv: list[str], **kw: object) -> list[str]:
    """argv run as ``user`` with a clean environment (setpriv keeps no capability)."""
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            "--inh-caps=-all", "--", "env", "-i", f"HOME={user.pw_dir}",
            f"USER={user.pw_name}", "PATH=/usr/bin:/bin", *argv]


@dataclass
class DaemonProc:
    user: pwd.struct_passwd
    socket: str
    state_dir: str
    log_path: str
    rootfs: str
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    #: environment of the daemon beyond as_user's clean one (e.g. a PATH without newuidmap)
    env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process for its lifetime
        env = [f"{k}={v}" for k, v in self.env.items()]
        argv = as_user(self.user, [*(["env", *env] if env else []), SANDBOXD,
                                   "--socket", self.socket, "--state-dir", self.state_dir,
                                   "--rootfs", self.rootfs, "--log-level", "info",
                                   *self.extra_args])
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd exited {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket):
                try:
                    with self.client() as c:  # type: ignore[attr-defined]
                        c.ping()
                    return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"sandboxd did not come up:\n{self.log()}")

    def client(self, timeout: float | None = 120) -> object:
        from sandboxd.client import Client

        return Client(self.socket, timeout=timeout)

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    # --- host-side checks ---------------------------------------------------------------------

    @property
    def instance(self) -> str:
        """The daemon's v1 cgroup instance directory name (see daemon.py)."""
        real = os.path.realpath(self.state_dir).encode()
        return "i-" + hashlib.sha256(real).hexdigest()[:12]

    def zygote_pids(self) -> set[int]:
        if self.proc is None:
            return set()
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return set()
        return {int(p) for p in kids.split()}

    def leftovers(self, settle: float = 3.0) -> list[str]:
        """Everything of this daemon's rooms still on the host (empty when clean). A process
        that is dying as we look (a zombie, an exit in progress) gets ``settle`` seconds."""
        deadline = time.monotonic() + settle
        while True:
            found = self._leftovers()
            if not found or time.monotonic() >= deadline:
                return found
            time.sleep(0.1)

    def _leftovers(self) -> list[str]:
        found: list[str] = []
        rooms_dir = os.path.join(self.state_dir, "rooms")
        if os.path.isdir(rooms_dir):
            found += [f"state: {n}" for n in os.listdir(rooms_dir)]
        for ctl in ("memory", "pids", "cpu", "cpuacct", "freezer"):
            inst = os.path.join(CGROUP_V1, ctl, "sandboxd", self.user.pw_name, self.instance)
            if os.path.isdir(inst):
                rooms = [n for n in os.listdir(inst) if n.startswith("room-")]
                found += [f"cgroup {ctl}: {n}" for n in rooms]
                if self.proc is None:
                    found.append(f"cgroup {ctl}: instance dir {inst}")
        with open("/proc/self/mountinfo") as f:
            base = os.path.dirname(self.state_dir)
            found += [f"mount: {line.split()[4]}" for line in f if base in line]
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cgroups = Path(f"/proc/{pid}/cgroup").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            mine = f"/{self.instance}/" in cgroups or (
                self.proc is None and os.path.dirname(self.state_dir) in cmd)
            if mine and int(pid) != os.getpid():
                room = cgroups.split(f"/{self.instance}/", 1)[-1].split("/", 1)[0]
                found.append(f"process {pid} [{room}]: {cmd[:80]}")
        return found


def _setup_user(name: str) -> pwd.struct_passwd:
    user = _ensure_user(name)
    subprocess.run([SANDBOXCTL, "setup", "--user", name], check=True, capture_output=True)
    return user


@pytest.fixture(scope="session")
def test_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root to create the unprivileged test user")
    return _setup_user(TEST_USER)


@pytest.fixture(scope="session")
def other_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user")
    return _ensure_user(OTHER_USER)


def make_daemon(user: pwd.struct_passwd, rootfs: str | None = None,
                extra_args: list[str] | None = None) -> DaemonProc:
    # /tmp, not $TMPDIR: the unprivileged daemon must be able to reach it.
    base = tempfile.mkdtemp(prefix="sandboxd-test-", dir="/tmp")
    os.chmod(base, 0o755)
    os.chown(base, user.pw_uid, user.pw_gid)
    return DaemonProc(user=user, socket=os.path.join(base, "run", "sandboxd.sock"),
                      state_dir=os.path.join(base, "state"), log_path=os.path.join(base, "log"),
                      rootfs=rootfs or os.environ.get("SANDBOXD_TEST_ROOTFS", "host"),
                      extra_args=extra_args or [])


@pytest.fixture(scope="session")
def daemon(test_user: pwd.struct_passwd) -> Iterator[DaemonProc]:
    """One real daemon for the session, as the unprivileged test user."""
    d = make_daemon(test_user)
    d.start()
    yield d
    code = d.stop()
    leftovers = d.leftovers()
    base = os.path.dirname(d.state_dir)
    if code == 0 and not leftovers:
        shutil.rmtree(base, ignore_errors=True)
    assert code == 0, f"sandboxd exited {code} on SIGTERM:\n{d.log()}"
    assert not leftovers, f"left behind after shutdown: {leftovers}"


@pytest.fixture
def fresh_daemon(test_user: pwd.struct_passwd) -> Iterator[DaemonProc]:
    """A daemon of the test's own, for tests that stop, crash or restart it."""
    d = make_daemon(test_user)
    yield d
    if d.proc is not None:
        d.stop(signal.SIGKILL)
    subprocess.run(["pkill", "-KILL", "-u", str(test_user.pw_uid), "-f",
                    f"sandboxd.*{os.path.dirname(d.state_dir)}"], check=False)
    shutil.rmtree(os.path.dirname(d.state_dir), ignore_errors=True)


_room_counter = iter(range(1, 1 << 30))


@pytest.fixture
def room_id(request: pytest.FixtureRequest) -> str:
    """A room id unique to the test (destroyed afterwards by the tests that care)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"t{next(_room_counter)}-{base}".strip("-")[:63].rstrip("-")


@pytest.fixture
def client(daemon: DaemonProc) -> Iterator[object]:
    c = daemon.client()
    yield c
    c.close()  # type: ignore[attr-defined]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """On failure, attach the tail of the daemon's log to the report."""
    report = yield
    if report.failed:  # type: ignore[attr-defined]
        for name in ("daemon", "fresh_daemon"):
            d = item.funcargs.get(name) if hasattr(item, "funcargs") else None  # type: ignore[attr-defined]
            if isinstance(d, DaemonProc):
                report.sections.append((f"sandboxd log ({name})", d.log()[-6000:]))  # type: ignore[attr-defined]
    return report
