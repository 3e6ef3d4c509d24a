"""Anchors for the exec path (issue 18): one interleaved run of bare spawn, a fresh
``bwrap --unshare-all`` sandbox per run, ``unshare`` of every namespace (the fresh-sandbox floor),
and sandboxd exec in a warm room — ``/bin/true`` and ``python3 -c pass``, dense (back to back)
and sparse (a 50 ms pause before each run), sandboxd also with run limits (memory, pids, cpu
time) — plus ``/bin/true`` throughput at 1, 2 and 8 clients. Prints p50/p95 (ms) and every
ratio to bare and to bwrap. Installs bubblewrap when it is missing (Debian: apt-get).

Interleaved: each round runs every contender once, in a rotating order, so a slow phase of the
machine falls on all of them alike. The sandboxes run as the bench's unprivileged user, as the
daemon does.

    /opt/sandboxd/venv/bin/python bench/anchors.py [--n 200] [--rootfs host|DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, ensure_user, pct, table

from sandboxd.client import Client

LIMITS = {"memoryBytes": 256 << 20, "pids": 64, "cpuTimeMs": 10_000}
# (/usr/bin/python3: root's python3 may be a pyenv shim that costs 160 ms a start)
PROGRAMS = {"true": ["/bin/true"], "python": ["/usr/bin/python3", "-c", "pass"]}


def ensure_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "bubblewrap"], check=True,
                       capture_output=True)
        path = shutil.which("bwrap")
    assert path is not None, "bubblewrap could not be installed"
    return path


def as_user(argv: list[str]) -> list[str]:
    u = ensure_user()
    return ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups", "--",
            *argv]


def spawner(argv: list[str]) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    return run


def contenders(c: Client, bwrap: str) -> dict[str, dict[str, Callable[[], None]]]:
    sb = c.sandbox("bench-anchor")
    sb.exec("true")
    out: dict[str, dict[str, Callable[[], None]]] = {}
    for prog, argv in PROGRAMS.items():
        # setpriv is part of every host-side contender's cost but bare's: bare is the floor
        out[prog] = {
            "bare": spawner(argv),
            "bwrap": spawner(as_user([bwrap, "--unshare-all", "--die-with-parent",
                                      "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin",
                                      "/bin", "--symlink", "usr/lib", "/lib", "--symlink",
                                      "usr/lib64", "/lib64", "--proc", "/proc", "--dev",
                                      "/dev", *argv])),
            "unshare": spawner(as_user(["unshare", "-Urnpimu", "--fork", *argv])),
            "sandboxd": lambda argv=argv: sb.exec(argv[0], argv[1:]),
            "sandboxd+limits": lambda argv=argv: sb.exec(argv[0], argv[1:], limits=LIMITS),
        }
    return out


def interleaved(fns: dict[str, Callable[[], None]], n: int,
                gap_s: float) -> dict[str, list[float]]:
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for fn in fns.values():
        fn()  # warm
    for i in range(n):
        for k in names[i % len(names):] + names[:i % len(names)]:
            if gap_s:
                time.sleep(gap_s)
            t = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t) * 1000)
    return times


def throughput(make: Callable[[], Callable[[], None]], clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        fn = make()
        while time.monotonic() < stop:
            fn()
            done[i] += 1
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rootfs", default="host")
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    bwrap = ensure_bwrap()
    rows = []
    with daemon(args.rootfs) as path, Client(path) as c:
        for prog, fns in contenders(c, bwrap).items():
            for mode, gap in (("dense", 0.0), ("sparse", 0.05)):
                t = interleaved(fns, args.n, gap)
                b50, w50 = pct(t["bare"], 50), pct(t["bwrap"], 50)
                for name, v in t.items():
                    rows.append([f"{prog} {mode}", name, f"{pct(v, 50):.2f}", f"{pct(v, 95):.2f}",
                                 f"{pct(v, 50) / b50:.2f}x", f"{pct(v, 50) / w50:.2f}x"])
        tput = []
        for clients in (1, 2, 8):
            bare_r = throughput(lambda: spawner(["/bin/true"]), clients, args.seconds)

            def room_fn(clients: int = clients) -> Callable[[], None]:
                cl = Client(path)
                sb = cl.sandbox("bench-anchor")
                return lambda: sb.exec("/bin/true", [])
            room_r = throughput(room_fn, clients, args.seconds)
            bw_r = throughput(lambda: spawner(as_user([bwrap, "--unshare-all", "--ro-bind",
                                                       "/", "/", "/bin/true"])),
                              clients, args.seconds)
            tput.append([str(clients), f"{bare_r:.0f}", f"{bw_r:.0f}", f"{room_r:.0f}",
                         f"{room_r / bare_r:.2f}x", f"{bw_r / bare_r:.2f}x"])
        c.sandbox("bench-anchor").destroy()
    print(table(rows, ["program", "contender", "p50 ms", "p95 ms", "x bare", "x bwrap"]))
    print()
    print(table(tput, ["clients", "bare /s", "bwrap /s", "sandboxd /s", "sandboxd x bare",
                       "bwrap x bare"]))


if __name__ == "__main__":
    main()
