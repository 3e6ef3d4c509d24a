"""The disabled backend (the tree machinery over zero hierarchies), names, reconcile and the
filesystem seam."""

from __future__ import annotations

from pathlib import Path

import pytest
from cgroupfake import LIMITS, V1_FILES, FakeKernel, put, v1, v1tree, v2, v2tree

from sandboxd.config import RoomLimits
from sandboxd.errors import InternalError, LimitUnavailable, ValidationError
from sandboxd.jail.cgroup.detect import detect
from sandboxd.jail.cgroup.disabled import DisabledBackend
from sandboxd.jail.cgroup.fs import Fs
from sandboxd.jail.cgroup.interface import CgroupStats, RunCgroupLimits

# the fixtures, bound by name
fixtures = (v1tree, v2tree)


def test_disabled_backend(tmp_path: Path) -> None:
    b = detect("auto", None, str(tmp_path), None, str(tmp_path), user="x", fs=FakeKernel(
        tmp_path))
    assert isinstance(b, DisabledBackend)
    assert b.name == "disabled" and b.controllers == frozenset() and b.enforceable() == set()
    with pytest.raises(LimitUnavailable) as exc:
        b.check_limits(RoomLimits())
    # The first by wire name, and the message rooms answered with before check_limits was theirs.
    assert exc.value.context == {"limit": "cpus"}
    assert exc.value.message == ("limit cpus cannot be enforced here (cgroup backend disabled "
                                 "cannot enforce cpus)")
    with pytest.raises(LimitUnavailable) as exc:
        b.check_limits(RoomLimits(), requested={"pids", "memoryBytes"})
    assert exc.value.context["limit"] == "memoryBytes"
    # Limits enforced without cgroups, and run-only ones, never refuse a room.
    b.check_limits(RoomLimits(), requested={"diskBytes", "cpuTimeMs", "wallTimeMs"})
    b.check_limits(RoomLimits(), requested=())
    assert b.enforceable_wire() == {"wallTimeMs", "outputBytes", "fileSizeBytes", "diskBytes"}
    room = b.create_room("abc", RoomLimits())
    # Fail closed, as v1 and v2 do without the controller (facts.check_run_limits refuses such
    # a request first on the wire).
    with pytest.raises(LimitUnavailable) as exc:
        room.create_run("r0", RunCgroupLimits(memory_bytes=1))
    assert exc.value.context == {"limit": "memory", "backend": "disabled"}
    run = room.create_run("r1", RunCgroupLimits())
    assert room.path == "" and run.path == "" and not room.accounting
    assert room.runs_stats() == CgroupStats() and room.stats() == CgroupStats()
    assert room.procs_paths() == [] and run.dir_fds() == [] and run.join_fds() == []
    assert run.stats() == CgroupStats() and run.cpu_usage_ns() == 0 and not run.oom_killed()
    run.kill()
    run.destroy()
    room.kill()
    room.destroy()
    assert b.reconcile(set()) == []
    assert detect("disabled").describe()["reason"] == "disabled by configuration"
    with pytest.raises(ValidationError):
        detect("v3")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 64, "a b", "a.b"])
def test_names_validated(v1tree: tuple[FakeKernel, Path], bad: str) -> None:
    k, root = v1tree
    b = v1(k, root)
    with pytest.raises(ValidationError):
        b.create_room(bad, LIMITS)
    room = b.create_room("ok", LIMITS)
    with pytest.raises(ValidationError):
        room.create_run(bad, None)
    with pytest.raises(ValidationError):
        DisabledBackend("x").create_room(bad, LIMITS)


def test_reconcile_removes_leftovers(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    b = v1(k, root)
    b.create_room("live", LIMITS)
    dead = b.create_room("dead", LIMITS)
    dead.create_run("r9", None)
    put(root / "freezer" / "sandboxd/alice/room-dead/runs/run-r9", 77)
    k.mkdir(str(root / "memory" / "sandboxd" / "alice" / "not-a-room"))
    assert b.reconcile({"live"}) == ["dead"]
    assert 77 in k.kills
    for c in V1_FILES:
        assert not (root / c / "sandboxd/alice/room-dead").exists()
        assert (root / c / "sandboxd/alice/room-live").exists()
    assert (root / "memory" / "sandboxd" / "alice" / "not-a-room").exists()


def test_reconcile_v2_skips_supervisor(v2tree: tuple[FakeKernel, Path, Path]) -> None:
    k, root, proc = v2tree
    b = v2(k, root, proc)
    b.create_room("old", LIMITS)
    assert b.reconcile(set()) == ["old"]
    assert (root / "svc" / "supervisor").exists()


def test_fs_errors_name_the_path(tmp_path: Path) -> None:
    fs = Fs()
    with pytest.raises(InternalError) as exc:
        fs.write(str(tmp_path / "nope" / "memory.max"), "1")
    assert exc.value.context["path"].endswith("nope/memory.max")
    assert "memory.max" in exc.value.message
