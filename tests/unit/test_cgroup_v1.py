"""The cgroup v1 backend on the fake cgroupfs (the CI host runs it for real too:
tests/integration/test_cgroup_real.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cgroupfake import LIMITS, V1_FILES, FakeKernel, put, v1, v1tree, v2tree

from sandboxd.config import MiB
from sandboxd.errors import LimitUnavailable
from sandboxd.hostsetup import cgroups as hcg
from sandboxd.jail.cgroup import enter, tree
from sandboxd.jail.cgroup.detect import detect
from sandboxd.jail.cgroup.disabled import DisabledBackend
from sandboxd.jail.cgroup.fs import Fs
from sandboxd.jail.cgroup.interface import CgroupStats, RunCgroupLimits
from sandboxd.jail.cgroup.v1 import V1Backend

# the fixtures, bound by name
fixtures = (v1tree, v2tree)


def test_v1_detect_and_describe(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    b = v1(k, root)
    assert b.controllers == {"memory", "pids", "cpu", "cpuacct", "freezer"}
    assert b.describe()["parent"] == "sandboxd/alice" and b.describe()["missing"] == {}
    b.check_limits(LIMITS)


def test_v1_create_room_and_run_limits(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    room = v1(k, root).create_room("abc", LIMITS)
    p = "sandboxd/alice/room-abc"
    runs = root / "memory" / p / "runs"
    assert (runs / "memory.limit_in_bytes").read_text() == str(64 * MiB)
    assert (runs / "memory.memsw.limit_in_bytes").read_text() == str(64 * MiB)
    for unlimited in (root / "memory" / p, root / "memory" / p / "init"):  # issue 10, L4
        assert (unlimited / "memory.limit_in_bytes").read_text() == "9223372036854771712\n"
    mem_writes = [os.path.basename(w[0]) for w in k.writes if w[0].startswith("memory/")]
    assert mem_writes[:2] == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    assert (root / "cpu" / p / "cpu.cfs_period_us").read_text() == "100000"
    assert (root / "cpu" / p / "cpu.cfs_quota_us").read_text() == "150000"
    assert (root / "pids" / p / "pids.max").read_text() == "100"
    assert sorted(room.procs_paths()) == sorted(
        str(root / c / p / "init" / "cgroup.procs") for c in V1_FILES)
    run = room.create_run("r1", RunCgroupLimits(memory_bytes=20 * MiB, pids=9))
    assert (runs / "run-r1" / "memory.limit_in_bytes").read_text() == str(20 * MiB)
    assert (root / "pids" / p / "runs" / "run-r1" / "pids.max").read_text() == "9"
    for c in V1_FILES:
        mode = stat.S_IMODE((root / c / p / "runs" / "run-r1" / "cgroup.procs").stat().st_mode)
        assert mode == 0o666
        assert stat.S_IMODE((root / c / p).stat().st_mode) == 0o700
    fds = run.join_fds()
    assert len(fds) == 5 and all(stat.S_ISDIR(os.fstat(fd).st_mode) for fd in fds)
    enter(fds)  # the child opens cgroup.procs itself
    assert (root / "freezer" / p / "runs" / "run-r1" / "cgroup.procs").read_text() == "0"


def test_v1_stats_parsed(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    run = v1(k, root).create_room("abc", LIMITS).create_run("r1", None)
    p = root / "{}" / "sandboxd/alice/room-abc/runs/run-r1"
    Path(str(p).format("cpuacct"), "cpuacct.usage").write_text("987654321\n")
    Path(str(p).format("memory"), "memory.max_usage_in_bytes").write_text("1048576\n")
    Path(str(p).format("memory"), "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    Path(str(p).format("pids"), "pids.current").write_text("4\n")
    Path(str(p).format("pids"), "pids.peak").write_text("6\n")
    assert run.cpu_usage_ns() == 987654321
    assert run.oom_killed()
    assert run.stats() == CgroupStats(987654321, 1048576, 4, 6, 2)


def test_v1_kill_freezer_sequence(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    room = v1(k, root).create_room("abc", LIMITS)
    room.create_run("r1", None)
    p = "sandboxd/alice/room-abc"
    put(root / "freezer" / p / "init", 10)
    put(root / "freezer" / p / "runs" / "run-r1", 20, 21)
    put(root / "memory" / p / "runs" / "run-r1", 20, 21, 22)  # 22 only in memory: still killed
    room.kill()
    fz = [v for path, v in k.writes if path.endswith("freezer.state")]
    assert fz == ["FROZEN", "THAWED"]
    assert sorted(k.kills) == [10, 20, 21, 22]
    first_thaw = k.writes.index((f"freezer/{p}/freezer.state", "THAWED"))
    assert first_thaw > k.writes.index((f"freezer/{p}/freezer.state", "FROZEN"))
    room.destroy()
    for c in V1_FILES:
        assert not (root / c / p).exists()


def test_v1_freeze_waits_for_live_leaves_only(v1tree: tuple[FakeKernel, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a just-rmdir'd child keeps a v1 parent FREEZING for ~15 ms; judge by the
    live leaves, and give up waiting after FREEZE_WAIT_S when a leaf really is stuck."""
    k, root = v1tree
    room = v1(k, root).create_room("abc", LIMITS)
    p = root / "freezer" / "sandboxd/alice/room-abc"
    put(p / "init", 5)
    real_write = k.write

    def write(path: str, value: str) -> None:
        real_write(path, value)
        if path == str(p / "freezer.state") and value == "FROZEN":
            (p / "freezer.state").write_text("FREEZING\n")  # the offline child's doing
    monkeypatch.setattr(k, "write", write)
    room.kill()
    assert k.kills == [5]
    (p / "init" / "freezer.state").write_text("FREEZING\n")
    monkeypatch.setattr(tree, "FREEZE_WAIT_S", 0.05)
    monkeypatch.setattr(k, "write", lambda path, value: Fs.write(k, path, value)
                        if not path.endswith("freezer.state") else
                        (real_write(path, value) if value == "THAWED" else None))
    put(p / "init", 6)
    room.kill()  # a leaf stuck in FREEZING: bounded, and the SIGKILL is sent anyway
    assert 6 in k.kills


def test_v1_kill_after_partial_rmdir(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    room = v1(k, root).create_room("abc", LIMITS)
    p = "sandboxd/alice/room-abc"
    for leaf in ("init", "runs", ""):
        for name in os.listdir(root / "freezer" / p / leaf):
            if not (root / "freezer" / p / leaf / name).is_dir():
                (root / "freezer" / p / leaf / name).unlink()
        (root / "freezer" / p / leaf).rmdir()
    put(root / "memory" / p / "init", 31)
    room.kill()
    assert k.kills == [31]


def test_v1_missing_freezer(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    (root / "freezer" / "sandboxd" / "alice" / "cgroup.procs").unlink()
    (root / "freezer" / "sandboxd" / "alice" / "freezer.state").unlink()
    (root / "freezer" / "sandboxd" / "alice" / "tasks").unlink()
    (root / "freezer" / "sandboxd" / "alice").rmdir()
    b = detect("auto", None, str(root), None, "/nonexistent", user="alice", fs=k)
    assert isinstance(b, DisabledBackend)
    assert "freezer" in b.describe()["tried"]["v1"]
    with pytest.raises(LimitUnavailable):
        detect("v1", None, str(root), None, "/nonexistent", user="alice", fs=k)


def test_v1_partial_cpu(v1tree: tuple[FakeKernel, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    k, root = v1tree
    real = k.access
    cpu_dir = str(root / "cpu" / "sandboxd" / "alice")
    monkeypatch.setattr(k, "access", lambda p, m: False if p == cpu_dir else real(p, m))
    b = v1(k, root)
    assert "cpu" not in b.controllers and "cpu" in b.describe()["missing"]
    with pytest.raises(LimitUnavailable) as exc:
        b.check_limits(LIMITS)
    assert exc.value.context["limit"] == "cpus"
    room = b.create_room("abc", LIMITS)
    assert not (root / "cpu" / "sandboxd" / "alice" / "room-abc").exists()
    room.destroy()


def test_v1_comounted_cpu_cpuacct(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    k = FakeKernel(root)
    for h in ("memory", "pids", "freezer", "cpu,cpuacct"):
        (root / h / "sandboxd").mkdir(parents=True)
        k.populate(str(root / h))
        k.populate(str(root / h / "sandboxd"))
        k.mkdir(str(root / h / "sandboxd" / "alice"))
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    b = v1(k, root)
    assert b.controllers == {"memory", "pids", "cpu", "cpuacct", "freezer"}
    room = b.create_room("abc", LIMITS)
    assert len(room.procs_paths()) == 4  # cpu and cpuacct written once
    assert (root / "cpu,cpuacct" / "sandboxd/alice/room-abc/cpu.cfs_quota_us").read_text() \
        == "150000"
    room.destroy()
    lines = hcg.delegate("bob", 1001, 1001, str(root), fs=k)
    assert len(lines) == 4


# --- the runs subtree (issue 10, L4), instances, figures --------------------------------------


def test_v1_room_oom_kills_sum_its_cgroups(v1tree: tuple[FakeKernel, Path]) -> None:
    """v1 counts a kill only in the victim's own cgroup: the room's figure (what the daemon
    reads when a room's init died) is the sum over the init leaf, runs and each run."""
    k, root = v1tree
    room = v1(k, root).create_room("abc", LIMITS)
    room.create_run("r1", None)
    mem = root / "memory" / "sandboxd/alice/room-abc"
    for leaf, n in (("init", 1), ("runs/run-r1", 2)):
        (mem / leaf / "memory.oom_control").write_text(
            f"oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n")
    (mem / "runs" / "memory.usage_in_bytes").write_text(str(7 * MiB))
    assert room.stats().oom_kills == 3
    assert room.runs_stats().oom_kills == 2
    assert room.runs_stats().memory_current_bytes == 7 * MiB
    assert room.joined_by_dir and room.accounting


def test_v1_instance_directories_and_release(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    b = detect("v1", None, str(root), None, "/nonexistent", user="alice", fs=k, instance="i-1")
    assert isinstance(b, V1Backend) and b.parent == "sandboxd/alice/i-1"
    room = b.create_room("abc", LIMITS)
    assert room.path == str(root / "memory" / "sandboxd/alice/i-1/room-abc")
    room.destroy()
    b.release()
    for c in V1_FILES:
        assert not (root / c / "sandboxd/alice/i-1").exists()
        assert (root / c / "sandboxd/alice").exists()  # never the delegated parent itself
    plain = v1(k, root)
    plain.release()
    assert (root / "memory" / "sandboxd/alice").exists()


def test_v1_explicit_backend_that_cannot_work_fails_loudly(tmp_path: Path) -> None:
    k = FakeKernel(tmp_path)
    with pytest.raises(LimitUnavailable) as exc:
        detect("v1", None, str(tmp_path), None, "/x", user="alice", fs=k)
    assert exc.value.context == {"limit": "cgroup", "backend": "v1"}


def test_v1_parent_not_writable_is_named(v1tree: tuple[FakeKernel, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    k, root = v1tree
    mem = str(root / "memory" / "sandboxd" / "alice")
    real = k.access
    monkeypatch.setattr(k, "access", lambda p, m: False if p == mem else real(p, m))
    b = v1(k, root)
    assert "not writable" in b.missing["memory"] and b.enforceable() == {"cpus", "pids"}
