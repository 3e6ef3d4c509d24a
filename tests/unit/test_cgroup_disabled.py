"""The disabled backend (the tree machinery over zero hierarchies), names, reconcile and the
filesystem seam."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cgroupfake import LIMITS, V1_FILES, FakeKernel, put, v1, v1tree, v2, v2tree

from sandboxd.config import RoomLimits
from sandboxd.errors import InternalError, LimitUnavailable, ValidationError
from sandboxd.jail.cgroup.detect import detect
from sandboxd.jail.cgroup.disabled import DisabledBackend, unattached
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


def test_fs_read_opt_of_a_cgroup_being_removed_is_absent(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A room's v1 OOM count walks its runs while a finished run's cgroup is removed beside it:
    the kernel answers ENODEV for its files between the listing and the read. That exec failed
    with 'cannot read .../run-r6/memory.oom_control: No such device' (stop 28's CI, the
    magic-links test's fast spawn checking the room's free memory). Absent, not an error; any
    other errno still is one."""
    import builtins
    import errno as errno_mod

    from sandboxd.jail.cgroup import fs as fs_mod

    gone = str(tmp_path / "run-r6" / "memory.oom_control")
    denied = str(tmp_path / "other")
    real_open = builtins.open

    def fake_open(path: str, *a: object, **kw: object) -> object:
        if path == gone:
            raise OSError(errno_mod.ENODEV, "No such device", path)
        if path == denied:
            raise OSError(errno_mod.EACCES, "Permission denied", path)
        return real_open(path, *a, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr(fs_mod, "open", fake_open, raising=False)
    assert Fs().read_opt(gone) is None
    with pytest.raises(InternalError):
        Fs().read_opt(denied)
    with pytest.raises(InternalError):
        Fs().read(gone)  # a file the caller requires is still an error


def test_unattached_room_holds_counts_and_removes_nothing() -> None:
    room = unattached("abc")
    assert (room.room_id, room.path, room.enforced, room.accounting) == ("abc", "", frozenset(),
                                                                         False)
    assert room.procs_paths() == [] and room.stats() == CgroupStats()
    room.kill()
    room.destroy()


def test_the_room_init_imports_only_enter() -> None:
    """The init and the zygote import the package for enter(): the package's __init__ must not
    pull the backends (the daemon side) into every room."""
    import subprocess
    import sys

    code = ("import sys; import sandboxd.jail.init, sandboxd.jail.zygote\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('sandboxd'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "sandboxd.jail.cgroup" in loaded
    # Before the split the one cgroup module also loaded the limits table and the backends.
    assert not {m for m in loaded if m.startswith("sandboxd.jail.cgroup.")}, loaded
    assert "sandboxd.limits" not in loaded and "sandboxd.hostsetup" not in loaded, loaded


# --- the filesystem seam, on a real directory -------------------------------------------------


def test_fs_reads_writes_and_lists(tmp_path: Path) -> None:
    fs = Fs()
    (tmp_path / "a").mkdir()
    (tmp_path / "f").write_text("3\n")
    assert fs.read(str(tmp_path / "f")) == "3\n"
    assert fs.read_opt(str(tmp_path / "missing")) is None
    with pytest.raises(InternalError):
        fs.read(str(tmp_path / "missing"))
    with pytest.raises(InternalError):
        fs.read_opt(str(tmp_path / "a"))  # EISDIR: not "absent"
    fs.write(str(tmp_path / "f"), "4")
    assert (tmp_path / "f").read_text() == "4"
    assert fs.listdirs(str(tmp_path)) == ["a"] and fs.listdirs(str(tmp_path / "nope")) == []
    with pytest.raises(InternalError):
        fs.listdirs(str(tmp_path / "f"))
    assert fs.mkdir(str(tmp_path / "b")) and not fs.mkdir(str(tmp_path / "b"))
    with pytest.raises(InternalError):
        fs.mkdir(str(tmp_path / "nope" / "c"))
    fs.chmod(str(tmp_path / "b"), 0o700)
    with pytest.raises(InternalError):
        fs.chmod(str(tmp_path / "nope"), 0o700)
    with pytest.raises(InternalError):
        fs.chown(str(tmp_path / "nope"), 0, 0)
    fd = fs.open_dir(str(tmp_path / "b"))
    os.close(fd)
    fd = fs.open_procs(str(tmp_path / "f"))
    os.close(fd)
    for opener in (fs.open_dir, fs.open_procs):
        with pytest.raises(InternalError):
            opener(str(tmp_path / "nope"))
    assert fs.exists(str(tmp_path / "f")) and fs.isdir(str(tmp_path / "a"))
    assert fs.access(str(tmp_path / "f"), os.R_OK)
    fs.rmdir(str(tmp_path / "b"))
    fs.sleep(0)
    fs.kill(2 ** 22 + 1, 0)  # a pid that does not exist: nothing to kill is no error


@pytest.mark.parametrize(("text", "want"), [("12\n", 12), ("max\n", None), ("x", None),
                                            (None, None)])
def test_fs_ints(text: str | None, want: int | None) -> None:
    from sandboxd.jail.cgroup.fs import ints, keyed

    assert ints(text) == want
    assert keyed(None, "a") is None and keyed("a 1\nb 2\n", "b") == 2 and keyed("a 1", "z") is None
