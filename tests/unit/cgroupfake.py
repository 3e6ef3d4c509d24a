"""A fake cgroupfs for the unit tests: tmp directories whose files a small fake kernel fills in.

FakeKernel (an ``Fs``) populates interface files on mkdir, refuses rmdir of populated or non-empty
cgroups, records every write and signal, and makes killed pids disappear the way the kernel does
(v2: on cgroup.kill; v1: when the freezer thaws). Test modules bind the fixtures by name (a
second conftest.py would shadow the root one).
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from sandboxd.config import MiB, RoomLimits
from sandboxd.jail.cgroup.detect import detect
from sandboxd.jail.cgroup.fs import Fs
from sandboxd.jail.cgroup.v1 import V1Backend
from sandboxd.jail.cgroup.v2 import V2Backend

V2_FILES = {
    "cgroup.procs": "", "cgroup.threads": "", "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.kill": "", "cgroup.freeze": "0\n", "cgroup.subtree_control": "",
    "cgroup.controllers": "", "cgroup.type": "domain\n",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n", "cpu.max": "max 100000\n",
    "memory.max": "max\n", "memory.swap.max": "max\n", "memory.peak": "0\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    "pids.max": "max\n", "pids.current": "0\n", "pids.peak": "0\n",
}
V1_FILES = {
    "memory": {"memory.limit_in_bytes": "9223372036854771712\n",
               "memory.memsw.limit_in_bytes": "9223372036854771712\n",
               "memory.max_usage_in_bytes": "0\n",
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"},
    "pids": {"pids.max": "max\n", "pids.current": "0\n", "pids.peak": "0\n"},
    "cpu": {"cpu.cfs_period_us": "100000\n", "cpu.cfs_quota_us": "-1\n"},
    "cpuacct": {"cpuacct.usage": "0\n"},
    "freezer": {"freezer.state": "THAWED\n"},
}


class FakeKernel(Fs):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.writes: list[tuple[str, str]] = []
        self.kills: list[int] = []
        self.chowns: list[tuple[str, int, int]] = []
        self.immortal: set[int] = set()
        self.omit: set[str] = set()  # interface files the "kernel" does not provide

    # -- what kind of cgroup is this path? --------------------------------------------------
    def _kind(self, path: str) -> str:
        rel = Path(path).relative_to(self.root).parts
        if rel and rel[0] in V1_FILES:
            return rel[0]
        if rel and rel[0] == "cpu,cpuacct":
            return "cpu,cpuacct"
        return "v2"

    def populate(self, path: str) -> None:
        kind = self._kind(path)
        files: dict[str, str] = {"cgroup.procs": "", "tasks": ""}
        if kind == "v2":
            files = dict(V2_FILES)
            parent_sc = Path(path).parent / "cgroup.subtree_control"
            if parent_sc.exists():
                files["cgroup.controllers"] = parent_sc.read_text()
        else:
            for k in kind.split(","):
                files.update(V1_FILES[k])
        for name, text in files.items():
            if name not in self.omit:
                (Path(path) / name).write_text(text)

    def mkdir(self, path: str, mode: int = 0o755) -> bool:
        made = super().mkdir(path, mode)
        if made:
            self.populate(path)
        return made

    def rmdir(self, path: str) -> None:
        p = Path(path)
        if any(c.is_dir() for c in p.iterdir()):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        procs = p / "cgroup.procs"
        if procs.exists() and procs.read_text().split():
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        for f in p.iterdir():
            f.unlink()
        p.rmdir()

    def read_opt(self, path: str) -> str | None:
        if os.path.basename(path) == "cgroup.events" and os.path.exists(path):
            # populated is hierarchical, as in the kernel
            live = any(p.read_text().split() for p in Path(path).parent.rglob("cgroup.procs"))
            freeze = Path(path).parent / "cgroup.freeze"
            frozen = freeze.exists() and freeze.read_text().strip() == "1"
            return f"populated {int(live)}\nfrozen {int(frozen)}\n"
        return super().read_opt(path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.chowns.append((path, uid, gid))

    def kill(self, pid: int, sig: int) -> None:
        assert sig == signal.SIGKILL
        self.kills.append(pid)

    def sleep(self, seconds: float) -> None:
        pass

    def _reap(self, dead: set[int] | None) -> None:
        """Dead pids (None: all) leave every cgroup.procs of the tree; immortal ones stay."""
        for procs in self.root.rglob("cgroup.procs"):
            left = [x for x in procs.read_text().split()
                    if int(x) in self.immortal or (dead is not None and int(x) not in dead)]
            procs.write_text("\n".join(left))

    def write(self, path: str, value: str) -> None:
        before = Path(path).read_text().split() if path.endswith("subtree_control") and \
            os.path.exists(path) else []
        super().write(path, value)
        self.writes.append((os.path.relpath(path, self.root), value))
        name = os.path.basename(path)
        if name == "cgroup.subtree_control":  # "+a -b" edits the set; reads list it
            cur: list[str] = list(before)
            for tok in value.split():
                c = tok[1:]
                if tok[0] == "+" and c not in cur:
                    cur.append(c)
                elif tok[0] == "-" and c in cur:
                    cur.remove(c)
            Path(path).write_text(" ".join(cur) + "\n")
        if name == "cgroup.kill" and value == "1":
            self._reap(None)  # the fake kills the whole tree: tests use one cgroup at a time
        elif name == "freezer.state":  # v1 freezes and thaws descendants too
            for f in Path(path).parent.rglob("freezer.state"):
                f.write_text(value)
        if name == "freezer.state" and value == "THAWED":
            self._reap(set(self.kills))  # frozen tasks die when thawed


def put(path: Path, *pids: int) -> None:
    (path / "cgroup.procs").write_text("\n".join(str(p) for p in pids))


@pytest.fixture
def v2tree(tmp_path: Path) -> tuple[FakeKernel, Path, Path]:
    """Pure v2 at tmp/cg; the daemon in /svc/supervisor with memory pids cpu delegated."""
    k = FakeKernel(tmp_path / "cg")
    root = tmp_path / "cg"
    root.mkdir()
    k.populate(str(root))
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    k.mkdir(str(root / "svc"))
    (root / "svc" / "cgroup.subtree_control").write_text("memory pids cpu\n")
    k.mkdir(str(root / "svc" / "supervisor"))
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("0::/svc/supervisor\n")
    return k, root, tmp_path / "proc"


@pytest.fixture
def v1tree(tmp_path: Path) -> tuple[FakeKernel, Path]:
    """Hybrid host: v1 hierarchies under tmp/cg, parent sandboxd/alice in each."""
    root = tmp_path / "cg"
    k = FakeKernel(root)
    for ctrl in V1_FILES:
        (root / ctrl).mkdir(parents=True)
        k.populate(str(root / ctrl))
        (root / ctrl / "sandboxd").mkdir()
        k.populate(str(root / ctrl / "sandboxd"))
        k.mkdir(str(root / ctrl / "sandboxd" / "alice"))
    return k, root


def v1(k: FakeKernel, root: Path) -> V1Backend:
    b = detect("auto", None, str(root), None, "/nonexistent", user="alice", fs=k)
    assert isinstance(b, V1Backend)
    return b


def v2(k: FakeKernel, root: Path, proc: Path) -> V2Backend:
    b = detect("auto", None, str(root), None, str(proc), fs=k)
    assert isinstance(b, V2Backend)
    return b


LIMITS = RoomLimits(memory_bytes=64 * MiB, cpus=1.5, pids=100)
