"""Fixtures shared by every tier.

Integration and security tests drive a **real** sandboxd started as an unprivileged user, the
way a user runs it: the fixture (running as root) creates the user, runs ``sandboxctl setup`` for
it, starts ``sandboxd`` under that uid with its own socket and state dir, and at the end checks
the host side: no room process, cgroup, state file or mount of the daemon's is left behind.

Every user and group the suite runs things as is created on first use by the fixture that needs
it (``_ensure_user`` / ``_setup_user``: idempotent, serialized across concurrent pytest processes
by a flock on ``USERS_LOCK``) and is never deleted, so parallel runs can share them:

  sbxtest     the session daemon's user (``sandboxctl setup``: subordinate ids, cgroups); a client
  sbxother    a second client user (subordinate ids from useradd's defaults)
  sbxsec      the security suite's and tenants tests' daemon (``sandboxctl setup``)
  sbxprobe    runs cgroup backends unprivileged against delegated parents (test_cgroup_real)
  sbxsingle   a daemon user with NO subordinate ids (single-id mapping)
  sbxoutsider a user outside the socket's group
  sbxclients  the group of the security/tenant daemons' sockets (sbxtest, sbxother, sbxsec)

Environment knobs:
  SANDBOXD_TEST_USER    the unprivileged user (default sbxtest; created if missing)
  SANDBOXD_TEST_ROOTFS  rootfs for the daemon (default "host"; the built tree for language tests)
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
PROBE_USER = "sbxprobe"
CGROUP_V1 = "/sys/fs/cgroup"
CGROUP_V2_PURE = "/sys/fs/cgroup"


def _pure_v2() -> bool:
    """/sys/fs/cgroup is itself a cgroup2 mount (a pure v2 host, e.g. the VM tier's guest)."""
    try:
        with open("/proc/self/mounts") as f:
            return any(ln.split()[1:3] == [CGROUP_V2_PURE, "cgroup2"] for ln in f)
    except OSError:
        return False


# /run/lock is root's tmpfs on Debian (a stale lock file cannot outlive a boot); /var/lock is the
# same directory through a symlink on current systems and a real one on older ones.
USERS_LOCK = os.environ.get("SANDBOXD_TEST_USERS_LOCK") or (
    "/run/lock/sandboxd-test-users.lock" if os.path.isdir("/run/lock")
    else "/var/lock/sandboxd-test-users.lock")
# Users that must have no subordinate ids at all (useradd would give them login.defs' default).
NO_SUBIDS = frozenset({"sbxsingle"})


@contextlib.contextmanager
def _users_lock() -> Iterator[None]:
    """Serialize user, group and subordinate-id edits across pytest processes: two runs creating
    the same user race useradd ("already exists"), groupadd likewise, and two ``sandboxctl
    setup`` of different users could pick the same free subordinate range."""
    with open(USERS_LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")


def _ensure_user_locked(name: str, groups: tuple[str, ...], subids: bool | None
                        ) -> pwd.struct_passwd:
    from sandboxd import hostsetup

    if subids is None:
        subids = name not in NO_SUBIDS
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        argv = ["useradd", "--create-home", "--shell", "/bin/bash"]
        if not subids:
            argv += ["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"]
        _run([*argv, name])
        pw = pwd.getpwnam(name)
    if subids:
        # useradd's own range depends on login.defs; make sure there is one either way.
        hostsetup.ensure_subids(name, pw.pw_uid)
    for group in groups:
        try:
            members = grp.getgrnam(group).gr_mem
        except KeyError:
            _run(["groupadd", group])
            members = []
        if name not in members:
            _run(["usermod", "--append", "--groups", group, name])
    return pwd.getpwnam(name)


def _ensure_user(name: str, *, groups: tuple[str, ...] = (),
                 subids: bool | None = None) -> pwd.struct_passwd:
    """The user ``name``, created if missing (home, bash), with subordinate ids (unless it is in
    NO_SUBIDS or ``subids=False``) and a member of ``groups`` (created if missing). Idempotent and
    safe to call from concurrent pytest processes; never deletes or shrinks anything."""
    with _users_lock():
        return _ensure_user_locked(name, groups, subids)


def skip_unless_ci(why: str) -> None:
    """Skip a tier whose prerequisite (the language rootfs, the nspawn tree) is missing, except
    under CI=true: there .ci/run built it, so its absence means the build failed, and a skip
    would keep CI green on a broken setup."""
    if _ci():
        pytest.fail(f"CI=true and the prerequisite is missing (its build failed?): {why}",
                    pytrace=False)
    pytest.skip(why)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI=true the runner must be root: a non-root runner would turn every integration,
    security and root-only unit test into a skip and the run would pass."""
    if _ci() and os.geteuid() != 0:
        pytest.exit("CI=true and the runner is not root: the integration, security and root-only "
                    "tests would all be skipped", returncode=1)


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


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
    #: where this daemon's room cgroups live (absolute dirs; from its ping: v1 one per
    #: controller, v2 its parent, none when disabled) and those dirs relative to their hierarchy
    #: root, as they appear in /proc/PID/cgroup
    room_cgroup_dirs: list[str] = field(default_factory=list)
    #: the daemon's cgroup backend as its ping reports it: "v1" | "v2" | "disabled"
    cgroup_backend: str = ""
    room_cgroup_rel: list[str] = field(default_factory=list)
    #: host uids seen running room processes (descendants of the daemon below its zygotes), to
    #: find what survives the daemon itself (orphans lose their ancestry)
    room_uids: set[int] = field(default_factory=set)
    #: mount namespaces seen in room processes while they lived ("mnt:[inode]" -> the room),
    #: and the anonymous devices (tmpfs, proc, devpts...: "0:N") mounted only in them: rooms
    #: mount in their own namespaces, where the host's mountinfo never shows their mounts
    room_mnt_ns: dict[str, str] = field(default_factory=dict)
    room_devs: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process for its lifetime
        env = [f"{k}={v}" for k, v in self.env.items()]
        argv = as_user(self.user, [*(["env", *env] if env else []), SANDBOXD,
                                   "--socket", self.socket, "--state-dir", self.state_dir,
                                   "--rootfs", self.rootfs, "--log-level", "info",
                                   *self.extra_args])
        if (cg := self.v2_cgroup()) is not None:
            # Pure cgroup v2 (the VM tier's guest): the daemon is started inside a cgroup
            # delegated to its user, as systemd's Delegate=yes or `sandboxctl setup` + a root
            # launcher would; an unprivileged process cannot move itself there.
            argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cg, *argv]
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
                        caps = c.ping().get("capabilities") or {}
                    self._learn_cgroups(caps.get("cgroup") or {})
                    return
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"sandboxd did not come up:\n{self.log()}")

    def v2_cgroup(self) -> str | None:
        """On a pure cgroup v2 host, the cgroup this daemon starts in: the ``supervisor`` leaf of
        its own delegated cgroup (created and chowned to its user on first use, below the
        ``sandboxctl setup`` parent ``sandboxd/<user>``); None on hybrid and v1 hosts, where the
        daemon finds its v1 parents itself."""
        if not _pure_v2():
            return None
        parent = os.path.join(CGROUP_V2_PURE, "sandboxd", self.user.pw_name)
        if not os.path.isdir(parent):
            raise RuntimeError(f"{parent} is missing: `sandboxctl setup --user "
                               f"{self.user.pw_name}` did not delegate a v2 parent")
        want = set(Path(parent, "cgroup.controllers").read_text().split()) & {
            "memory", "pids", "cpu"}
        have = set(Path(parent, "cgroup.subtree_control").read_text().split())
        if want - have:
            Path(parent, "cgroup.subtree_control").write_text(
                " ".join("+" + c for c in sorted(want - have)))
        cg = os.path.join(parent, self.instance)
        # The daemon starts in the instance's "supervisor" leaf, as systemd >= 254 starts a unit
        # with DelegateSubgroup=supervisor: the instance itself may hold no process once its
        # controllers are enabled for rooms (cgroup v2's no-internal-process rule), which would
        # make a restart after a crash fail to enter it.
        leaf = os.path.join(cg, "supervisor")
        os.makedirs(leaf, exist_ok=True)
        for d in (cg, leaf):
            for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
                os.chown(os.path.join(d, name) if name else d, self.user.pw_uid,
                         self.user.pw_gid)
        return leaf

    def remove_v2_cgroup(self) -> None:
        """rmdir this daemon's delegated v2 cgroup (children first) once it is empty; what is
        left inside is reported by leftovers(), not hidden by this."""
        if not _pure_v2():
            return
        cg = os.path.join(CGROUP_V2_PURE, "sandboxd", self.user.pw_name, self.instance)
        # Only the daemon's own leaf and the instance itself: a room-* cgroup left behind
        # keeps the instance in place for leftovers() to report.
        for d in (os.path.join(cg, "supervisor"), cg):
            with contextlib.suppress(FileNotFoundError, OSError):
                os.rmdir(d)

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
            self._leftovers()  # learn the rooms' host uids while their ancestry still shows
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self.remove_v2_cgroup()
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

    def _learn_cgroups(self, cg: dict[str, object]) -> None:
        backend = cg.get("backend")
        self.cgroup_backend = str(backend)
        if backend == "v1":
            dirs = [str(p) for p in (cg.get("paths") or {}).values()]  # type: ignore[attr-defined]
        elif backend == "v2":
            dirs = [str(cg.get("parent"))]
        else:
            dirs = []
        self.room_cgroup_dirs = dirs
        rels = set()
        for d in dirs:
            rel = d[len(CGROUP_V1):] if d.startswith(CGROUP_V1 + "/") else d
            # v1: /sys/fs/cgroup/memory/sandboxd/u/i-x -> /sandboxd/u/i-x (the controller dir goes)
            rels.add("/" + rel.lstrip("/").split("/", 1)[1] if backend == "v1" and "/" in
                     rel.lstrip("/") else rel)
        self.room_cgroup_rel = sorted(rels)

    def _descendants(self) -> dict[int, int]:
        """pid -> depth below the daemon (1: its zygotes) of every live descendant."""
        if self.proc is None:
            return {}
        parent: dict[int, int] = {}
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                parent[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        depth: dict[int, int] = {}
        for pid in parent:
            chain, p = 0, pid
            while p in parent and p != self.proc.pid and chain < 64:
                p, chain = parent[p], chain + 1
            if p == self.proc.pid and pid != self.proc.pid:
                depth[pid] = chain
        return depth

    def _learn_mount_ns(self, pid: int, room: str, host_devs: set[str]) -> None:
        """Record the mount namespace of room process ``pid`` (not the host's) and the
        anonymous devices mounted in it that the host's namespace does not have."""
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            # The kernel reuses a dead namespace's inode number (the VM tier's guest did within
            # one session): a live room's namespace replaces what an earlier room left there.
            if ns == os.readlink("/proc/self/ns/mnt") or self.room_mnt_ns.get(ns) == room:
                return
            lines = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        except OSError:
            return
        self.room_mnt_ns[ns] = room
        for line in lines:
            dev = line.split()[2]
            if dev.startswith("0:") and dev not in host_devs:
                self.room_devs[dev] = f"{room}: {line.split()[4]}"

    def _mount_leftovers(self, reported: set[int]) -> list[str]:
        """What keeps a room's mounts alive on the host: a process (not already reported as
        the room's) in a room's mount namespace, a bind mount of one (nsfs), a mount of a
        room's device or under its state or rootfs paths in the host's namespace."""
        found: list[str] = []
        with open("/proc/self/mountinfo") as f:
            host = [line.split() for line in f]
        base = os.path.dirname(self.state_dir)
        roots = [base] + ([self.rootfs] if self.rootfs.startswith("/")
                          and self.rootfs != "/" else [])
        for fields in host:
            dev, root, point = fields[2], fields[3], fields[4]
            if dev in self.room_devs:
                found.append(f"mount: {point} is room device {dev} ({self.room_devs[dev]})")
            elif root in self.room_mnt_ns:
                found.append(f"mount: {point} pins room mount namespace {root} "
                             f"({self.room_mnt_ns[root]})")
            elif any(point == r or point.startswith(r + "/") for r in roots):
                found.append(f"mount: {point}")
        if self.room_mnt_ns:
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) in reported:
                    continue
                try:
                    ns = os.readlink(f"/proc/{pid}/ns/mnt")
                except OSError:
                    continue
                if ns in self.room_mnt_ns:
                    try:
                        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    except OSError:
                        cmd = b"?"
                    found.append(f"mount namespace {ns} of room {self.room_mnt_ns[ns]} held by "
                                 f"process {pid}: {cmd.decode(errors='replace')[:80]}")
        return found

    def _leftovers(self) -> list[str]:
        found: list[str] = []
        rooms_dir = os.path.join(self.state_dir, "rooms")
        if os.path.isdir(rooms_dir):
            found += [f"state: {n}" for n in os.listdir(rooms_dir)]
        dirs = self.room_cgroup_dirs or [os.path.join(CGROUP_V1, ctl, "sandboxd",
                                                      self.user.pw_name, self.instance)
                                         for ctl in ("memory", "pids", "cpu", "cpuacct",
                                                     "freezer")]
        for inst in dirs:
            if os.path.isdir(inst):
                rooms = [n for n in os.listdir(inst) if n.startswith("room-")]
                found += [f"cgroup {inst}: {n}" for n in rooms]
                if self.proc is None and os.path.basename(inst) == self.instance:
                    found.append(f"cgroup: instance dir {inst}")
        base = os.path.dirname(self.state_dir)
        with open("/proc/self/mountinfo") as f:
            host_devs = {line.split()[2] for line in f}
        reported: set[int] = set()
        rels = [*self.room_cgroup_rel, f"/{self.instance}"]
        below = self._descendants()
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                cgroups = Path(f"/proc/{pid}/cgroup").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                uid = int(Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[0])
            except (OSError, IndexError, ValueError):
                continue
            in_room = next((r for r in rels if f"{r}/room-" in cgroups), None)
            room = cgroups.split(f"{in_room}/", 1)[1].split("/", 1)[0].strip() if in_room \
                else "?"
            # Below a zygote (depth >= 2) is a room's; the zygotes themselves are the daemon's.
            deep = below.get(int(pid), 0) >= 2
            if deep and uid != self.user.pw_uid:
                self.room_uids.add(uid)
            mine = (in_room is not None or deep or uid in self.room_uids
                    or (self.proc is None and base in cmd))
            if mine:
                found.append(f"process {pid} [{room}]: {cmd[:80]}")
                reported.add(int(pid))
                if deep or in_room is not None:
                    self._learn_mount_ns(int(pid), room, host_devs)
        return found + self._mount_leftovers(reported)


_hold_counter = iter(range(1, 1 << 20))


def hold_payload(d: DaemonProc, sb: object, room: str, timeout: float = 30.0
                 ) -> tuple[str, threading.Thread]:
    """A payload kept *running* in room ``room`` (a run that never ends on its own), returned
    once ``d.leftovers()`` sees it, as (its leftovers line, the thread waiting on its run). For
    "teardown leaves nothing" tests: what they tear down must have had something alive in it."""
    secs = f"{100000 + next(_hold_counter)}"

    def hold() -> None:
        with contextlib.suppress(Exception):
            sb.exec(f"exec sleep {secs}")  # type: ignore[attr-defined]

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [x for x in d.leftovers(settle=0)
                if x.startswith("process ") and f"sleep {secs}" in x]
        if seen:
            return seen[0], t
        if not t.is_alive():
            break
        time.sleep(0.05)
    raise AssertionError(f"the held payload in {room} never showed on the host "
                         f"(leftovers: {d.leftovers(settle=0)})")


def _setup_user(name: str, *, groups: tuple[str, ...] = ()) -> pwd.struct_passwd:
    """``_ensure_user`` plus ``sandboxctl setup`` (its 16 x 65536 subordinate ids, delegated
    cgroups, state and runtime dirs), under the same lock."""
    with _users_lock():
        _ensure_user_locked(name, groups, True)
        _run([SANDBOXCTL, "setup", "--user", name])
        return pwd.getpwnam(name)


@pytest.fixture(scope="session")
def test_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        skip_unless_ci("integration tests need root to create the unprivileged test user")
    return _setup_user(TEST_USER)


@pytest.fixture(scope="session")
def other_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        skip_unless_ci("needs root to create a second user")
    return _ensure_user(OTHER_USER)


@pytest.fixture(scope="session")
def probe_user() -> pwd.struct_passwd:
    """An unprivileged user that runs cgroup backends against parents delegated to it."""
    if os.geteuid() != 0:
        skip_unless_ci("needs root to create the probe user")
    return _ensure_user(PROBE_USER)


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
