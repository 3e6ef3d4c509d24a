"""The cgroup v2 backend on the fake cgroupfs (tests/unit/cgroupfake.py): the v2 code runs for
real only in the VM tier, so this is where its paths are covered."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cgroupfake import LIMITS, FakeKernel, put, v1, v1tree, v2, v2tree

from sandboxd.config import MiB
from sandboxd.errors import InternalError, LimitUnavailable
from sandboxd.jail.cgroup import enter, tree
from sandboxd.jail.cgroup import v2 as cg_v2
from sandboxd.jail.cgroup.detect import detect
from sandboxd.jail.cgroup.disabled import DisabledBackend
from sandboxd.jail.cgroup.interface import CgroupStats, RunCgroupLimits
from sandboxd.jail.cgroup.v2 import V2Backend

# the fixtures, bound by name
fixtures = (v1tree, v2tree)


def test_v2_detect_supervisor_leaf(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    b = v2(k, root, proc)
    assert b.controllers == {"memory", "pids", "cpu"}
    assert b.enforceable() == {"memory", "cpus", "pids"}
    d = b.describe()
    assert d["backend"] == "v2" and d["parent"] == str(root / "svc") and d["kill"] == "cgroup.kill"


def test_v2_create_room_writes_limits_and_init_leaf(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    room = v2(k, root, proc).create_room("abc", LIMITS)
    d = root / "svc" / "room-abc"
    # The memory limit is the runs' (issue 10, L4): the init's leaf and the room carry none.
    assert (d / "runs" / "memory.max").read_text() == str(64 * MiB)
    assert (d / "runs" / "memory.swap.max").read_text() == "0"
    assert (d / "memory.max").read_text() == "max\n"
    assert (d / "init" / "memory.max").read_text() == "max\n"
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "pids.max").read_text() == "100"
    assert (d / "runs" / "pids.max").read_text() == "max\n"
    assert ("svc/room-abc/cgroup.subtree_control", "+memory +pids") in k.writes
    assert (d / "cgroup.subtree_control").read_text() == "memory pids\n"
    assert (d / "runs" / "cgroup.subtree_control").read_text() == "memory pids\n"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert room.procs_paths() == [str(d / "init" / "cgroup.procs")]
    assert room.enforced == {"memory", "cpus", "pids"}


def test_v2_run_limits_fds_and_enter(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    room = v2(k, root, proc).create_room("abc", LIMITS)
    run = room.create_run("r1", RunCgroupLimits(memory_bytes=32 * MiB, pids=10))
    d = root / "svc" / "room-abc" / "runs" / "run-r1"
    assert (d / "memory.max").read_text() == str(32 * MiB)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "10"
    dfds = run.dir_fds()
    assert len(dfds) == 1 and stat.S_ISDIR(os.fstat(dfds[0]).st_mode)
    jfds = run.join_fds()
    assert len(jfds) == 1 and stat.S_ISREG(os.fstat(jfds[0]).st_mode)  # opened by the daemon
    enter(jfds)
    assert (d / "cgroup.procs").read_text() == "0"
    run.destroy()
    assert not d.exists()
    assert not room._runs  # type: ignore[attr-defined]  # a long-lived room does not grow
    for fd in (*dfds, *jfds):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_v2_stats_parsed(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    room = v2(k, root, proc).create_room("abc", LIMITS)
    run = room.create_run("r1", None)
    d = root / "svc" / "room-abc" / "runs" / "run-r1"
    (d / "cpu.stat").write_text("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n")
    (d / "memory.peak").write_text("4096\n")
    (d / "pids.current").write_text("3\n")
    (d / "pids.peak").write_text("7\n")
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n")
    assert run.cpu_usage_ns() == 1_234_000
    assert run.oom_killed()
    assert run.stats() == CgroupStats(cpu_usage_ns=1_234_000, memory_peak_bytes=4096,
                                      pids_current=3, pids_peak=7, oom_kills=1)


def test_v2_stats_without_peak_files(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    k.omit |= {"memory.peak", "pids.peak", "pids.current"}
    room = v2(k, root, proc).create_room("abc", LIMITS)
    put(root / "svc" / "room-abc" / "init", 11, 12)
    s = room.stats()
    assert s.memory_peak_bytes is None and s.pids_peak is None and s.pids_current == 2


def test_v2_kill_writes_cgroup_kill(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    room = v2(k, root, proc).create_room("abc", LIMITS)
    run = room.create_run("r1", None)
    put(root / "svc" / "room-abc" / "runs" / "run-r1", 41, 42)
    run.kill()
    assert ("svc/room-abc/runs/run-r1/cgroup.kill", "1") in k.writes
    assert k.kills == []  # the kernel does it
    room.destroy()
    assert not (root / "svc" / "room-abc").exists()


def test_v2_kill_without_cgroup_kill_freezes(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    k.omit.add("cgroup.kill")
    room = v2(k, root, proc).create_room("abc", LIMITS)
    put(root / "svc" / "room-abc" / "init", 7, 8)
    room.kill()
    seq = [w for w in k.writes if w[0].endswith("cgroup.freeze")]
    assert seq == [("svc/room-abc/cgroup.freeze", "1"), ("svc/room-abc/cgroup.freeze", "0")]
    assert sorted(k.kills) == [7, 8]


def test_v2_destroy_bounded_when_stuck(v2tree: tuple[FakeKernel, Path, Path],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    k, root, proc = v2tree
    monkeypatch.setattr(tree, "KILL_WAIT_S", 0.05)
    room = v2(k, root, proc).create_room("abc", LIMITS)
    k.immortal.add(99)
    put(root / "svc" / "room-abc" / "init", 99)
    with pytest.raises(InternalError) as exc:
        room.destroy()
    assert exc.value.context["pids"] == [99]


def _svc2(k: FakeKernel, root: Path, proc: Path) -> None:
    """The daemon (pids 500, 501) in /svc2, which can delegate cpu memory pids, no supervisor."""
    (proc / "self" / "cgroup").write_text("0::/svc2\n")
    k.mkdir(str(root / "svc2"))
    put(root / "svc2", 500, 501)
    (root / "svc2" / "cgroup.controllers").write_text("cpu memory pids io\n")


def test_v2_backend_bootstrap_moves_daemon(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    """daemon.py's order: detect(), backend.bootstrap(), then the zygote."""
    k, root, proc = v2tree
    _svc2(k, root, proc)
    b = v2(k, root, proc)
    assert b.pending_move and not b.describe()["bootstrapped"]
    with pytest.raises(InternalError):
        b.create_room("early", LIMITS)  # rooms before the move would break the subtree
    lines = b.bootstrap()
    assert ("svc2/supervisor/cgroup.procs", "500") in k.writes
    assert ("svc2/supervisor/cgroup.procs", "501") in k.writes
    assert ("svc2/cgroup.subtree_control", "+memory +pids +cpu") in k.writes
    assert lines[-1] == f"enabled memory pids cpu in {root}/svc2/cgroup.subtree_control"
    assert b.controllers == {"memory", "pids", "cpu"} and b.missing == {}
    b.create_room("abc", LIMITS)
    assert (root / "svc2" / "room-abc" / "runs" / "memory.max").read_text() == str(64 * MiB)
    n = len(k.writes)
    assert b.bootstrap() == [] and len(k.writes) == n  # idempotent


def test_v2_bootstrap_partial_delegation(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    _svc2(k, root, proc)
    (root / "svc2" / "cgroup.controllers").write_text("memory\n")
    b = v2(k, root, proc)
    assert b.controllers == {"memory"}  # what the subtree could delegate, before the move
    assert b.bootstrap()[-1] == f"not delegated to {root}/svc2: pids cpu"
    assert b.enforceable() == {"memory"}


def test_v2_module_bootstrap_before_detect(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    _svc2(k, root, proc)
    lines = cg_v2.bootstrap(None, str(root), str(proc), fs=k)
    assert ("svc2/supervisor/cgroup.procs", "501") in k.writes
    assert any("enabled memory pids cpu" in line for line in lines)
    (proc / "self" / "cgroup").write_text("0::/svc2/supervisor\n")
    assert cg_v2.bootstrap(None, str(root), str(proc), fs=k) == []  # idempotent
    b = v2(k, root, proc)
    assert not b.pending_move and b.base.paths["unified"] == str(root / "svc2")
    assert b.bootstrap() == []


def test_v1_and_disabled_bootstrap_is_a_no_op(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    assert v1(k, root).bootstrap() == []
    assert DisabledBackend("x").bootstrap() == []


def test_v2_root_cgroup_is_not_delegated(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    (proc / "self" / "cgroup").write_text("0::/\n")
    b = detect("auto", None, str(root), None, str(proc), fs=k)
    assert isinstance(b, DisabledBackend)
    assert "root cgroup" in b.describe()["tried"]["v2"]
    assert cg_v2.bootstrap(None, str(root), str(proc), fs=k)[0].startswith("daemon is in")


def test_v2_partial_controllers(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    (root / "svc" / "cgroup.subtree_control").write_text("memory pids\n")
    b = v2(k, root, proc)
    assert b.enforceable() == {"memory", "pids"}
    assert "cpu" in b.describe()["missing"]
    with pytest.raises(LimitUnavailable) as exc:
        b.check_limits(LIMITS)
    assert exc.value.context["limit"] == "cpus"
    b.check_limits(LIMITS, requested={"memoryBytes", "pids", "diskBytes"})
    room = b.create_room("abc", LIMITS)
    assert room.enforced == {"memory", "pids"}
    assert (root / "svc" / "room-abc" / "cpu.max").read_text() == "max 100000\n"


def test_v2_explicit_parent(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, _ = v2tree
    k.mkdir(str(root / "other"))
    b = detect("v2", "/other", str(root), None, "/nonexistent", fs=k)
    assert isinstance(b, V2Backend) and b.base.paths["unified"] == str(root / "other")


def test_v2_limit_write_failure_fails_closed(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    k.omit.add("pids.max")
    b = v2(k, root, proc)
    with pytest.raises(LimitUnavailable) as exc:
        b.create_room("abc", LIMITS)
    assert exc.value.context["limit"] == "pids"
    assert "room-abc/pids.max" in exc.value.context["path"]
    assert not (root / "svc" / "room-abc").exists()


def test_hybrid_unified_found_under_v1_root(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    k = FakeKernel(root)
    (root / "unified" / "svc").mkdir(parents=True)
    k.populate(str(root / "unified"))
    k.populate(str(root / "unified" / "svc"))
    b = detect("v2", "/svc", str(root), None, "/nonexistent", fs=k)
    assert isinstance(b, V2Backend) and b.root == str(root / "unified")
    assert b.controllers == frozenset()  # hybrid: no controllers, but kill and cpu.stat work


# --- the runs subtree (issue 10, L4) and the rest of the v2 paths ---------------------------------


def test_v2_runs_hold_the_memory_limit_and_their_own_figures(
        v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    room = v2(k, root, proc).create_room("abc", LIMITS)
    d = root / "svc" / "room-abc"
    run = room.create_run("r1", RunCgroupLimits(memory_bytes=64 * MiB))
    assert run.path == str(d / "runs" / "run-r1")
    (d / "runs" / "memory.current").write_text(str(40 * MiB))
    (d / "memory.current").write_text(str(46 * MiB))
    (d / "memory.events").write_text("oom 1\noom_kill 1\n")  # hierarchical on v2
    assert room.runs_stats().memory_current_bytes == 40 * MiB
    assert room.stats().memory_current_bytes == 46 * MiB and room.stats().oom_kills == 1
    # The init's leaf is no run: it is never under runs/, whatever the layout above it.
    assert not str(room.procs_paths()[0]).startswith(str(d / "runs"))
    assert room.accounting and not room.joined_by_dir


def test_v2_run_limit_without_its_controller_fails_before_mkdir(
        v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    (root / "svc" / "cgroup.subtree_control").write_text("memory\n")
    room = v2(k, root, proc).create_room("abc", LIMITS)
    with pytest.raises(LimitUnavailable) as exc:
        room.create_run("r1", RunCgroupLimits(pids=4))
    assert exc.value.context == {"limit": "pids", "backend": "v2"}
    assert not (root / "svc" / "room-abc" / "runs" / "run-r1").exists()


def test_v2_populated_follows_cgroup_events(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    room = v2(k, root, proc).create_room("abc", LIMITS)
    run = room.create_run("r1", None)
    assert isinstance(run, tree.Run)
    assert not run.ops.populated(run.node)
    put(Path(run.path), 5)
    assert run.ops.populated(run.node)
    k.immortal.add(5)
    with pytest.raises(InternalError):
        run.ops.rmtree(run.node)  # EBUSY names the first directory
    k.immortal.clear()
    run.destroy()
    assert not run.ops.populated(run.node)  # gone: not populated


def test_v2_explicit_backend_that_cannot_work_fails_loudly(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    with pytest.raises(LimitUnavailable) as exc:
        detect("v2", None, str(tmp_path), None, str(tmp_path), fs=k)
    assert exc.value.context == {"limit": "cgroup", "backend": "v2"}
    assert cg_v2.probe(str(tmp_path), None, None, str(tmp_path), k) == \
        "no cgroup2 hierarchy mounted"


@pytest.mark.parametrize(("own", "why"), [
    (None, "cannot read the daemon's cgroup"),
    ("0::/supervisor\n", "the root cgroup2 is not delegated"),
    ("0::/nope/supervisor\n", "does not exist"),
])
def test_v2_probe_says_why_not(v2tree: tuple[FakeKernel, Path, Path], own: str | None,
                               why: str) -> None:
    k, root, proc = v2tree
    if own is None:
        (proc / "self" / "cgroup").unlink()
    else:
        (proc / "self" / "cgroup").write_text(own)
    got = cg_v2.probe(str(root), None, None, str(proc), k)
    assert isinstance(got, str) and why in got, got


def test_v2_probe_needs_a_writable_subtree(v2tree: tuple[FakeKernel, Path, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    k, root, proc = v2tree
    monkeypatch.setattr(k, "access", lambda p, m: not p.endswith("cgroup.subtree_control"))
    got = cg_v2.probe(str(root), None, None, str(proc), k)
    assert isinstance(got, str) and "not writable" in got


def test_v2_move_tolerates_processes_that_exited(v2tree: tuple[FakeKernel, Path, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    k, root, _ = v2tree
    k.mkdir(str(root / "svc2"))
    put(root / "svc2", 500, 501)
    real = k.write

    def write(path: str, value: str) -> None:
        if value == "500":
            raise InternalError("gone", path=path, errno=errno.ESRCH)
        if value == "501":
            raise InternalError("denied", path=path, errno=errno.EACCES)
        real(path, value)

    monkeypatch.setattr(k, "write", write)
    with pytest.raises(InternalError) as exc:
        cg_v2.move_to_supervisor(str(root / "svc2"), k)
    assert exc.value.context["errno"] == errno.EACCES  # only ESRCH is "exited meanwhile"


def test_v2_module_bootstrap_without_cgroup2_or_delegation(
        v2tree: tuple[FakeKernel, Path, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    k, root, proc = v2tree
    assert cg_v2.bootstrap(None, str(tmp_path / "none"), str(proc), fs=k) == [
        "no cgroup2 hierarchy: nothing to bootstrap"]
    (proc / "self" / "cgroup").write_text("0::/svc\n")
    monkeypatch.setattr(k, "access", lambda p, m: False)
    assert cg_v2.bootstrap(None, str(root), str(proc), fs=k)[0].endswith(": nothing moved")


def test_v2_describe_without_cgroup_kill(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    (root / "svc" / "cgroup.kill").unlink()
    assert v2(k, root, proc).describe()["kill"] == "freeze"
