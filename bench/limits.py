"""Overshoot of each run limit: how far past the limit a program got before the kill landed.

For every limit, N runs (default 20) of a program that breaks it, in one warm room of a real
daemon (the machine's default cgroup backend), and per run the figure the daemon measured at the
kill against the limit:

  cpuTimeMs     busy loop, limit 200 ms      reported cpuTimeMs (cgroup, at the kill) - limit
  wallTimeMs    sleep 100, limit 200 ms      reported wallTimeMs - limit
  memoryBytes   Python hog, limit 64 MiB     memoryPeakBytes - limit (the kernel refuses the
                                             page past the limit: expect <= 0)
  outputBytes   writes 64 KiB chunks and     bytes the program got written - cap (pipe buffer +
                counts them, cap 1 MiB       reader latency until the kill)
  pids          fork bomb, limit 16          pidsPeak - limit (the kernel refuses fork: <= 0)

Prints p50 and max of the overshoot, and the verdicts seen (all should be the expected one).
Prints figures; asserts nothing.

    /opt/sandboxd/venv/bin/python bench/limits.py [--n 20]      (as root)
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, pct, table

from sandboxd.client import Client, Sandbox

MiB = 1024 * 1024
CHUNK = 64 * 1024

# Counts what it managed to write in /tmp/written (pwrite of a fixed-width number after each
# chunk), so the bytes that left the program before the kill can be read back afterwards.
WRITER = f"""
import os
fd = os.open("/tmp/written", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
buf, total = b"x" * {CHUNK}, 0
while True:
    total += os.write(1, buf)
    os.pwrite(fd, b"%20d" % total, 0)
"""
HOG = "a = []\nwhile True: a.append(bytearray(1 << 20))"
BOMB = "bomb() { bomb | bomb & }; bomb; sleep 1"


def cpu(sb: Sandbox) -> tuple[str, float]:
    r = sb.exec("while :; do :; done", limits={"cpuTimeMs": 200, "wallTimeMs": 10_000})
    return str(r.status), float(r.raw["cpuTimeMs"] - 200)


def wall(sb: Sandbox) -> tuple[str, float]:
    r = sb.exec("sleep", ["100"], limits={"wallTimeMs": 200})
    return str(r.status), float(r.raw["wallTimeMs"] - 200)


def memory(sb: Sandbox) -> tuple[str, float]:
    r = sb.exec("python3", ["-c", HOG], limits={"memoryBytes": 64 * MiB, "wallTimeMs": 30_000})
    return str(r.status), (r.raw["memoryPeakBytes"] - 64 * MiB) / 1024


def output(sb: Sandbox) -> tuple[str, float]:
    r = sb.exec("python3", ["-c", WRITER], limits={"outputBytes": MiB, "wallTimeMs": 10_000})
    written = int(sb.exec("cat", ["/tmp/written"]).stdout)
    return str(r.status), (written - MiB) / 1024


def pids(sb: Sandbox) -> tuple[str, float]:
    r = sb.exec(BOMB, limits={"pids": 16, "wallTimeMs": 10_000})
    return str(r.status), float(r.raw["pidsPeak"] - 16)


CASES: list[tuple[str, str, str, Callable[[Sandbox], tuple[str, float]]]] = [
    ("cpuTimeMs", "200 ms", "ms CPU", cpu),
    ("wallTimeMs", "200 ms", "ms", wall),
    ("memoryBytes", "64 MiB", "KiB", memory),
    ("outputBytes", "1 MiB", "KiB", output),
    ("pids", "16", "processes", pids),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    rows: list[list[Any]] = []
    with daemon() as sock, Client(sock) as c:
        backend = c.ping()["capabilities"]["cgroup"]["backend"]
        sb = c.sandbox("bench-limits")
        sb.exec("true")
        for name, limit, unit, fn in CASES:
            t = time.perf_counter()
            seen: collections.Counter[str] = collections.Counter()
            over: list[float] = []
            for _ in range(args.n):
                status, value = fn(sb)
                seen[status] += 1
                over.append(value)
            rows.append([name, limit, unit, f"{pct(over, 50):.1f}", f"{max(over):.1f}",
                         f"{min(over):.1f}", " ".join(f"{k}x{v}" for k, v in seen.items()),
                         f"{time.perf_counter() - t:.1f} s"])
        sb.destroy()
    print(f"limit overshoot at the kill, {args.n} runs each, cgroup backend {backend}")
    print(table(rows, ["limit", "value", "unit", "p50", "max", "min", "verdicts", "took"]))


if __name__ == "__main__":
    main()
