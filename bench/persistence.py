"""Persistence (docs/persistence.md): backup, restore, fork and export time and size for a
100 MiB workspace of many small files and for one of a few large ones, against ``tar`` +
``gzip -1`` of the same files on the host, as ratios; and the pause a running process sees
while a backup of its room is taken (its cgroup is frozen for the copy).

The host anchor makes the same file set on the host's tmpfs-less /tmp (page cache: warm) and
times ``tar -cf - | gzip -1 > f`` and ``gzip -dc f | tar -xf -`` in a fresh directory.

    /opt/sandboxd/venv/bin/python bench/persistence.py [--rounds 5] [--rootfs host|DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import daemon, table

from sandboxd.client import Client

MiB = 1024 * 1024
# Half random (incompressible), half text-like, as a real workspace is.
MAKE = {
    "small": ("python3 - <<'EOF'\n"
              "import os\n"
              "for d in range(100):\n"
              "    os.makedirs(f'/workspace/w/d{d}', exist_ok=True)\n"
              "    for i in range(100):\n"
              "        with open(f'/workspace/w/d{d}/f{i}.txt', 'wb') as f:\n"
              "            f.write(os.urandom(5000) + (b'line of text %d\\n' % i) * 320)\n"
              "EOF"),
    "large": ("mkdir -p /workspace/w && for i in 1 2 3 4; do head -c 13107200 /dev/urandom "
              "> /workspace/w/r$i; yes 'a line of a log file' | head -c 13107200 "
              "> /workspace/w/t$i; done"),
}
# A writer that records the longest gap between its ticks (what a freeze looks like to it).
TICKER = ("import time\n"
          "last = time.monotonic(); worst = 0.0\n"
          "while True:\n"
          "    time.sleep(0.001); now = time.monotonic(); worst = max(worst, now - last); "
          "last = now\n"
          "    open('/tmp/worst', 'w').write(f'{worst * 1000:.1f}')\n")


def timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - t) * 1000


def host_anchor(sb: object, rounds: int) -> tuple[float, float, int]:
    """The same files, exported once, unpacked on the host, then tar+gzip and back there."""
    base = tempfile.mkdtemp(prefix="sbx-bench-persist-")
    try:
        buf = io.BytesIO()
        sb.export(buf, "/workspace/w")  # type: ignore[attr-defined]
        src = os.path.join(base, "src")
        os.makedirs(src)
        subprocess.run(["tar", "-xzf", "-", "-C", src], input=buf.getvalue(), check=True)
        arc = os.path.join(base, "a.tgz")
        make, back = [], []
        for _ in range(rounds):
            make.append(timed(lambda: subprocess.run(
                f"tar -C {src} -cf - . | gzip -1 > {arc}", shell=True, check=True)))
            dst = os.path.join(base, "dst")
            shutil.rmtree(dst, ignore_errors=True)
            os.makedirs(dst)
            back.append(timed(lambda d=dst: subprocess.run(  # type: ignore[misc]
                f"gzip -dc {arc} | tar -xf - -C {d}", shell=True, check=True)))
        return statistics.median(make), statistics.median(back), os.path.getsize(arc)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rootfs", default="host")
    ap.add_argument("--big", action="store_true", help="also the pause for a 1 GiB workspace")
    args = ap.parse_args()
    rows = []
    with daemon(args.rootfs) as sock, Client(sock, timeout=900) as c:
        for kind, make in MAKE.items():
            sb = c.sandbox(f"bench-{kind}")
            sb.get({"limits": {"diskBytes": 512 * MiB, "memoryBytes": 1024 * MiB}})
            assert sb.exec(make).exit_code == 0
            backup, restore, fork = [], [], []
            size = 0
            for r in range(args.rounds):
                t = time.perf_counter()
                info = sb.create_backup("/workspace/w")
                backup.append((time.perf_counter() - t) * 1000)
                size = info.size_bytes
                restore.append(timed(lambda: sb.restore_backup(info.backup_id)))  # noqa: B023
                c.delete_backup(info.backup_id)
                fork.append(timed(lambda: sb.fork(f"bench-{kind}-f{r}")))  # noqa: B023
                c.sandbox(f"bench-{kind}-f{r}").destroy()
            h_make, h_back, h_size = host_anchor(sb, args.rounds)
            b, rs, f = (statistics.median(x) for x in (backup, restore, fork))
            rows.append([kind, f"{b:.0f}", f"{h_make:.0f}", f"{b / h_make:.2f}",
                         f"{rs:.0f}", f"{h_back:.0f}", f"{rs / h_back:.2f}", f"{f:.0f}",
                         f"{size / MiB:.1f}", f"{h_size / MiB:.1f}"])
            # The pause a running program sees: its longest tick gap during one backup.
            sb.write_file("/workspace/ticker.py", TICKER)
            p = sb.start_process("python3", ["/workspace/ticker.py"], process_id="ticker")
            time.sleep(1.0)
            quiet = float(sb.read_file("/tmp/worst").text)
            sb.create_backup("/workspace/w")
            time.sleep(0.2)
            worst = float(sb.read_file("/tmp/worst").text)
            p.kill()
            rows[-1] += [f"{quiet:.1f}", f"{worst:.1f}"]
            for b_ in c.list_backups(f"bench-{kind}"):
                c.delete_backup(b_.backup_id)
            sb.destroy()
            rows[-1].append(f"{wake_ms(c, kind, make):.0f}")
    print(table(rows, ["workspace (100 MiB)", "backup ms", "host tar|gzip ms", "x host",
                 "restore ms", "host gunzip|tar ms", "x host", "fork ms", "backup MiB",
                 "host MiB", "tick gap idle ms", "tick gap in backup ms", "wake ms"]))
    if args.big:
        with daemon(args.rootfs) as sock, Client(sock, timeout=900) as c:
            gap, took = big_pause(c)
        print(f"1 GiB workspace (16 x 64 MiB): backup {took:.0f} ms, longest tick gap of a "
              f"running program during it {gap:.0f} ms (its cgroup frozen for the tar)")


def wake_ms(c: Client, kind: str, make: str) -> float:
    """A room with onIdle snapshot, put to sleep by the idle reaper, woken by one exec: the
    time of that exec (restore of its layer included), minus a warm exec's."""
    sb = c.sandbox(f"bench-{kind}-sleep")
    sb.get({"limits": {"diskBytes": 512 * MiB, "memoryBytes": 1024 * MiB},
            "sleepAfter": 1, "onIdle": "snapshot"})
    assert sb.exec(make).exit_code == 0
    deadline = time.monotonic() + 120
    while not any(r.sandbox_id == sb.id and r.status == "stopped" for r in c.list_sandboxes()):
        assert time.monotonic() < deadline, "the room was not put to sleep"
        time.sleep(0.2)
    woken = timed(lambda: sb.exec("true"))
    warm = timed(lambda: sb.exec("true"))
    assert sb.exec("ls /workspace/w | wc -l").stdout.strip() != "0"
    sb.destroy()
    return woken - warm


def big_pause(c: Client) -> tuple[float, float]:
    sb = c.sandbox("bench-big")
    sb.get({"limits": {"diskBytes": 2048 * MiB, "memoryBytes": 3072 * MiB}})
    assert sb.exec("mkdir -p /workspace/w && python3 -c \"\n"
                   "import os\nblock = (os.urandom(4096).hex() + '\\n').encode() * 8192\n"
                   "for i in range(16):\n"
                   "    open(f'/workspace/w/big{i}', 'wb').write(block)\"").exit_code == 0
    sb.write_file("/workspace/ticker.py", TICKER)
    p = sb.start_process("python3", ["/workspace/ticker.py"], process_id="ticker")
    time.sleep(1.0)
    t = time.perf_counter()
    info = sb.create_backup("/workspace/w")
    took = (time.perf_counter() - t) * 1000
    time.sleep(0.2)
    gap = float(sb.read_file("/tmp/worst").text)
    p.kill()
    c.delete_backup(info.backup_id)
    sb.destroy()
    return gap, took


if __name__ == "__main__":
    main()
