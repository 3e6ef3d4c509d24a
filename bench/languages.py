"""Per language: first runCode (compile + run), cached runCode, and the same toolchain run bare
on the same tree outside any sandbox.

  first      runCode of a hello world in a fresh room: write sources, compile, run (client-side)
  cached     p50 of runCode again (the compiler is skipped), client-side round trip
  in-room    p50 of the program's own wall time in the room (the run's wallTimeMs)
  bare       p50 of the same run argv on the same tree with chroot only — no namespaces,
             cgroups, seccomp or daemon (compiled once first, like the cache)
  ratio      cached / bare and in-room / bare

    /opt/sandboxd/venv/bin/python bench/languages.py [--n 5] [--tree DIR] [--only c,go]

Run as root (it starts a daemon as the bench user and chroots for the bare runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, pct, table

from sandboxd.client import Client
from sandboxd.coderun.registry import load_registry

HARNESS = r'''
import json, os, subprocess, sys, time
spec = json.load(open(sys.argv[1]))
out = {}
for lang in spec:
    d = f"/tmp/bare/{lang['id']}"
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, lang["source"]), "w") as f:
        f.write(lang["code"])
    env = lang["env"]
    if lang["compile"]:
        t = time.perf_counter()
        c = subprocess.run(lang["compile"], cwd=d, env=env, capture_output=True)
        comp = (time.perf_counter() - t) * 1000
        if c.returncode:
            out[lang["id"]] = {"error": c.stderr.decode()[-300:]}
            continue
    else:
        comp = None
    times = []
    for _ in range(lang["n"]):
        t = time.perf_counter()
        r = subprocess.run(lang["run"], cwd=d, env=env, capture_output=True)
        times.append((time.perf_counter() - t) * 1000)
    out[lang["id"]] = {"compile": comp, "runs": times, "stdout": r.stdout.decode()}
print(json.dumps(out))
'''


def bare(tree: str, langs: list, n: int) -> dict:
    spec = [{"id": lang.id, "source": lang.source_file, "code": lang.example,
             "env": lang.env_for(f"/tmp/bare/{lang.id}"), "n": n,
             "compile": lang.compile_argv(f"/tmp/bare/{lang.id}"),
             "run": lang.run_argv(f"/tmp/bare/{lang.id}")} for lang in langs]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        Path(tmp, "harness.py").write_text(HARNESS)
        # A private mount namespace with a tmpfs on the tree's /tmp: the tree stays untouched.
        script = (f"mount -t tmpfs -o size=4g tmpfs {tree}/tmp && "
                  f"cp {tmp}/spec.json {tmp}/harness.py {tree}/tmp/ && "
                  f"mount -t proc proc {tree}/proc && "
                  f"exec chroot {tree} /usr/bin/python3 /tmp/harness.py /tmp/spec.json")
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                              script], capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(res.stderr)
        return json.loads(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--tree", default="/var/lib/sandboxd/rootfs/default")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    reg = load_registry()
    langs = [lang for lang in reg if not args.only or lang.id in args.only.split(",")]
    tree = os.path.realpath(args.tree)
    rows = []
    with daemon(tree) as sock, Client(sock, timeout=900) as c:
        measured = {}
        for lang in langs:
            sb = c.sandbox(f"bench-{lang.id}")
            # As many CPUs as the bare runs get: this measures the sandbox, not the cpus limit
            # (the JVM's JIT and GC threads feel a 1-CPU quota).
            sb.get({"limits": {"memoryBytes": 2 << 30, "pids": 512,
                               "cpus": float(os.cpu_count() or 1)}})
            t = time.perf_counter()
            first = sb.run_code(lang.id, lang.example)
            first_ms = (time.perf_counter() - t) * 1000
            cached, inroom = [], []
            for _ in range(args.n):
                t = time.perf_counter()
                r = sb.run_code(lang.id, lang.example)
                cached.append((time.perf_counter() - t) * 1000)
                inroom.append(float(r["wallTimeMs"]))
                assert r["cached"] and r["status"] == "OK", r
            comp = (first.get("compile") or {}).get("wallTimeMs")
            measured[lang.id] = (first_ms, comp, cached, inroom, first["status"])
            sb.destroy()
    bare_res = bare(tree, langs, args.n)
    for lang in langs:
        first_ms, comp, cached, inroom, status = measured[lang.id]
        b = bare_res.get(lang.id, {})
        if "runs" not in b:
            rows.append((lang.id, status, f"{first_ms:.0f}", comp or "-", f"{pct(cached, 50):.0f}",
                         f"{pct(inroom, 50):.0f}", "error", "-", "-"))
            continue
        bare_run = pct(b["runs"], 50)
        bare_comp = b["compile"]
        rows.append((lang.id, status, f"{first_ms:.0f}",
                     f"{comp} / {bare_comp:.0f}" if comp is not None else "-",
                     f"{pct(cached, 50):.1f}", f"{pct(inroom, 50):.1f}", f"{bare_run:.1f}",
                     f"{pct(cached, 50) / bare_run:.2f}x", f"{pct(inroom, 50) / bare_run:.2f}x"))
    print(f"sandboxd language bench: tree={tree}, n={args.n}; times in ms")
    print(table(rows, ("language", "status", "first", "compile room/bare", "cached",
                       "in-room", "bare", "cached/bare", "in-room/bare")))


if __name__ == "__main__":
    main()
