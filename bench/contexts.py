"""Code contexts (docs/contexts.md): the round trip of one trivial cell (``1+1``) per language,
p50/p95, and the cost of starting a context, through the daemon against the same driver run
bare on the host.

Bare = sandboxd's own driver (sandboxd/contexts/driver_py.py: ipykernel through jupyter_client;
driver_js.js: node) started directly on the host and spoken to over its pipes, with no daemon,
room, cgroup or JSON-RPC: so the ratio is what sandboxd adds, not what Jupyter or node cost.
Through the daemon = createCodeContext then runInContext over the socket (sandboxd.client),
in a room over the host tree.

    /opt/sandboxd/venv/bin/python bench/contexts.py [--n 200] [--starts 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import daemon, pct, table

from sandboxd import contexts
from sandboxd.client import Client

LANGS = ("python", "javascript", "typescript")
WARMUP = 10


def _bare_proc(lang: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(contexts.driver_argv(lang), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/tmp")


def bare(lang: str, n: int, starts: int) -> tuple[list[float], list[float]]:
    start_ms: list[float] = []
    cells: list[float] = []
    for s in range(starts):
        t0 = time.perf_counter()
        p = _bare_proc(lang)
        assert p.stdout is not None and p.stdin is not None
        assert json.loads(p.stdout.readline())["ev"] == "ready"
        start_ms.append((time.perf_counter() - t0) * 1000)
        if s == 0:
            for i in range(n + WARMUP):
                t = time.perf_counter()
                p.stdin.write(json.dumps({"op": "run", "id": i, "code": "1+1"}).encode()
                              + b"\n")
                p.stdin.flush()
                while json.loads(p.stdout.readline())["ev"] != "done":
                    pass
                if i >= WARMUP:
                    cells.append((time.perf_counter() - t) * 1000)
        p.stdin.close()
        p.wait(30)
    return start_ms, cells


def through_daemon(path: str, lang: str, n: int, starts: int) -> tuple[list[float], list[float]]:
    start_ms: list[float] = []
    cells: list[float] = []
    with Client(path, timeout=120) as c:
        sb = c.sandbox(f"bench-ctx-{lang}")
        for s in range(starts):
            t0 = time.perf_counter()
            cid = sb.create_code_context(lang).context_id
            start_ms.append((time.perf_counter() - t0) * 1000)
            if s == 0:
                for i in range(n + WARMUP):
                    t = time.perf_counter()
                    r = sb.run_in_context(cid, "1+1")
                    assert r.results[0]["text/plain"] == "2", r.raw
                    if i >= WARMUP:
                        cells.append((time.perf_counter() - t) * 1000)
            sb.delete_code_context(cid)
        sb.destroy()
    return start_ms, cells


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--lang", action="append", choices=LANGS)
    args = ap.parse_args()
    langs = args.lang or list(LANGS)
    local = {lang: bare(lang, args.n, args.starts) for lang in langs}
    with daemon() as path:
        room = {lang: through_daemon(path, lang, args.n, args.starts) for lang in langs}
    rows = []
    for lang in langs:
        for what, k in (("1+1 cell", 1), ("start", 0)):
            b, d = local[lang][k], room[lang][k]
            rows.append([lang, what, f"{pct(b, 50):.2f}", f"{pct(b, 95):.2f}",
                         f"{pct(d, 50):.2f}", f"{pct(d, 95):.2f}",
                         f"{pct(d, 50) / pct(b, 50):.2f}x"])
    print(table(rows, ["language", "ms", "bare p50", "bare p95", "sandboxd p50",
                       "sandboxd p95", "p50 ratio"]))


if __name__ == "__main__":
    main()
