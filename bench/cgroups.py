"""Cost of the v1 cgroup backend's room and run life cycle, off the daemon's request path.

For N rooms (default 30): create_room, create_run with memory and pids limits plus join_fds, and
room.destroy, each timed on its own, under a throw-away delegated parent in the v1 hierarchies.
Prints p50 and p95 in ms. Asserts nothing (these figures moved here from test_cgroup_real's
test_v1_timings: a timed bound in a test flakes on a loaded 2-core machine).

    /opt/sandboxd/venv/bin/python bench/cgroups.py [--n 30]      (as root, hybrid host)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

from sandboxd.config import MiB, RoomLimits
from sandboxd.hostsetup import cgroups as hcg
from sandboxd.jail.cgroup import detect as cgdetect
from sandboxd.jail.cgroup.interface import RunCgroupLimits
from sandboxd.jail.cgroup.v1 import V1Backend

V1_ROOT = "/sys/fs/cgroup"
CTRLS = ("memory", "pids", "cpu", "cpuacct", "freezer")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    n = ap.parse_args().n
    if os.geteuid() != 0 or not os.path.exists(f"{V1_ROOT}/freezer/cgroup.procs"):
        print("bench/cgroups.py: needs root and cgroup v1 hierarchies", file=sys.stderr)
        return 2
    top = f"sbxbench-{uuid.uuid4().hex[:10]}"
    hcg.delegate("root", 0, 0, V1_ROOT, parent=f"{top}/root")
    try:
        b = cgdetect.detect("v1", f"{top}/root", V1_ROOT)
        assert isinstance(b, V1Backend) and not b.missing, b
        times: dict[str, list[float]] = {"create_room": [], "create_run": [], "destroy": []}
        for i in range(n):
            t0 = time.perf_counter()
            room = b.create_room(f"t{i}", RoomLimits())
            t1 = time.perf_counter()
            run = room.create_run("r", RunCgroupLimits(memory_bytes=64 * MiB, pids=32))
            run.join_fds()  # the run owns these fds and closes them when it is removed
            t2 = time.perf_counter()
            room.destroy()
            t3 = time.perf_counter()
            times["create_room"].append(t1 - t0)
            times["create_run"].append(t2 - t1)
            times["destroy"].append(t3 - t2)
        print(f"v1 backend, {n} rooms ({', '.join(CTRLS)})")
        print(f"{'step':<12} {'p50 ms':>8} {'p95 ms':>8}")
        for k, v in times.items():
            v.sort()
            p95 = v[min(len(v) - 1, int(len(v) * 0.95))]
            print(f"{k:<12} {statistics.median(v) * 1000:8.2f} {p95 * 1000:8.2f}")
    finally:
        for c in CTRLS:
            for dirpath, _dirs, _files in os.walk(f"{V1_ROOT}/{c}/{top}", topdown=False):
                os.rmdir(dirpath)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
