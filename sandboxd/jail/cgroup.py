"""cgroup backends behind one interface: v2 (delegated), v1 (hybrid hosts), disabled.

INTERFACE CONTRACT (the rest of sandboxd codes against exactly this; keep it stable):

    backend = detect(config_backend="auto", parent=None, v1_root="/sys/fs/cgroup",
                     v2_root=None, proc_root="/proc")           -> CgroupBackend
    backend.name            "v2" | "v1" | "disabled"
    backend.controllers     frozenset of controllers we can enforce: {"cpu","memory","pids",...}
    backend.describe()      dict for ping.capabilities / doctor (backend, root path(s),
                            controllers, what is missing and why)
    backend.check_limits(limits: RoomLimits) -> None
                            raise errors.LimitUnavailable(limit=...) if a limit cannot be enforced
    backend.create_room(room_id: str, limits: RoomLimits) -> RoomCgroup
                            creates the room's cgroup(s) and writes the limits (fail closed)
    backend.reconcile(live_room_ids: set[str]) -> list[str]
                            kills and removes cgroups of rooms not in the set (crash leftovers)

    RoomCgroup.procs_paths() -> list[str]
                            host paths of cgroup.procs files; a process joins the room by
                            writing "0" to each (the zygote's child does this before unshare)
    RoomCgroup.create_run(run_id: str, limits: RunCgroupLimits | None) -> RunCgroup
    RoomCgroup.stats() -> CgroupStats
    RoomCgroup.kill() -> None        SIGKILL every process, including stopped ones
    RoomCgroup.destroy() -> None     kill, wait until empty (bounded), rmdir everything

    RunCgroup.dir_fds() -> list[int]
                            O_DIRECTORY fds (one per hierarchy), owned by the RunCgroup; they are
                            passed to the room init by SCM_RIGHTS, and the payload child joins the
                            run by openat(fd, "cgroup.procs", O_WRONLY) + write("0") before exec
                            (the room cannot see /sys/fs/cgroup)
    RunCgroup.stats() -> CgroupStats
    RunCgroup.cpu_usage_ns() -> int  cheap; polled every <=50 ms for CPU-time limits
    RunCgroup.oom_killed() -> bool   from memory.events oom_kill (v2) / memory.oom_control (v1)
    RunCgroup.kill() -> None         v2: cgroup.kill; v1: freezer FROZEN, SIGKILL all, THAWED
    RunCgroup.destroy() -> None      kill, wait until empty (bounded), close fds, rmdir

    CgroupStats: cpu_usage_ns, memory_peak_bytes (None if unknown), pids_current, pids_peak
                 (None if unknown), oom_kills

The disabled backend implements the same interface and returns no fds / empty stats; callers
never write ``if cgroups_enabled``.
"""
