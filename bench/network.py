"""Egress (docs/network.md): connection latency and throughput through a room's forwarder,
against the same client on the host talking to the same server directly, as ratios; and the
cost of the policy check per connection (the decision and the ClientHello parse, in-process).

The server is this script's own, on the host's 127.0.0.1; the room reaches it as
``bench.test`` (pinned by ``hosts``). A round trip = connect, send a line, read the reply (the
client speaks first, as HTTP and TLS do, so the forwarder never waits for a silent client).

    /opt/sandboxd/venv/bin/python bench/network.py [--n 300] [--mib 256]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, pct, table

CLIENT = r"""
import json, socket, sys, time
host, port, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rtt = []
for i in range(n + 20):
    t0 = time.perf_counter()
    s = socket.create_connection((host, port))
    s.sendall(b"ping\n")
    assert s.recv(16) == b"pong\n"
    s.close()
    if i >= 20:
        rtt.append((time.perf_counter() - t0) * 1000)
s = socket.create_connection((host, port))
s.sendall(b"bulk %d\n" % mib)
t0 = time.perf_counter()
got = 0
while True:
    d = s.recv(1 << 20)
    if not d:
        break
    got += len(d)
took = time.perf_counter() - t0
print(json.dumps({"rtt": rtt, "mib_s": got / took / (1 << 20), "bytes": got}))
"""


def serve(ls: socket.socket) -> None:
    chunk = b"x" * (1 << 20)
    while True:
        try:
            c, _ = ls.accept()
        except OSError:
            return

        def one(c: socket.socket) -> None:
            with c:
                line = c.recv(64)
                if line.startswith(b"ping"):
                    c.sendall(b"pong\n")
                elif line.startswith(b"bulk"):
                    for _ in range(int(line.split()[1])):
                        c.sendall(chunk)
        threading.Thread(target=one, args=(c,), daemon=True).start()


def check_cost(n: int) -> tuple[float, float]:
    """µs per connection: the policy decision, and the ClientHello parse."""
    from sandboxd import netpolicy, sniff
    from sandboxd.protocol import NetworkOptions
    pol = netpolicy.parse(NetworkOptions(allow=[f"h{i}.example.org:443" for i in range(50)]
                                         + ["*.pythonhosted.org:443", "10.0.0.0/8"]))
    addr = ipaddress.ip_address("93.184.216.34")
    t0 = time.perf_counter()
    for _ in range(n):
        pol.decide("files.pythonhosted.org", addr, 443)
    decide = (time.perf_counter() - t0) / n * 1e6
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(inc, out, server_hostname="files.example.org")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    t0 = time.perf_counter()
    for _ in range(n):
        sniff.first_name(hello)
    return decide, (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--mib", type=int, default=256)
    args = ap.parse_args()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(256)
    port = ls.getsockname()[1]
    threading.Thread(target=serve, args=(ls,), daemon=True).start()
    direct = json.loads(subprocess.run(
        [sys.executable, "-c", CLIENT, "127.0.0.1", str(port), str(args.n), str(args.mib)],
        check=True, capture_output=True, text=True).stdout)
    from sandboxd.client import Client
    with daemon() as path, Client(path) as c:
        sb = c.sandbox("bench-net")
        sb.get({"network": {"allow": [f"bench.test:{port}", "127.0.0.1"],
                            "hosts": {"bench.test": "127.0.0.1"}}})
        r = sb.exec("python3", ["-c", CLIENT, "bench.test", str(port), str(args.n),
                                str(args.mib)], timeout=600)
        assert r.status == "OK", r.raw
        room = json.loads(r.stdout)
        sb.destroy()
    decide_us, parse_us = check_cost(100_000)
    rows = [["host, direct", f"{pct(direct['rtt'], 50):.3f}", f"{pct(direct['rtt'], 95):.3f}",
             f"{direct['mib_s']:.0f}"],
            ["room, through egress", f"{pct(room['rtt'], 50):.3f}", f"{pct(room['rtt'], 95):.3f}",
             f"{room['mib_s']:.0f}"],
            ["ratio", f"{pct(room['rtt'], 50) / pct(direct['rtt'], 50):.1f}x",
             f"{pct(room['rtt'], 95) / pct(direct['rtt'], 95):.1f}x",
             f"{room['mib_s'] / direct['mib_s']:.2f}x"]]
    print(table(rows, ["connect+request+reply (ms) / bulk", "p50", "p95", "MiB/s"]))
    print(f"policy check per connection: decide {decide_us:.2f} µs (52 entries), "
          f"ClientHello SNI parse {parse_us:.2f} µs")


if __name__ == "__main__":
    main()
