"""What this host's kernel offers of the interfaces sandboxd uses beyond Debian 12's baseline.

sandboxd is developed on a current kernel (6.18) and supported down to Debian 12's 6.1. Each
interface below is probed directly — a syscall answering ENOSYS, a cgroup file present or not —
never inferred from the version number (distribution kernels backport, and a seccomp filter
above the daemon can hide a syscall the kernel has). ``required`` features are ones without
which a room or an API cannot work: the daemon still starts, and ``doctor``/``ping`` name what
is missing instead of a crash at the first request. The others degrade one figure or one path,
named by ``cost``.

    probe(proc_root="/proc", cgroup_root="/sys/fs/cgroup") -> list[Feature]
    summary(features) -> {"release": str, "missing": [names], "features": {name: bool}}

Pure reads and harmless syscalls only (an openat2 of "/", a pidfd of ourselves): safe to run in
the daemon at start-up and in ``sandboxctl doctor`` as any user.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from .jail import _syscalls as sc

__all__ = ["Feature", "probe", "summary"]


@dataclass(frozen=True)
class Feature:
    name: str
    present: bool
    required: bool
    since: str  # the first mainline kernel that has it
    cost: str  # what is lost without it
    detail: str = ""


def _syscall_present(call: Callable[[], int]) -> tuple[bool, str]:
    """True unless the call fails with ENOSYS (any other answer means the kernel knows it)."""
    try:
        fd = call()
    except OSError as err:
        if err.errno == errno.ENOSYS:
            return False, "ENOSYS (an older kernel, or a seccomp filter above the daemon)"
        return True, f"answers {errno.errorcode.get(err.errno or 0, err.errno)}"
    os.close(fd)
    return True, ""


def _own_cgroup2(proc_root: str, cgroup_root: str) -> str | None:
    """This process's cgroup2 directory, if a cgroup2 hierarchy is mounted where we look."""
    try:
        with open(os.path.join(proc_root, "self", "cgroup")) as f:
            rel = next((ln[3:].strip() for ln in f if ln.startswith("0::")), None)
    except OSError:
        return None
    if rel is None or not rel.strip("/"):
        return None  # interface files exist only below the root cgroup
    for top in (cgroup_root, os.path.join(cgroup_root, "unified")):
        if os.path.exists(os.path.join(top, "cgroup.controllers")):
            return os.path.join(top, rel.lstrip("/"))
    return None


def probe(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> list[Feature]:
    out: list[Feature] = []
    have, detail = _syscall_present(lambda: sc.openat2(
        -100, "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, sc.RESOLVE_NO_MAGICLINKS))
    out.append(Feature("openat2", have, True, "5.6",
                       "the file API cannot resolve paths without following magic links: "
                       "every file method fails", detail))
    have, detail = _syscall_present(lambda: os.pidfd_open(os.getpid()))
    out.append(Feature("pidfd_open", have, True, "5.3",
                       "signals to a room's init cannot be sent race-free", detail))
    own = _own_cgroup2(proc_root, cgroup_root)
    if own is not None:
        out.append(Feature("cgroup.kill", os.path.exists(os.path.join(own, "cgroup.kill")),
                           False, "5.14", "v2 kills a room by freezing it and signalling each "
                           "process (slower, same result)"))
        if os.path.exists(os.path.join(own, "memory.current")):
            out.append(Feature("memory.peak", os.path.exists(os.path.join(own, "memory.peak")),
                               False, "5.19", "v2 reports no peak memory (memoryPeakBytes null)"))
            out.append(Feature("memory.swap.max",
                               os.path.exists(os.path.join(own, "memory.swap.max")), False,
                               "4.5 + swap accounting", "a room's memory limit does not cover "
                               "swap (the kernel was built or booted without swap accounting)"))
        if os.path.exists(os.path.join(own, "pids.current")):
            out.append(Feature("pids.peak", os.path.exists(os.path.join(own, "pids.peak")),
                               False, "6.1", "v2 reports no peak process count (pidsPeak null)"))
    return out


def summary(features: list[Feature]) -> dict[str, object]:
    """The ``kernel`` entry of ``ping``'s capabilities."""
    return {"release": os.uname().release,
            "missing": [f.name for f in features if not f.present],
            "features": {f.name: f.present for f in features}}
