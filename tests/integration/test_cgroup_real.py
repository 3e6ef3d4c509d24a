"""cgroup backends against the real kernel: v1 hierarchies and the hybrid cgroup2 mount.

Needs root (to create a throw-away delegated parent) and the unprivileged user ``sbxprobe`` (the
``probe_user`` fixture makes it). Every cgroup lives under a parent named ``sbxtest-<random>`` so
concurrent runs never collide, and the ``made`` fixture registers each process and directory for
teardown.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sandboxd.config import MiB, RoomLimits
from sandboxd.errors import LimitUnavailable
from sandboxd.hostsetup import cgroups as hcg
from sandboxd.jail.cgroup import detect as cgdetect
from sandboxd.jail.cgroup.interface import RunCgroup, RunCgroupLimits
from sandboxd.jail.cgroup.v1 import V1Backend
from sandboxd.jail.cgroup.v2 import V2Backend

V1_ROOT = "/sys/fs/cgroup"
UNIFIED = "/sys/fs/cgroup/unified"
REPO = str(Path(__file__).resolve().parents[2])
T = TypeVar("T", str, bytes)
CTRLS = ("memory", "pids", "cpu", "cpuacct", "freezer")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates delegated cgroup parents: needs root"),
    pytest.mark.skipif(not os.path.exists(f"{V1_ROOT}/freezer/cgroup.procs"),
                       reason="needs cgroup v1 hierarchies (hybrid host)"),
]


class Made:
    """Everything a test creates, removed in reverse order whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.dirs: list[str] = []  # removed last-first (children were registered after parents)
        self.fds: list[int] = []
        self.socks: list[socket.socket] = []

    def proc(self, p: subprocess.Popen[T]) -> subprocess.Popen[T]:
        self.procs.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(5)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for sk in self.socks:
            sk.close()
        for d in reversed(self.dirs):
            _rm_cgroup_tree(d)


def _rm_cgroup_tree(top: str) -> None:
    if not os.path.isdir(top):
        return
    for dirpath, dirnames, _ in os.walk(top, topdown=False):
        for name in dirnames:
            _kill_and_rmdir(os.path.join(dirpath, name))
    _kill_and_rmdir(top)


def _kill_and_rmdir(d: str) -> None:
    with contextlib.suppress(OSError):
        for pid in Path(d, "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
    for _ in range(200):
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


@pytest.fixture
def made() -> Iterator[Made]:
    m = Made()
    try:
        yield m
    finally:
        m.cleanup()


def _parent(made: Made, user: str, uid: int, gid: int) -> str:
    top = f"sbxtest-{uuid.uuid4().hex[:10]}"
    for c in CTRLS:
        made.dirs.append(f"{V1_ROOT}/{c}/{top}")
    hcg.delegate(user, uid, gid, V1_ROOT, parent=f"{top}/{user}")
    return f"{top}/{user}"


@pytest.fixture
def v1(made: Made) -> V1Backend:
    b = cgdetect.detect("v1", _parent(made, "root", 0, 0), V1_ROOT)
    assert isinstance(b, V1Backend) and not b.missing
    return b


def spawn(made: Made, fds: list[int], code: str, keep: tuple[int, ...] = (),
          **kw: object) -> subprocess.Popen[bytes]:
    """A python child that joins the run through fds (as the payload child will), then runs code."""
    prelude = (f"from sandboxd.jail.cgroup import enter; import os; enter({fds!r}); "
               f"[os.close(f) for f in {fds!r}]\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    return made.proc(subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-c", prelude + textwrap.dedent(code)], pass_fds=[*fds, *keep],
        env=env, **kw))


def wait_joined(run: RunCgroup, n: int = 1) -> None:
    for _ in range(500):
        if run.stats().pids_current >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{run.path}: fewer than {n} tasks joined")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie that is ours is "dead" for these tests
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    return False


# === v1 ==========================================================================================


def test_v1_kill_stopped_setsid_doublefork(v1: V1Backend, made: Made) -> None:
    room = v1.create_room("k1", RoomLimits(memory_bytes=128 * MiB, cpus=1, pids=64))
    run = room.create_run("r1", RunCgroupLimits(pids=32))
    r, w = os.pipe()
    made.fds += [r, w]
    p = spawn(made, run.join_fds(), keep=(w,), code=f"""
        import os, signal, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write({w}, str(os.getpid()).encode() + b"\\n")
                time.sleep(1000)
            os._exit(0)
        os.kill(os.getpid(), signal.SIGSTOP)   # piston #196
    """)
    os.close(w)
    made.fds.remove(w)
    grandchild = int(os.read(r, 64).split()[0])
    for _ in range(200):
        if run.stats().pids_current >= 2 and Path(f"/proc/{p.pid}/stat").read_text().split(
                ")")[1].split()[0] == "T":
            break
        time.sleep(0.01)
    assert grandchild in {int(x) for x in Path(
        f"{V1_ROOT}/freezer/{v1.parent}/room-k1/runs/run-r1/cgroup.procs").read_text().split()}
    run.kill()
    assert p.wait(5) == -signal.SIGKILL
    for _ in range(200):
        if not _alive(grandchild):
            break
        time.sleep(0.01)
    assert not _alive(grandchild)
    run.destroy()
    room.destroy()
    for c in CTRLS:
        assert not os.path.exists(f"{V1_ROOT}/{c}/{v1.parent}/room-k1")


def test_v1_memory_limit_oom_kills(v1: V1Backend, made: Made) -> None:
    room = v1.create_room("m1", RoomLimits(memory_bytes=256 * MiB, cpus=1, pids=64))
    run = room.create_run("r1", RunCgroupLimits(memory_bytes=32 * MiB))
    p = spawn(made, run.join_fds(), """
        chunks = []
        for _ in range(200):
            chunks.append(bytearray(1024 * 1024))   # touched: bytearray zero-fills
    """)
    assert p.wait(30) == -signal.SIGKILL
    assert run.oom_killed()
    s = run.stats()
    assert s.oom_kills >= 1
    assert s.memory_peak_bytes is not None and 16 * MiB < s.memory_peak_bytes <= 33 * MiB
    assert not room.create_run("r2", None).oom_killed()
    room.destroy()


def test_v1_cpu_usage_and_quota(v1: V1Backend, made: Made) -> None:
    room = v1.create_room("c1", RoomLimits(memory_bytes=128 * MiB, cpus=0.25, pids=64))
    run = room.create_run("r1", None)
    before = run.cpu_usage_ns()
    t0 = time.monotonic()
    # A burn of 0.4 s of CPU (process_time, so a loaded machine only makes it take longer),
    # throttled to a quarter of a CPU: it needs at least ~4x that in wall time. Unthrottled it
    # takes ~0.45 s and fails the bound below.
    p = spawn(made, run.join_fds(), """
        import time
        while time.process_time() < 0.4:
            pass
    """)
    assert p.wait(60) == 0
    wall = time.monotonic() - t0
    used = (run.cpu_usage_ns() - before) / 1e9
    assert 0.3 < used < 0.25 * wall + 0.15, (used, wall)
    assert room.stats().cpu_usage_ns >= run.cpu_usage_ns()
    room.destroy()


def test_v1_pids_max_stops_fork_bomb(v1: V1Backend, made: Made) -> None:
    room = v1.create_room("p1", RoomLimits(memory_bytes=256 * MiB, cpus=1, pids=64))
    run = room.create_run("r1", RunCgroupLimits(pids=10))
    p = spawn(made, run.join_fds(), """
        import os, sys, time
        n = 0
        for _ in range(100):
            try:
                if os.fork() == 0:
                    time.sleep(1000)
                n += 1
            except BlockingIOError:   # EAGAIN from pids.max
                break
        print(n, flush=True)
        time.sleep(1000)
    """, stdout=subprocess.PIPE)
    assert p.stdout is not None
    n = int(p.stdout.readline())
    assert n == 9  # the parent counts as one of the 10 tasks
    s = run.stats()
    assert s.pids_current == 10 and (s.pids_peak is None or s.pids_peak == 10)
    t0 = time.perf_counter()
    run.destroy()
    assert time.perf_counter() - t0 < 2
    assert p.wait(5) == -signal.SIGKILL
    room.destroy()


def test_v1_room_init_joins_by_paths_and_dies_with_room(v1: V1Backend, made: Made) -> None:
    """The zygote child's path: write "0" to every procs_paths() file, then room.destroy()."""
    room = v1.create_room("i1", RoomLimits(memory_bytes=128 * MiB, cpus=1, pids=64))
    paths = room.procs_paths()
    assert len(paths) == 5 and all(p.endswith("/room-i1/init/cgroup.procs") for p in paths)
    join = "".join(f"open({p!r}, 'w').write('0')\n" for p in paths)
    init = made.proc(subprocess.Popen(
        [sys.executable, "-c", join + "import time; time.sleep(1000)"]))
    run = room.create_run("r1", None)
    p = spawn(made, run.join_fds(), "import time; time.sleep(1000)")
    wait_joined(run)
    for _ in range(500):
        if room.stats().pids_current == 2:
            break
        time.sleep(0.01)
    assert room.stats().pids_current == 2
    run.destroy()  # leaves a dying child css behind: the room's freeze must not wait on it
    assert p.wait(5) == -signal.SIGKILL
    t0 = time.perf_counter()
    room.destroy()
    took = time.perf_counter() - t0
    assert init.wait(5) == -signal.SIGKILL
    assert not os.path.exists(room.path)
    assert took < 0.5, took


def test_v1_reconcile_after_crash(v1: V1Backend, made: Made) -> None:
    room = v1.create_room("z1", RoomLimits())
    run = room.create_run("r1", None)
    p = spawn(made, run.join_fds(), "import time; time.sleep(1000)")
    wait_joined(run)
    fresh = cgdetect.detect("v1", v1.parent, V1_ROOT)  # a new daemon instance
    assert fresh.reconcile({"other"}) == ["z1"]
    assert p.wait(5) == -signal.SIGKILL
    assert not os.path.exists(room.path)


# === unprivileged daemon against a delegated v1 parent ===========================================


def test_v1_unprivileged_user_delegated(made: Made, probe_user: pwd.struct_passwd) -> None:
    pw = probe_user
    parent = _parent(made, "sbxprobe", pw.pw_uid, pw.pw_gid)
    parent_c, child_c = socket.socketpair()
    made.fds += [parent_c.detach(), child_c.detach()]
    snippet = textwrap.dedent(f"""
        import os, socket, subprocess, sys, time
        from sandboxd.config import RoomLimits, MiB
        from sandboxd.jail import cgroup
        from sandboxd.jail.cgroup import detect as cgdetect
        from sandboxd.jail.cgroup.interface import RunCgroupLimits
        b = cgdetect.detect("auto", {parent!r}, user="sbxprobe")
        assert b.name == "v1", b.describe()
        room = b.create_room("u1", RoomLimits(memory_bytes=64 * MiB, cpus=0.5, pids=32))
        run = room.create_run("r1", RunCgroupLimits(memory_bytes=32 * MiB, pids=8))
        fds = run.join_fds()
        pid = os.fork()
        if pid == 0:
            cgroup.enter(fds)            # openat(dirfd, "cgroup.procs") + write "0"
            time.sleep(1000)
        for _ in range(3000):  # until the child has joined (not a pause)
            if run.stats().pids_current:
                break
            time.sleep(0.01)
        s = run.stats()
        assert s.pids_current == 1, s
        sock = socket.socket(fileno={made.fds[1]})
        socket.send_fds(sock, [b"x"], fds[:1])   # the run's dir fd for the cross-uid check
        sock.recv(1)                              # wait until root is done
        run.kill()
        os.waitpid(pid, 0)
        room.destroy()
        print("OK", s.pids_current, run.path)
    """)
    p = made.proc(subprocess.Popen(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
         sys.executable, "-c", snippet],
        env={"PYTHONPATH": REPO, "PATH": os.environ["PATH"]}, pass_fds=[made.fds[1]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    sock = socket.socket(fileno=made.fds[0])
    made.fds.remove(made.fds[0])
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
        assert fds, p.communicate(timeout=5)
        made.fds += fds
        run_dir = f"{V1_ROOT}/pids/{parent}/room-u1/runs/run-r1"
        assert os.stat(run_dir).st_uid == pw.pw_uid  # created by the unprivileged user
        # A payload of *another* uid (a subordinate id in real rooms) joins through the dir fd,
        # opening cgroup.procs with its own credentials ...
        code = ("import os, sys; from sandboxd.jail.cgroup import enter; "
                f"enter([{fds[0]}]); print(open('/proc/self/cgroup').read())")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              sys.executable, "-c", code], pass_fds=fds, env={"PYTHONPATH": REPO},
                             capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        # (the fd names one hierarchy; which one depends on dict order: any path is fine)
        assert f"/{parent}/room-u1/runs/run-r1" in out.stdout
        # ... but cannot reach it by path: the room directory is 0700.
        denied = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 "sh", "-c", f"echo 0 > {run_dir}/cgroup.procs"],
                                capture_output=True, text=True, timeout=10)
        assert denied.returncode != 0 and "denied" in denied.stderr
        sock.send(b"x")
    finally:
        sock.close()
    out_s, err = p.communicate(timeout=20)
    assert p.returncode == 0, err.decode()
    assert out_s.decode().startswith("OK 1")
    assert not os.path.exists(f"{V1_ROOT}/memory/{parent}/room-u1")


def test_v1_unprivileged_cannot_use_undelegated_parent(made: Made,
                                                        probe_user: pwd.struct_passwd) -> None:
    top = f"sbxtest-{uuid.uuid4().hex[:10]}"
    snippet = ("from sandboxd.jail.cgroup import detect as cgdetect\n"
               f"b = cgdetect.detect('auto', {top + '/nobody'!r}, user='sbxprobe')\n"
               "print(b.name, b.describe().get('reason'))\n")
    pw = probe_user
    out = subprocess.run(["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                          "--clear-groups", sys.executable, "-c", snippet],
                         env={"PYTHONPATH": REPO}, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("disabled")


# === v2 on the hybrid host's cgroup2 mount (no controllers here) ================================


@pytest.fixture
def v2(made: Made) -> V2Backend:
    if not os.path.exists(f"{UNIFIED}/cgroup.procs"):
        pytest.skip("no cgroup2 mount at /sys/fs/cgroup/unified")
    top = f"/sbxtest-{uuid.uuid4().hex[:10]}"
    made.dirs.append(UNIFIED + top)
    os.mkdir(UNIFIED + top)
    b = cgdetect.detect("v2", top, V1_ROOT)
    assert isinstance(b, V2Backend) and b.root == UNIFIED
    return b


def _events(path: str) -> dict[str, int]:
    return {k: int(v) for k, v in
            (line.split() for line in Path(path, "cgroup.events").read_text().splitlines())}


def test_v2_create_join_kill_rmdir(v2: V2Backend, made: Made) -> None:
    assert v2.controllers == frozenset()  # hybrid cgroup2: nothing to enforce with ...
    with pytest.raises(LimitUnavailable):
        v2.check_limits(RoomLimits())
    room = v2.create_room("v1x", RoomLimits())  # ... yet kill and CPU figures work
    assert room.enforced == frozenset()
    run = room.create_run("r1", None)
    jfds = run.join_fds()
    r, w = os.pipe()
    made.fds += [r, w]
    # The grandchild burns 0.15 s of CPU (process_time), then says so on the pipe: the figure
    # is read once it is there, not after a pause.
    p = spawn(made, jfds, keep=(w,), code=f"""
        import os, signal, time
        if os.fork() == 0:
            os.setsid()
            while time.process_time() < 0.15:
                pass
            os.write({w}, b"burnt\\n")
            time.sleep(1000)
        os.kill(os.getpid(), signal.SIGSTOP)
    """)
    os.close(w)
    made.fds.remove(w)
    for _ in range(300):
        if len(Path(run.path, "cgroup.procs").read_text().split()) == 2:
            break
        time.sleep(0.01)
    assert _events(run.path)["populated"] == 1
    assert os.read(r, 64) == b"burnt\n"
    assert run.cpu_usage_ns() > 100_000_000
    assert run.stats().pids_current == 2  # counted from cgroup.procs: no pids controller
    run.kill()
    assert Path(run.path, "cgroup.kill").exists()
    assert p.wait(5) == -signal.SIGKILL
    for _ in range(200):
        if _events(run.path)["populated"] == 0:
            break
        time.sleep(0.01)
    assert _events(run.path)["populated"] == 0
    run.destroy()
    assert not os.path.exists(run.path)
    room.destroy()
    assert not os.path.exists(room.path)


def test_v2_daemon_opened_fd_moves_other_uid(v2: V2Backend, made: Made,
                                             probe_user: pwd.struct_passwd) -> None:
    """The v2 delegation check uses the opener's credentials (join_fds): a process of another uid
    joins through a daemon-opened cgroup.procs, though it cannot open the file itself."""
    pw = probe_user
    base = v2.base.paths["unified"]
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(os.path.join(base, name), pw.pw_uid, pw.pw_gid)
    snippet = textwrap.dedent(f"""
        import socket, sys, time
        from sandboxd.config import RoomLimits
        from sandboxd.jail.cgroup import detect as cgdetect
        b = cgdetect.detect("v2", {v2.subtree!r}, {V1_ROOT!r})
        room = b.create_room("x", RoomLimits())
        run = room.create_run("r", None)
        s = socket.socket(fileno=3)
        socket.send_fds(s, [b"x"], run.join_fds())
        s.recv(1)
        print("sent", flush=True)
    """)
    a, bsock = socket.socketpair()
    made.socks.append(a)
    p = made.proc(subprocess.Popen(
        ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
         sys.executable, "-c", f"import os; os.dup2({bsock.fileno()}, 3)\n" + snippet],
        env={"PYTHONPATH": REPO}, pass_fds=[bsock.fileno()], stdout=subprocess.PIPE))
    bsock.close()
    _, fds, _, _ = socket.recv_fds(a, 1, 1)
    made.fds += fds
    room_dir = f"{base}/room-x"
    # a "payload" of uid nobody, started (by root) in the room's init leaf
    child = made.proc(subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         "import os, sys\n"
         "sys.stdin.readline()\n"
         "try:\n"
         f"    open('{room_dir}/runs/run-r/cgroup.procs', 'w').write('0')\n"
         "    print('self-open ok', flush=True)\n"
         "except PermissionError:\n"
         "    print('self-open denied', flush=True)\n"
         f"os.write({fds[0]}, b'0')\n"
         "print([x for x in open('/proc/self/cgroup') if x.startswith('0::')][0], end='',"
         " flush=True)\n"
         "sys.stdin.readline()\n"],
        pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    Path(room_dir, "init", "cgroup.procs").write_text(str(child.pid))
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "self-open denied"
    assert child.stdout.readline().strip() == f"0::{v2.subtree}/room-x/runs/run-r"
    child.kill()
    child.wait(5)
    a.send(b"x")
    p.wait(10)
    assert v2.reconcile(set()) == ["x"]


def test_v2_backend_bootstrap_moves_the_daemon(v2: V2Backend, made: Made) -> None:
    """daemon.py's order on a real cgroup2: detect() (pending), backend.bootstrap(), rooms."""
    own = v2.base.paths["unified"]
    snippet = textwrap.dedent(f"""
        import sys
        from sandboxd.config import RoomLimits
        from sandboxd.jail.cgroup import detect as cgdetect
        sys.stdin.readline()                          # wait until moved into {own}
        b = cgdetect.detect("v2", None, {V1_ROOT!r})
        assert b.name == "v2" and b.pending_move, b.describe()
        print(b.bootstrap(), flush=True)
        print([x for x in open("/proc/self/cgroup") if x.startswith("0::")][0], end="",
              flush=True)
        room = b.create_room("bt", RoomLimits())
        print(sorted(b.reconcile(set())), flush=True)
    """)
    p = made.proc(subprocess.Popen([sys.executable, "-c", snippet], env={"PYTHONPATH": REPO},
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    Path(own, "cgroup.procs").write_text(str(p.pid))
    out, _ = p.communicate("\n", timeout=20)
    assert p.returncode == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("[") and "moved the daemon's processes" in lines[0]
    assert lines[1] == f"0::{v2.subtree}/supervisor"
    assert lines[2] == "['bt']"
    assert os.listdir(own) and not os.path.exists(f"{own}/room-bt")
