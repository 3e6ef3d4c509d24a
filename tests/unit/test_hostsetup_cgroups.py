"""The cgroup half of host set-up: delegation, favordynmods and the doctor report."""

from __future__ import annotations

from pathlib import Path

import pytest
from cgroupfake import V1_FILES, FakeKernel, v1tree, v2tree

from sandboxd.errors import InternalError
from sandboxd.hostsetup import cgroups as hcg
from sandboxd.jail.cgroup import v1 as cg_v1
from sandboxd.jail.cgroup.detect import detect
from sandboxd.jail.cgroup.v1 import V1Backend

# the fixtures, bound by name
fixtures = (v1tree, v2tree)


def test_delegate_v1_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    k = FakeKernel(root)
    for ctrl in (*V1_FILES, "devices"):
        (root / ctrl).mkdir(parents=True)
        (root / ctrl / "cgroup.procs").write_text("")
    lines = hcg.delegate("bob", 1001, 1002, str(root), fs=k)
    assert len(lines) == 5 and all("created" in line for line in lines)
    for ctrl in V1_FILES:
        d = root / ctrl / "sandboxd" / "bob"
        assert d.is_dir()
        assert (str(d), 1001, 1002) in k.chowns
        assert (str(d / "cgroup.procs"), 1001, 1002) in k.chowns
    assert not (root / "devices" / "sandboxd").exists()
    assert (str(root / "memory" / "sandboxd"), 1001, 1002) not in k.chowns
    again = hcg.delegate("bob", 1001, 1002, str(root), fs=k)
    assert all(line.startswith("kept") for line in again)
    assert isinstance(detect("auto", None, str(root), None, "/x", user="bob", fs=k),
                      V1Backend)

def test_delegate_pure_v2(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    k = FakeKernel(root)
    k.populate(str(root))
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    lines = hcg.delegate("bob", 1001, 1002, str(root), fs=k)
    assert ("cgroup.subtree_control", "+memory +pids +cpu") in k.writes
    assert ("sandboxd/cgroup.subtree_control", "+memory +pids +cpu") in k.writes
    d = root / "sandboxd" / "bob"
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        assert (str(d / name) if name else str(d), 1001, 1002) in k.chowns
    assert any("delegated" in line for line in lines)

def test_doctor_report(v1tree: tuple[FakeKernel, Path]) -> None:
    k, root = v1tree
    rep = hcg.doctor_report(v1_root=str(root), proc_root="/nonexistent", user="alice", fs=k)
    assert all(isinstance(n, str) and isinstance(ok, bool) and isinstance(c, str)
               for n, ok, c in rep)
    by = {n.split(" (")[0]: ok for n, ok, _ in rep}
    assert by["cgroup backend: v1"] and by["limit memory enforceable"]
    assert by["cgroup v1 freezer parent sandboxd/alice"]
    rep2 = hcg.doctor_report(v1_root=str(root), proc_root="/x", user="nobody-here", fs=k)
    assert ("cgroup backend: disabled", False) in [(n, ok) for n, ok, _ in rep2]
    assert any("pids" in cost for n, ok, cost in rep2 if not ok)

def test_doctor_report_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    k = FakeKernel(tmp_path)

    def boom(path: str) -> list[str]:
        raise InternalError(f"cannot list {path}: Permission denied", path=path)

    monkeypatch.setattr(cg_v1, "hierarchies", lambda root, fs: boom(root))
    rep = hcg.doctor_report(v1_root=str(tmp_path), proc_root="/x", fs=k)
    assert rep == [("cgroup report", False,
                    f"cannot inspect cgroups: cannot list {tmp_path}: Permission denied")]


# --- favordynmods (migration latency) -----------------------------------------------------------

MOUNTS_OFF = ("tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n"
              "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
              "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n")


def test_favor_dynmods_remounts_the_cgroup2_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS_OFF)
    assert hcg.favor_dynmods_status(str(mounts)) == (False, "off on /sys/fs/cgroup/unified")
    done: list[str] = []
    lines = hcg.favor_dynmods(str(mounts), remount=done.append)
    assert done == ["/sys/fs/cgroup/unified"]
    assert "remounted /sys/fs/cgroup/unified" in lines[0]


def test_favor_dynmods_is_idempotent_and_reports_failures(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS_OFF.replace("cgroup2 rw,relatime", "cgroup2 rw,relatime,favordynmods"))
    assert hcg.favor_dynmods_status(str(mounts))[0] is True

    def boom(target: str) -> None:
        raise AssertionError("must not remount")

    assert "already on" in hcg.favor_dynmods(str(mounts), remount=boom)[0]
    mounts.write_text(MOUNTS_OFF)

    def fails(target: str) -> None:
        raise OSError("bad option")

    line = hcg.favor_dynmods(str(mounts), remount=fails)[0]
    assert "failed" in line and "grace period" in line
    mounts.write_text("cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n")
    assert hcg.favor_dynmods_status(str(mounts)) == (False, "no cgroup2 mount")
