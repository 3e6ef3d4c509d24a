"""The TypeScript client's `exec('true')` round trip against the Python client's, in one run.

One daemon, one warm room, one connection per client; rounds alternate (Python, TypeScript,
Python, ...) so that a drift of the machine hits both. Each sample is one sequential call:
client -> socket -> daemon -> room init -> fork/exec `true` -> verdict -> client. Prints p50/p95
(ms) per client and the ratio of the medians (TypeScript / Python).

Needs node (scripts/node.sh) and npm's registry once (npm ci of clients/typescript).

    /opt/sandboxd/venv/bin/python bench/ts_client.py [--n 200] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, pct, table

from sandboxd.client import Client

TOP = Path(__file__).resolve().parents[1]
NODE_BIN = Path(os.environ.get("SANDBOXD_NODE_BIN", "/opt/sandboxd/node/bin"))
NPM_CACHE = os.environ.get("SANDBOXD_NPM_CACHE", "/var/cache/sandboxd-npm")

# Reads "n" lines on stdin; for each, times n sequential exec('true') and prints the ms as JSON.
DRIVER = """
import { createInterface } from "node:readline";
import { SandboxdClient, getSandbox } from "./dist/src/index.js";
const client = new SandboxdClient(process.argv[2]);
const sb = getSandbox(client, process.argv[3]);
for (let i = 0; i < 20; i++) await sb.exec("true");
process.stdout.write("ready\\n");
for await (const line of createInterface({ input: process.stdin })) {
  const n = Number(line), out = [];
  for (let i = 0; i < n; i++) {
    const t = process.hrtime.bigint();
    const r = await sb.exec("true");
    out.push(Number(process.hrtime.bigint() - t) / 1e6);
    if (r.exitCode !== 0) throw new Error(JSON.stringify(r));
  }
  process.stdout.write(JSON.stringify(out) + "\\n");
}
client.close();
"""


def build(dest: Path) -> None:
    shutil.copytree(TOP / "clients" / "typescript", dest,
                    ignore=shutil.ignore_patterns("node_modules", "dist"))
    env = {**os.environ, "PATH": f"{NODE_BIN}:{os.environ.get('PATH', '')}"}
    subprocess.run([str(NODE_BIN / "npm"), "ci", "--no-audit", "--no-fund", "--cache",
                    NPM_CACHE], cwd=dest, env=env, check=True, capture_output=True)
    subprocess.run([str(NODE_BIN / "node"), "node_modules/typescript/bin/tsc", "-p", "."],
                   cwd=dest, env=env, check=True, capture_output=True)
    (dest / "bench.mjs").write_text(DRIVER)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200, help="calls per round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per client, alternating")
    ap.add_argument("--rootfs", default="host")
    args = ap.parse_args()
    if not (NODE_BIN / "node").exists():
        sys.exit(f"no node at {NODE_BIN} (scripts/node.sh)")
    work = Path(tempfile.mkdtemp(prefix="sandboxd-bench-ts-"))
    try:
        build(work / "ts")
        py_ms: list[float] = []
        ts_ms: list[float] = []
        with daemon(args.rootfs) as sock, Client(sock) as c:
            sb = c.sandbox("bench-ts")
            for _ in range(20):
                sb.exec("true")
            node = subprocess.Popen([str(NODE_BIN / "node"), "bench.mjs", sock, "bench-ts"],
                                    cwd=work / "ts", stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert node.stdin is not None and node.stdout is not None
            assert node.stdout.readline().strip() == "ready"
            for _ in range(args.rounds):
                for _ in range(args.n):
                    t = time.perf_counter()
                    r = sb.exec("true")
                    py_ms.append((time.perf_counter() - t) * 1000)
                    assert r.exit_code == 0
                node.stdin.write(f"{args.n}\n")
                node.stdin.flush()
                ts_ms.extend(json.loads(node.stdout.readline()))
            node.stdin.close()
            node.wait(30)
            sb.destroy()
        node_version = subprocess.run([str(NODE_BIN / "node"), "--version"], capture_output=True,
                                      text=True, check=True).stdout.strip()
        print(f"exec('true') round trip, {args.rounds} x {args.n} calls per client, "
              f"alternating rounds, one warm room (rootfs {args.rootfs}); node {node_version}, "
              f"python {sys.version.split()[0]}")
        rows: list[list[str]] = []
        for name, ms in (("python (sandboxd.Client)", py_ms),
                         ("typescript (@sandboxd/client)", ts_ms)):
            rows.append([name, f"{pct(ms, 50):.2f}", f"{pct(ms, 95):.2f}",
                         f"{statistics.fmean(ms):.2f}"])
        print(table(rows, ["client", "p50 ms", "p95 ms", "mean ms"]))
        print(f"ratio of medians (typescript / python): {pct(ts_ms, 50) / pct(py_ms, 50):.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
