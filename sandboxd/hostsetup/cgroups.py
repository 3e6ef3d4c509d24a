"""The cgroup half of host set-up (``sandboxctl setup``, as root) and diagnosis (``doctor``).

Root-only and run once: hand a user a cgroup parent (:func:`delegate`), make cgroup migrations
fast (:func:`favor_dynmods`), and say what a host's cgroups offer and what each missing piece
costs (:func:`doctor_report`). The daemon's own runtime code is in sandboxd/jail/cgroup/; this
module reads the same probes (``v1.status``, ``v2.probe``, ``detect``) so that doctor says
exactly what the daemon would pick.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .. import limits as limits_table
from ..errors import LimitUnavailable, SandboxError, ValidationError
from ..jail.cgroup import v1, v2
from ..jail.cgroup.detect import detect
from ..jail.cgroup.fs import Fs, join
from ..jail.cgroup.v2 import V2Backend

__all__ = ["CONTROLLER_COST", "FAVOR_DYNMODS_COST", "delegate", "doctor_report", "favor_dynmods",
           "favor_dynmods_status"]

#: What a room loses without each controller (the limit controllers' costs are the table's).
CONTROLLER_COST = {
    **{lim.controller: lim.cost for lim in limits_table.CGROUP_LIMITS if lim.controller},
    "cpuacct": "no CPU-time figure: CPU-time limits fall back to RLIMIT_CPU per process",
    "freezer": "v1 cannot kill a room reliably (stopped/forking processes): v1 backend unusable",
}


# --- delegation ------------------------------------------------------------------------------


def delegate(user: str, uid: int, gid: int, v1_root: str = "/sys/fs/cgroup",
             v2_root: str | None = None, *, parent: str | None = None,
             fs: Fs | None = None) -> list[str]:
    """``sandboxctl setup --user USER`` (as root, idempotent): give USER a cgroup parent.

    v1 hierarchies (hybrid hosts): ``<ctrl>/<parent>`` in memory, pids, cpu, cpuacct, freezer,
    owned by USER (the directory, cgroup.procs and tasks; limit files of the parent stay root's,
    so an administrator can cap USER's total). Pure v2: ``<root>/<parent>`` with memory/pids/cpu
    enabled on the way down, chowned like systemd's Delegate=yes (directory, cgroup.procs,
    cgroup.subtree_control, cgroup.threads); the daemon must then be *started* inside it (by
    root or systemd): an unprivileged process cannot move itself across the root.
    ``parent`` defaults to ``sandboxd/<user>``.
    """
    fs = fs or Fs()
    rel = (parent or f"sandboxd/{user}").strip("/")
    lines: list[str] = []

    def mkdirs(top: str) -> list[str]:
        made = []
        cur = top
        for part in rel.split("/"):
            cur = os.path.join(cur, part)
            if fs.mkdir(cur):
                made.append(cur)
        return made

    hier = v1.hierarchies(v1_root, fs)
    if hier:
        for top in dict.fromkeys(hier.values()):
            made = mkdirs(top)
            d = join(top, rel)
            for name in ("", "cgroup.procs", "tasks"):
                p = os.path.join(d, name) if name else d
                if fs.exists(p):
                    fs.chown(p, uid, gid)
            lines.append(f"{'created' if made else 'kept'} {d} owned by {user} ({uid}:{gid})")
        return lines
    root = v2.find_root(v1_root, v2_root, fs)
    if root is None:
        return [f"no cgroup hierarchy under {v1_root}: nothing delegated"]
    avail = set((fs.read_opt(os.path.join(root, "cgroup.controllers")) or "").split())
    want = [c for c in v2.CONTROLLERS if c in avail]
    cur = root
    parts = rel.split("/")
    for i, part in enumerate(parts):
        enabled = set((fs.read_opt(os.path.join(cur, "cgroup.subtree_control")) or "").split())
        add = [c for c in want if c not in enabled]
        if add:
            fs.write(os.path.join(cur, "cgroup.subtree_control"), " ".join("+" + c for c in add))
            lines.append(f"enabled {' '.join(add)} in {cur}/cgroup.subtree_control")
        cur = os.path.join(cur, part)
        if fs.mkdir(cur):
            lines.append(f"created {cur}")
        if i == len(parts) - 1:
            for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
                p = os.path.join(cur, name) if name else cur
                if fs.exists(p):
                    fs.chown(p, uid, gid)
            lines.append(f"delegated {cur} to {user} ({uid}:{gid}); start sandboxd inside it "
                         "(or use the systemd unit with Delegate=yes)")
    missing = [c for c in v2.CONTROLLERS if c not in avail]
    if missing:
        lines.append(f"controllers not available at {root}: {' '.join(missing)}")
    return lines


# --- migration latency ------------------------------------------------------------------------
#
# Every cgroup migration (a payload joining its run's cgroup, on v1 and v2 alike) takes the one
# global cgroup_threadgroup_rwsem for writing. Unless a migration happened within the last
# grace period, that waits for RCU: 5-8 ms measured here per sparse exec, against 0.1 ms with
# the cgroup2 mount option favordynmods, which keeps the lock in its writer-friendly mode (the
# kernel's own trade-off: fork and exit get slightly more expensive). The option is per
# hierarchy but the lock is global, so setting it on any cgroup2 mount helps v1 rooms too.
FAVOR_DYNMODS_COST = ("every exec waits for an RCU grace period to join its run cgroup "
                      "(5-8 ms here when runs are not back to back)")


def _cgroup2_mounts(mounts: str) -> list[tuple[str, list[str]]]:
    out = []
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "cgroup2":
            out.append((parts[1], parts[3].split(",")))
    return out


def favor_dynmods_status(mounts_path: str = "/proc/mounts") -> tuple[bool, str]:
    """Whether some cgroup2 mount has favordynmods (the lock is global), and which."""
    try:
        with open(mounts_path) as f:
            mounts = _cgroup2_mounts(f.read())
    except OSError as err:
        return False, f"cannot read {mounts_path}: {err.strerror}"
    if not mounts:
        return False, "no cgroup2 mount"
    on = [mp for mp, opts in mounts if "favordynmods" in opts]
    return (True, f"on ({', '.join(on)})") if on else (False, "off on " + ", ".join(
        mp for mp, _ in mounts))


def favor_dynmods(mounts_path: str = "/proc/mounts",
                  remount: Callable[[str], None] | None = None) -> list[str]:
    """`sandboxctl setup` (root): remount the first cgroup2 mount with favordynmods. Lost at
    reboot like the rest of setup; a host that boots with it uses the kernel config
    CGROUP_FAVOR_DYNMODS or systemd's own mount options."""
    ok, detail = favor_dynmods_status(mounts_path)
    if ok:
        return [f"favordynmods already {detail}"]
    try:
        with open(mounts_path) as f:
            mounts = _cgroup2_mounts(f.read())
    except OSError:
        mounts = []
    if not mounts:
        return [f"favordynmods: not set ({detail}); cost: {FAVOR_DYNMODS_COST}"]
    target = mounts[0][0]
    do = remount or _remount_favor
    try:
        do(target)
    except OSError as err:
        return [f"favordynmods: remount of {target} failed ({err}); cost: {FAVOR_DYNMODS_COST}"]
    return [f"favordynmods: remounted {target} with favordynmods (fast cgroup migrations)"]


def _remount_favor(target: str) -> None:
    import subprocess

    res = subprocess.run(["mount", "-o", "remount,favordynmods", target], capture_output=True,
                         text=True, check=False)
    if res.returncode:
        raise OSError(res.stderr.strip() or f"mount exited {res.returncode}")


# --- doctor ----------------------------------------------------------------------------------


def doctor_report(config_backend: str = "auto", parent: str | None = None,
                  v1_root: str = "/sys/fs/cgroup", v2_root: str | None = None,
                  proc_root: str = "/proc", *, user: str | None = None,
                  fs: Fs | None = None) -> list[tuple[str, bool, str]]:
    """(check, ok, what it costs when missing) lines for ``sandboxctl doctor``. Never raises."""
    try:
        return _doctor(config_backend, parent, v1_root, v2_root, proc_root, user, fs or Fs())
    except SandboxError as err:
        return [("cgroup report", False, f"cannot inspect cgroups: {err.message}")]


def _doctor(config_backend: str, parent: str | None, v1_root: str, v2_root: str | None,
            proc_root: str, user: str | None, fs: Fs) -> list[tuple[str, bool, str]]:
    out: list[tuple[str, bool, str]] = []
    fast, detail = favor_dynmods_status(os.path.join(proc_root, "mounts"))
    out.append((f"cgroup migrations fast (favordynmods {detail})", fast, FAVOR_DYNMODS_COST))
    root = v2.find_root(v1_root, v2_root, fs)
    out.append(("cgroup2 mounted", root is not None, "no cgroup2: v1 backend or nothing"))
    b2 = v2.probe(v1_root, v2_root, parent, proc_root, fs) if root else "no cgroup2"
    out.append(("cgroup2 delegated subtree writable" + ("" if isinstance(b2, V2Backend)
                                                         else f" ({b2})"),
                isinstance(b2, V2Backend), "v2 backend unusable"))
    if isinstance(b2, V2Backend):
        for c in v2.CONTROLLERS:
            out.append((f"cgroup2 controller {c}", c in b2.controllers, CONTROLLER_COST[c]))
    rel, hier, have, missing = v1.status(v1_root, parent, user, fs)
    if hier:
        for c in v1.CONTROLLERS:
            why = f" ({missing[c]})" if c in missing else ""
            out.append((f"cgroup v1 {c} parent {rel}{why}", c in have, CONTROLLER_COST[c]))
    try:
        chosen = detect(config_backend, parent, v1_root, v2_root, proc_root, user=user, fs=fs)
        out.append((f"cgroup backend: {chosen.name}", chosen.name != "disabled",
                    "rlimits and wall-clock kills only: no memory/cpus/pids limits, no OOM "
                    "verdict" if chosen.name == "disabled" else ""))
        can = chosen.enforceable()
        for lim in sorted(limits_table.CGROUP_LIMITS, key=lambda lim: lim.cgroup_name or ""):
            out.append((f"limit {lim.cgroup_name} enforceable", lim.cgroup_name in can,
                        lim.cost))
    except (LimitUnavailable, ValidationError) as err:
        out.append((f"cgroup backend {config_backend}", False, err.message))
    return out
