"""Exposed ports (docs/ports.md): throughput and connection latency through ``exposePort``,
against a direct loopback connection on the host to the same server, in one run.

One server script serves both sides: in a room (started by an exec on its own connection, kept
running for the bench) behind ``exposePort``, and bare on the host's 127.0.0.1. Per connection
it reads one command byte: ``d`` sends ``--mib`` MiB and closes (throughput, the client reads
until EOF); ``e`` echoes one byte and closes (latency: connect + one round trip + close). The
exposed path adds, per connection, the daemon's accept, a Connect to the room init (which
connects inside the room and passes the socket back) and the daemon's splice of every byte.

    /opt/sandboxd/venv/bin/python bench/processes.py [--n 200] [--mib 256] [--rootfs host|DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, pct, table

from sandboxd.client import Client

SERVER = """\
import asyncio, sys
MIB = int(sys.argv[2])
BLOCK = bytes(1 << 20)
async def serve(r, w):
    cmd = await r.read(1)
    if cmd == b"d":
        for _ in range(MIB):
            w.write(BLOCK)
            await w.drain()
    elif cmd == b"e":
        w.write(b"e")
        await w.drain()
    w.close()
async def main():
    srv = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=256)
    await srv.serve_forever()
asyncio.run(main())
"""
ROOM_PORT = 8080


def throughput(port: int, mib: int, rounds: int) -> float:
    """Best MiB/s of ``rounds`` downloads of ``mib`` MiB."""
    best = 0.0
    buf = bytearray(1 << 20)
    for _ in range(rounds):
        with socket.create_connection(("127.0.0.1", port)) as c:
            t = time.perf_counter()
            c.sendall(b"d")
            n = 0
            while got := c.recv_into(buf):
                n += got
            dt = time.perf_counter() - t
        assert n == mib << 20, n
        best = max(best, mib / dt)
    return best


def latency(port: int, n: int) -> list[float]:
    """ms of connect + one-byte round trip + close."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"e")
            assert c.recv(1) == b"e"
        out.append((time.perf_counter() - t) * 1000)
    return out


def wait_listening(port: int) -> None:
    for _ in range(200):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="connections for the latency figures")
    ap.add_argument("--mib", type=int, default=256, help="MiB per throughput round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rootfs", default="host")
    args = ap.parse_args()
    with daemon(args.rootfs) as sock, Client(sock) as c, tempfile.TemporaryDirectory() as tmp:
        sb = c.sandbox("bench")
        sb.write_file("/workspace/server.py", SERVER)

        def room_server() -> None:
            with contextlib.suppress(Exception), Client(sock) as own:
                own.sandbox("bench").exec(
                    f"exec timeout 600 python3 /workspace/server.py {ROOM_PORT} {args.mib}")

        threading.Thread(target=room_server, daemon=True).start()
        sb.wait_for_port(ROOM_PORT, timeout=30)
        exposed = int(sb.expose_port(ROOM_PORT).url.rsplit(":", 1)[1])
        script = Path(tmp, "server.py")
        script.write_text(SERVER)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            direct = probe.getsockname()[1]
        host = subprocess.Popen([sys.executable, str(script), str(direct), str(args.mib)])
        try:
            wait_listening(direct)
            latency(exposed, 20)  # warm both
            latency(direct, 20)
            tp_room = throughput(exposed, args.mib, args.rounds)
            tp_host = throughput(direct, args.mib, args.rounds)
            lat_room = latency(exposed, args.n)
            lat_host = latency(direct, args.n)
        finally:
            host.terminate()
            host.wait(10)
        sb.destroy()
    rows = [(f"throughput (MiB/s, best of {args.rounds} x {args.mib} MiB)",
             f"{tp_room:.0f}", f"{tp_host:.0f}", f"{tp_room / tp_host:.2f}x"),
            ("connect+RTT+close p50 (ms)", f"{pct(lat_room, 50):.3f}",
             f"{pct(lat_host, 50):.3f}", f"{pct(lat_room, 50) / pct(lat_host, 50):.2f}x"),
            ("connect+RTT+close p95 (ms)", f"{pct(lat_room, 95):.3f}",
             f"{pct(lat_host, 95):.3f}", f"{pct(lat_room, 95) / pct(lat_host, 95):.2f}x")]
    print(f"sandboxd exposed-port bench: n={args.n}, rootfs={args.rootfs}")
    print(table(rows, ("what", "exposed port", "direct loopback", "ratio")))


if __name__ == "__main__":
    main()
