"""Rooms at scale (issue 18): create and destroy p50/p95 of a fresh room, then rooms
accumulated to 10, 100, 500 and 1,000 — at each step the creation time of the next rooms and the
PSS of an idle room (its init's proportional set size: the pages it shares with the zygote and
the other rooms counted by share) — and the wall it hits, if any, with the error it gives.

The client runs as root, which no per-uid room quota counts (the daemon's admin), so the walls
are the host's and the daemon's: id slices, fds, memory.

    /opt/sandboxd/venv/bin/python bench/rooms.py [--steps 10,100,500,1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, pct, table

from sandboxd import errors
from sandboxd.client import Client


def room_inits() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("sandboxd: room") and "bench-scale-" in cmd:
            out.append(p)
    return out


def pss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total / max(len(procs), 1) / (1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="10,100,500,1000")
    ap.add_argument("--cold", type=int, default=30)
    args = ap.parse_args()
    steps = [int(x) for x in args.steps.split(",")]
    with daemon() as path, Client(path, timeout=120) as c:
        create, destroy = [], []
        for i in range(args.cold):
            sb = c.sandbox(f"bench-cold-{i}")
            t = time.perf_counter()
            sb.get()
            create.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            sb.destroy()
            destroy.append((time.perf_counter() - t) * 1000)
        print(table([["create", f"{pct(create, 50):.1f}", f"{pct(create, 95):.1f}"],
                     ["destroy", f"{pct(destroy, 50):.1f}", f"{pct(destroy, 95):.1f}"]],
                    [f"fresh room, n={args.cold} (ms)", "p50", "p95"]))
        rows = []
        made = 0
        wall = None
        for step in steps:
            times = []
            while made < step and wall is None:
                t = time.perf_counter()
                try:
                    c.sandbox(f"bench-scale-{made}").get()
                except errors.SandboxError as err:
                    wall = f"room {made + 1}: {err.code}: {err}"
                    break
                times.append((time.perf_counter() - t) * 1000)
                made += 1
            if not times:
                break
            tail = times[-min(10, len(times)):]
            # (an idle room: give the last ones a moment to settle)
            time.sleep(1.0)
            rows.append([str(made), f"{statistics.median(tail):.1f}",
                         f"{pss_mib(room_inits()):.2f}",
                         f"{psutil.virtual_memory().used / (1 << 30):.1f}"])
            if wall is not None:
                break
        print()
        print(table(rows, ["rooms", "create ms (last 10, p50)", "PSS per idle room MiB",
                           "host memory used GiB"]))
        print(f"wall: {wall or 'none up to ' + str(made) + ' rooms'}")
        # existing rooms keep working at the wall
        if made:
            r = c.sandbox("bench-scale-0").exec("echo", ["alive"])
            print(f"an existing room at the end: {r.status} {r.stdout.strip()}")
        for i in range(made):
            try:
                c.sandbox(f"bench-scale-{i}").destroy()
            except errors.SandboxError:
                pass


if __name__ == "__main__":
    main()
