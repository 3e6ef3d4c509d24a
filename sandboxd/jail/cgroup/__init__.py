"""cgroups of rooms and runs: v2 (delegated), v1 (hybrid hosts), disabled — behind one interface.

This module is what a process *inside* the jail needs: :func:`enter`, stdlib only, safe right
after fork(). The room init and the zygote import nothing else of the package. The daemon side:

    interface.py   the contract: CgroupBackend, RoomCgroup, RunCgroup (ABCs, the only types
                   the rest of sandboxd names), CgroupStats, RunCgroupLimits
    fs.py          the filesystem seam (Fs): every cgroupfs access, faked by the unit tests
    tree.py        the machinery v1, v2 and disabled share: rooms and runs as directories in
                   each hierarchy, their creation, limits, kill, wait and removal
    v2.py, v1.py   what differs per kernel interface (Ops), the backend, its probe; v2's
                   start-up step (bootstrap: the daemon into <own>/supervisor)
    disabled.py    the same machinery over zero hierarchies; ``unattached()``
    detect.py      picks the backend at start-up
    (host side)    root-only delegation, favordynmods and the doctor report live in
                   sandboxd/hostsetup/cgroups.py

THEORY OF OPERATION

Where the cgroups live.

    v2  (pure v2 at /sys/fs/cgroup, or the cgroup2 mount at /sys/fs/cgroup/unified on hybrid
        hosts). The delegated subtree is the daemon's own cgroup (``0::<own>`` in
        /proc/self/cgroup). Because of the "no internal processes" rule the daemon must sit in a
        leaf: systemd >= 254 puts it in ``<own>/supervisor`` (``DelegateSubgroup=supervisor``);
        otherwise detect() returns a v2 backend with ``pending_move`` and its bootstrap() moves
        the daemon there; either way bootstrap() enables memory/pids/cpu in the subtree's
        ``cgroup.subtree_control``. Rooms are siblings of the supervisor::

            <own>/supervisor                  daemon, zygote
            <own>/room-<id>                   the room's cpu.max and pids.max (init included);
                                              subtree_control +memory +pids
            <own>/room-<id>/init              the room init and its helpers (procs_paths()); no
                                              memory limit of its own
            <own>/room-<id>/runs              the room's memory limit (memory.max,
                                              memory.swap.max=0); subtree_control +memory +pids
            <own>/room-<id>/runs/run-<run>    one payload run (its own memory.max / pids.max)

        ``init`` exists because a v2 cgroup with controllers enabled for its children may not hold
        processes itself; run cgroups need memory/pids enabled to carry their own limits.
    v1  (hybrid hosts): one directory per controller hierarchy (memory, pids, cpu, cpuacct,
        freezer; co-mounted hierarchies such as cpu,cpuacct are written once), under a parent that
        ``sandboxctl setup`` created and chowned to the daemon's user (default
        ``sandboxd/<user>``), the same tree in each::

            <v1_root>/<ctrl>/<parent>/room-<id>[/init | /runs[/run-<run>]]

        (memory.limit_in_bytes = memory.memsw.limit_in_bytes on runs, cpu and pids on room-<id>)
    disabled: nothing on disk; rlimits and wall-clock kills of the room's pid-namespace init are
        the only fences (doctor and ping say so).

Why the memory limit sits on ``runs``, not on the room (issue 10, L4). The kernel's OOM killer
picks its victim among every task of the cgroup whose limit was hit, by size and oom_score_adj.
The init raises its children's score, but any process may lower its own back to 0 (its
oom_score_adj_min) and the init cannot go below 0 without CAP_SYS_RESOURCE in the initial
namespace: a room of small processes whose memory is in tmpfs or /dev/shm pages (attributed to
no process) made the ~30 MB init the biggest task, and the room died with it. With the limit on
``runs`` the init is outside every cgroup a payload can fill, so no OOM a payload causes can
choose it: a run's OOM picks among the run's processes (its own limit), a room-wide one among
all runs' processes. What each cgroup is charged with:

    runs        every payload's memory, and the tmpfs/shm pages payloads wrote: a page stays
                charged to the cgroup that first wrote it, and the pages of a removed run
                cgroup keep counting against ``runs``
    init        the init's own memory (~6 MiB charged, ~30 MiB resident) and the pages the file
                API writes (the init writes them, issue 10 H4): bounded by the room's tmpfs sizes
                (diskBytes, /dev/shm), and writeFile refuses up front what would not fit in
                memoryBytes next to what the room already holds (roomfiles._check_headroom)

so a room can hold up to memoryBytes in its runs plus what the file API stored; no limit on the
init means no OOM kill of the init either. While the init stands in a run cgroup (the fast
spawn path, between joining and posix_spawn's return) it is inside ``runs``: the daemon takes
the fork path instead when ``runs`` is near its limit or another run is live
(runs.init_may_stand_in).

Killing. v2 writes "1" to ``cgroup.kill`` (kernel >= 5.14; older kernels: cgroup.freeze, SIGKILL
each pid, unfreeze). v1 has no kill file, and a plain "read cgroup.procs, kill each pid" loop races
with fork and misses nothing only if nothing can fork meanwhile, so: freezer.state=FROZEN, wait
until it reads FROZEN, SIGKILL every pid of the subtree in every hierarchy, THAWED (the kill is
delivered on thaw). That covers stopped processes (``kill -STOP 0`` froze Piston's executor,
piston #196), setsid'd and double-forked ones (sandbox-sdk #338). destroy() then waits (bounded)
until the subtree is empty and removes directories children-first.

Joining a run (why RunCgroup.join_fds() exists next to dir_fds()). The kernel checks a
cgroup.procs write with the credentials, and on >= 5.16 the cgroup namespace, *of whoever opened
the file* (CVE-2021-4197 fix):

    v2  the writer must be allowed to write cgroup.procs of the common ancestor (room-<id>), and
        with ``nsdelegate`` (systemd mounts it so) source and destination must lie inside the
        opener's cgroup namespace. A payload child that opens the file itself has a subordinate
        uid and a cgroup namespace rooted at room-<id>/init, so both checks fail. join_fds() are
        therefore cgroup.procs files opened O_WRONLY *by the daemon*; the child only writes "0".
    v1  the opener's euid must be root or equal to the moved task's uid, so a daemon-opened file
        cannot move a payload running as a subordinate uid. The child must open the file itself:
        join_fds() are the directory fds, run-<run>/cgroup.procs is mode 0666 and room-<id> is mode
        0700, so only holders of the directory fd (the room init) can reach the file.

Names come only from room and run ids that match ``[A-Za-z0-9_-]{1,63}`` (checked again here).
Every OSError is translated at the edge (fs.py) into errors.InternalError (or LimitUnavailable
when a limit file cannot be written) naming the path. All roots are parameters and all
filesystem access goes through ``Fs``, so the unit tests run v1, v2 and disabled on a fake tree.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

__all__ = ["enter"]


def enter(fds: Sequence[int]) -> None:
    """Child side of joining a run: write "0" through each fd of RunCgroup.join_fds().

    A directory fd (v1) is opened here, with the child's own credentials; a cgroup.procs fd (v2)
    was opened by the daemon and is written as is. Uses os only: safe right after fork().
    """
    for fd in fds:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            procs = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=fd)
            try:
                os.write(procs, b"0")
            finally:
                os.close(procs)
        else:
            os.write(fd, b"0")
