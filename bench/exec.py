"""Exec overhead and room creation, against bare execution on the host.

Prints p50/p95 (ms) of:
  - `exec /bin/true` and `exec python3 -c pass` in a warm room, round trip through the socket
    (client -> daemon -> room init -> fork/exec -> exit -> verdict -> client), vs the same
    commands run bare on the host by subprocess (fork + exec + wait, pipes for stdio);
  - room creation (getSandbox of a new id: cgroup, zygote fork, namespaces, mounts, ready) and
    destruction.
Design targets (issue 2): warm-room exec overhead < 5 ms p50 over bare; creation < 100 ms p50.

    /opt/sandboxd/venv/bin/python bench/exec.py [--n 200] [--rootfs host|DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bare, daemon, pct, table

from sandboxd.client import Client


def timed(fn: object, n: int, gap_ms: float = 0) -> list[float]:
    out = []
    for _ in range(n):
        if gap_ms:
            time.sleep(gap_ms / 1000)
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rootfs", default="host")
    ap.add_argument("--gap-ms", type=float, default=100.0,
                    help="pause before each 'sparse' exec: real clients are not back to back, "
                         "and some kernel costs (cgroup migration) only show then")
    args = ap.parse_args()
    n = args.n
    with daemon(args.rootfs) as sock, Client(sock) as c:
        sb = c.sandbox("bench")
        sb.exec("true", [])  # warm: the room exists
        rows = []
        for label, argv in (("/bin/true", ["/bin/true"]),
                            ("python3 -c pass", ["/usr/bin/python3", "-c", "pass"])):
            for _ in range(10):
                sb.exec(argv[0], argv[1:])
            host = bare(argv, n)
            for mode, gap in (("back to back", 0.0), (f"sparse, {args.gap_ms:g} ms gaps",
                                                      args.gap_ms)):
                room = timed(lambda argv=argv: sb.exec(argv[0], argv[1:]),
                             n if not gap else max(20, n // 5), gap)
                rows.append((f"exec {label} ({mode})", f"{pct(room, 50):.2f}",
                             f"{pct(room, 95):.2f}", f"{pct(host, 50):.2f}",
                             f"{pct(host, 95):.2f}", f"{pct(room, 50) - pct(host, 50):+.2f}",
                             f"{pct(room, 50) / pct(host, 50):.2f}x"))
        create, destroy = [], []
        for i in range(max(20, n // 5)):
            t = time.perf_counter()
            c.sandbox(f"create-{i}").get()
            create.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            c.sandbox(f"create-{i}").destroy()
            destroy.append((time.perf_counter() - t) * 1000)
        rows.append(("room create", f"{pct(create, 50):.2f}", f"{pct(create, 95):.2f}",
                     "-", "-", "-", "-"))
        rows.append(("room destroy", f"{pct(destroy, 50):.2f}", f"{pct(destroy, 95):.2f}",
                     "-", "-", "-", "-"))
        ping = timed(lambda: c.ping(), n)
        rows.append(("ping (socket RTT)", f"{pct(ping, 50):.2f}", f"{pct(ping, 95):.2f}",
                     "-", "-", "-", "-"))
        sb.destroy()
    print(f"sandboxd exec bench: n={n}, rootfs={args.rootfs}; times in ms")
    print(table(rows, ("what", "room p50", "room p95", "bare p50", "bare p95",
                       "overhead p50", "ratio p50")))


if __name__ == "__main__":
    main()
