"""Shared bench plumbing: a real sandboxd as an unprivileged user, percentiles, tables.

Benchmarks print figures; they never assert on time. Run them as root (they create the user and
delegate cgroups exactly like the integration tests do), from the checkout:

    /opt/sandboxd/venv/bin/python bench/exec.py
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
USER = os.environ.get("SANDBOXD_BENCH_USER", "sbxtest")


def ensure_user(name: str = USER) -> pwd.struct_passwd:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", name], check=True)
    subprocess.run([str(BIN / "sandboxctl"), "setup", "--user", name], check=True,
                   capture_output=True)
    return pwd.getpwnam(name)


@contextmanager
def daemon(rootfs: str = "host", extra: Sequence[str] = ()) -> Iterator[str]:
    """Start sandboxd as the bench user; yield its socket path; stop it."""
    if os.geteuid() != 0:
        sys.exit("run benchmarks as root: they set up an unprivileged user like the tests do")
    user = ensure_user()
    base = tempfile.mkdtemp(prefix="sandboxd-bench-", dir="/tmp")  # reachable by the daemon
    os.chmod(base, 0o755)
    os.chown(base, user.pw_uid, user.pw_gid)
    sock = f"{base}/run/sandboxd.sock"
    argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            "--", "env", "-i", f"HOME={user.pw_dir}", "PATH=/usr/bin:/bin",
            str(BIN / "sandboxd"), "--socket", sock, "--state-dir", f"{base}/state",
            "--rootfs", rootfs, "--log-level", "warning", *extra]
    log = open(f"{base}/log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    from sandboxd.client import Client

    try:
        for _ in range(400):
            if os.path.exists(sock):
                try:
                    with Client(sock) as c:
                        c.ping()
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            time.sleep(0.05)
        else:
            raise RuntimeError(Path(f"{base}/log").read_text())
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def pct(values: Sequence[float], p: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bare(argv: Sequence[str], n: int) -> list[float]:
    """Wall times (ms) of running argv directly on the host, fork+exec+wait like the daemon."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                       check=False)
        out.append((time.perf_counter() - t) * 1000)
    return out
