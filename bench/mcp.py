"""sandboxctl mcp (docs/mcp.md): the overhead of one ``run_code`` Python hello world through MCP
over stdio (the SDK's own client, ``sandboxctl mcp`` spawned as an agent would) against the same
``runCode`` on the daemon's socket, N runs each, medians and the ratio.

Two pairs: in a fresh room per call (MCP's ``run_code`` without ``room``: getSandbox-on-first-use,
runCode, destroy; the socket side does the same two calls), and in one warm room (``room``
given: MCP adds its check that the room exists, a listSandboxes). The MCP side adds: the
JSON-RPC framing of MCP, pydantic validation in the SDK, the schema check, and a second process
hop (client -> sandboxctl mcp -> daemon). Starting the server (spawn + initialize) is timed once,
apart: an agent pays it once per session.

    /opt/sandboxd/venv/bin/python bench/mcp.py [--n 30] [--rootfs host|DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

# This file is bench/mcp.py, and python puts bench/ first on sys.path: `import mcp` would be
# this very file. Import the SDK with bench/ out of the path, then put it back for common.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
import mcp  # noqa: E402

sys.path.insert(0, str(HERE))

from common import BIN, daemon, pct, table  # noqa: E402

from sandboxd.client import AsyncClient  # noqa: E402

HELLO = "print('hello, world')"


async def socket_side(sock: str, n: int, room: str | None) -> list[float]:
    out = []
    async with AsyncClient(sock) as c:
        await c.ping()
        for _ in range(n):
            rid = room or "bench-" + secrets.token_hex(6)
            t = time.perf_counter()
            res = await c.call("runCode", {"sandboxId": rid, "language": "python",
                                           "code": HELLO})
            if room is None:
                await c.call("destroy", {"sandboxId": rid})
            out.append((time.perf_counter() - t) * 1000)
            assert res["stdout"] == "hello, world\n", res
    return out


async def mcp_side(sock: str, n: int, room: str | None) -> tuple[list[float], float]:
    params = mcp.StdioServerParameters(command=str(BIN / "sandboxctl"),
                                       args=["mcp", "--socket", sock])
    t0 = time.perf_counter()
    out = []
    async with mcp.stdio_client(params) as (read, write), \
            mcp.ClientSession(read, write) as s:
        await s.initialize()
        started = (time.perf_counter() - t0) * 1000
        args = {"language": "python", "code": HELLO, **({"room": room} if room else {})}
        if room:
            await s.call_tool("create_room", {"room": room})
        for _ in range(n):
            t = time.perf_counter()
            res = await s.call_tool("run_code", args)
            out.append((time.perf_counter() - t) * 1000)
            got = json.loads(res.content[0].text)
            assert not res.is_error and got["stdout"] == "hello, world\n", got
    return out, started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--rootfs", default="host")
    a = ap.parse_args()
    with daemon(a.rootfs) as sock:
        rows = []
        for label, room in (("fresh room per call", None), ("warm room", "bench-warm")):
            asyncio.run(socket_side(sock, 3, room))  # warm the compile cache and the room
            sk = asyncio.run(socket_side(sock, a.n, room))
            mc, started = asyncio.run(mcp_side(sock, a.n, room))
            ms, mm = statistics.median(sk), statistics.median(mc)
            rows.append((label, f"{ms:.2f}", f"{pct(sk, 95):.2f}", f"{mm:.2f}",
                         f"{pct(mc, 95):.2f}", f"+{mm - ms:.2f}", f"{mm / ms:.2f}x"))
        print(f"run_code python hello world, n={a.n} each, ms "
              f"(sandboxctl mcp start + initialize: {started:.0f} ms)")
        print(table(rows, ["what", "socket p50", "socket p95", "mcp p50", "mcp p95",
                           "overhead p50", "ratio p50"]))


if __name__ == "__main__":
    main()
