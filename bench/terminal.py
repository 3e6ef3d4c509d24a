"""Terminals (docs/interactive.md): keystroke echo round trip through ``openTerminal``, against
the same through a local pty on the host, as a ratio.

One keystroke = one byte written to the terminal (``writeTerminal``, or a write on the host
pty's master) until its echo comes back (a ``terminal.output`` notification, or a read of the
master). The program on the other side is ``cat`` under the pty's cooked mode with echo: the
line discipline echoes every byte, so the round trip measures the path, not a shell.

    /opt/sandboxd/venv/bin/python bench/terminal.py [--n 500]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pty
import select
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, pct, table


def through_daemon(path: str, n: int) -> list[float]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    f = sock.makefile("rwb")
    ids = iter(range(1, 1 << 30))

    def send(method: str, **params: object) -> int:
        rid = next(ids)
        f.write(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                            "params": params}).encode() + b"\n")
        f.flush()
        return rid

    def until(pred: object) -> dict[str, object]:
        while True:
            msg = json.loads(f.readline())
            if pred(msg):  # type: ignore[operator]
                return msg  # type: ignore[no-any-return]

    rid = send("openTerminal", sandboxId="bench-term", command="cat", args=[])
    tid = until(lambda m: m.get("id") == rid)["result"]["terminalId"]  # type: ignore[index]
    out: list[float] = []
    for i in range(n + 20):
        key = bytes([97 + i % 26])
        t0 = time.perf_counter()
        send("writeTerminal", terminalId=tid, data=base64.b64encode(key).decode())
        until(lambda m, key=key: m.get("method") == "terminal.output"
              and base64.b64decode(m["params"]["data"]) == key)  # type: ignore[index]
        if i >= 20:
            out.append((time.perf_counter() - t0) * 1000)
    send("destroy", sandboxId="bench-term")
    sock.close()
    return out


def local_pty(n: int) -> list[float]:
    pid, master = pty.fork()
    if pid == 0:
        os.execvp("cat", ["cat"])
    out: list[float] = []
    try:
        for i in range(n + 20):
            key = bytes([97 + i % 26])
            t0 = time.perf_counter()
            os.write(master, key)
            got = b""
            while key not in got:
                select.select([master], [], [])
                got += os.read(master, 1024)
            if i >= 20:
                out.append((time.perf_counter() - t0) * 1000)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(master)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    args = ap.parse_args()
    local = local_pty(args.n)
    with daemon() as path:
        room = through_daemon(path, args.n)
    rows = [[name, f"{pct(v, 50):.3f}", f"{pct(v, 95):.3f}"]
            for name, v in (("local pty", local), ("openTerminal", room))]
    rows.append(["ratio", f"{pct(room, 50) / pct(local, 50):.1f}x",
                 f"{pct(room, 95) / pct(local, 95):.1f}x"])
    print(table(rows, ["keystroke echo (ms)", "p50", "p95"]))


if __name__ == "__main__":
    main()
