"""File watch under an event storm (docs/interactive.md, "File watch"): a room makes N files
under a watch whose client reads nothing until the storm is over; prints how long the storm
took with and without the watch, what the client then received (events, the overflow's count)
and how much the daemon's memory grew.

    /opt/sandboxd/venv/bin/python bench/watch.py [--files 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    args = ap.parse_args()
    from sandboxd.client import Client
    storm = f"cd /workspace/s && seq 1 {args.files} | xargs touch && touch END"
    with daemon() as path, Client(path) as c:
        pid = next(p.pid for p in psutil.process_iter(["cmdline"])
                   if path in " ".join(p.info["cmdline"] or []) and "sandboxd" in
                   " ".join(p.info["cmdline"] or []) and "setpriv" not in
                   " ".join(p.info["cmdline"] or []))
        sb = c.sandbox("bench-watch")
        sb.get({"limits": {"diskBytes": 4 << 30}})
        sb.exec("mkdir -p /workspace/s")
        t0 = time.perf_counter()
        assert sb.exec(storm, timeout=600).status == "OK"
        bare = time.perf_counter() - t0
        sb.exec("rm -rf /workspace/s && mkdir -p /workspace/s")
        rss0 = psutil.Process(pid).memory_info().rss
        with sb.watch("/workspace/s") as w:
            t0 = time.perf_counter()
            assert sb.exec(storm, timeout=600).status == "OK"
            watched = time.perf_counter() - t0
            peak = psutil.Process(pid).memory_info().rss - rss0
            events = dropped = 0
            while (ev := w.next(2.0)) is not None:
                events += 1
                dropped += ev.dropped if ev.event_type == "overflow" and \
                    isinstance(ev.dropped, int) else 0
        sb.destroy()
    print(table([[f"{args.files} files, no watch", f"{bare:.2f}", "", "", ""],
                 [f"{args.files} files, watched", f"{watched:.2f}", str(events), str(dropped),
                  f"{peak / (1 << 20):.1f}"]],
                ["storm", "seconds", "events sent", "dropped", "daemon RSS growth MiB"]))


if __name__ == "__main__":
    main()
