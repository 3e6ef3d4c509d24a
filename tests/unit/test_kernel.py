"""sandboxd.kernel: the probe of interfaces newer than Debian 12's kernel, on fake trees."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from sandboxd import hostsetup, kernel, protocol
from sandboxd.jail import _syscalls


def _tree(tmp: Path, rel: str, files: list[str], *, unified: bool = False) -> tuple[str, str]:
    proc = tmp / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(f"12:memory:/x\n0::{rel}\n")
    top = tmp / "cg" / ("unified" if unified else "")
    own = top / rel.lstrip("/")
    own.mkdir(parents=True, exist_ok=True)
    (top / "cgroup.controllers").write_text("memory pids cpu\n")
    for f in files:
        (own / f).write_text("0\n")
    return str(tmp / "proc"), str(tmp / "cg")


def _by_name(features: list[kernel.Feature]) -> dict[str, bool]:
    return {f.name: f.present for f in features}


def test_a_6_1_like_cgroup_has_every_probed_file(tmp_path: Path) -> None:
    proc, cg = _tree(tmp_path, "/system.slice/sandboxd.service/supervisor",
                     ["cgroup.kill", "memory.current", "memory.peak", "memory.swap.max",
                      "pids.current", "pids.peak"])
    got = kernel.probe(proc, cg)
    assert _by_name(got) == {"openat2": True, "pidfd_open": True, "cgroup.kill": True,
                             "memory.peak": True, "memory.swap.max": True, "pids.peak": True}
    assert kernel.summary(got)["missing"] == []


def test_an_older_kernel_is_named_missing_not_a_crash(tmp_path: Path) -> None:
    proc, cg = _tree(tmp_path, "/sandboxd/u", ["memory.current", "pids.current"], unified=True)
    got = kernel.probe(proc, cg)
    summary = kernel.summary(got)
    assert summary["missing"] == ["cgroup.kill", "memory.peak", "memory.swap.max", "pids.peak"]
    assert not any(f.required for f in got if not f.present)  # each one only degrades a figure
    assert summary["release"] == os.uname().release


def test_controllers_not_enabled_means_no_verdict_on_their_files(tmp_path: Path) -> None:
    proc, cg = _tree(tmp_path, "/a/b", ["cgroup.kill"])
    assert _by_name(kernel.probe(proc, cg)) == {"openat2": True, "pidfd_open": True,
                                               "cgroup.kill": True}


def test_the_root_cgroup_and_no_cgroup2_probe_only_syscalls(tmp_path: Path) -> None:
    proc, cg = _tree(tmp_path, "/", [])
    assert set(_by_name(kernel.probe(proc, cg))) == {"openat2", "pidfd_open"}
    assert set(_by_name(kernel.probe(str(tmp_path / "none"), cg))) == {"openat2", "pidfd_open"}


def test_enosys_is_missing_and_essential_other_errors_are_present(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def enosys(*_a: object) -> int:
        raise OSError(errno.ENOSYS, "no")

    def eperm(*_a: object) -> int:
        raise OSError(errno.EPERM, "no")

    monkeypatch.setattr(_syscalls, "openat2", enosys)
    monkeypatch.setattr(os, "pidfd_open", eperm)
    got = {f.name: f for f in kernel.probe(str(tmp_path), str(tmp_path))}
    assert not got["openat2"].present and got["openat2"].required
    assert "ENOSYS" in got["openat2"].detail
    assert got["pidfd_open"].present and "EPERM" in got["pidfd_open"].detail
    checks = {c.name: c for c in hostsetup._check_kernel_features()}
    bad = checks["kernel interface openat2"]
    assert (bad.ok, bad.essential) == (False, True) and "file API" in bad.cost


def test_ping_capabilities_carry_the_report() -> None:
    caps = protocol.Capabilities(namespaces=[], cgroup=None, rootfs="host", id_mapping="single",
                                 id_slices={}, seccomp={}, limits=[],
                                 kernel={"release": "6.1.0-1", "missing": ["x"]})
    wire = json.loads(protocol.encode(caps))
    assert wire["kernel"] == {"release": "6.1.0-1", "missing": ["x"]}
    assert wire["idMapping"] == "single"  # camelCase like its siblings
