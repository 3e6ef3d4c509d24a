"""Neighbour latency under an attack: how long a well-behaved room's exec takes while another
room of the same daemon forkbombs or hogs memory (issue 24: these figures left the security
tier's assertions, where a timed bound flakes on a loaded 2-core machine).

One real daemon (the machine's default cgroup backend), two rooms. For each scenario, the
neighbour runs ``echo ok`` N times (default 30) back to back on its own connection while the
attacker's run lasts; p50/p95/max of the neighbour's round trip are printed, and for reference
the same with no attack.

  idle          no attacker
  forkbomb      bash fork bomb, room pids 64, run wall time 6 s
  memory-hog    Python appending 1 MiB buffers, room memory 128 MiB (OOM-killed: the room goes on)
  cpu-burn      busy loop, run wall time 6 s (the room's cpus limit is 1)

Prints figures; asserts nothing.

    /opt/sandboxd/venv/bin/python bench/neighbours.py [--n 30]      (as root)
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, pct, table

from sandboxd.client import Client

MiB = 1024 * 1024

ATTACKS: dict[str, tuple[dict[str, Any], str, dict[str, Any]] | None] = {
    "idle": None,
    "forkbomb": ({"pids": 64}, "bomb() { bomb | bomb & }; bomb; sleep 100",
                 {"wallTimeMs": 6000}),
    "memory-hog": ({"memoryBytes": 128 * MiB},
                   "python3 -c 'a = []\nwhile True: a.append(bytearray(1 << 20))'",
                   {"wallTimeMs": 6000}),
    "cpu-burn": ({"cpus": 1.0}, "while :; do :; done", {"wallTimeMs": 6000}),
}


def neighbour_samples(sock: str, room: str, n: int, stop: threading.Event) -> list[float]:
    out: list[float] = []
    with Client(sock, timeout=120) as c:
        sb = c.sandbox(room)
        sb.exec("true")
        while len(out) < n and not stop.is_set():
            t0 = time.perf_counter()
            sb.exec("echo ok")
            out.append((time.perf_counter() - t0) * 1000)
    return out


def scenario(sock: str, name: str, n: int) -> list[object]:
    spec = ATTACKS[name]
    stop = threading.Event()
    result: dict[str, Any] = {}
    attacker = f"bench-att-{name}"
    if spec is not None:
        room_limits, command, run_limits = spec
        with Client(sock, timeout=120) as c:
            c.sandbox(attacker).get({"limits": room_limits})

        def attack() -> None:
            with Client(sock, timeout=120) as c:
                while not stop.is_set():  # again, should it end before the samples do
                    r = c.sandbox(attacker).exec(command, limits=run_limits)
                    result["status"] = r.status

        t = threading.Thread(target=attack, daemon=True)
        t.start()
        time.sleep(0.5)  # (a bench: let the attack get going; no test waits like this)
    samples = neighbour_samples(sock, f"bench-nb-{name}", n, threading.Event())
    stop.set()
    if spec is not None:
        t.join(60)
        with Client(sock, timeout=120) as c:
            c.sandbox(attacker).destroy()
    with Client(sock, timeout=120) as c:
        c.sandbox(f"bench-nb-{name}").destroy()
    return [name, len(samples), f"{pct(samples, 50):.1f}", f"{pct(samples, 95):.1f}",
            f"{max(samples):.1f}", result.get("status", "-")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--only", nargs="*", choices=sorted(ATTACKS))
    args = ap.parse_args()
    rows = []
    with daemon() as sock:
        for name in args.only or list(ATTACKS):
            rows.append(scenario(sock, name, args.n))
            print(f"  {name}: done", file=sys.stderr, flush=True)
    print(table(rows, ["attack", "n", "p50 ms", "p95 ms", "max ms", "attacker verdict"]))


if __name__ == "__main__":
    main()
