"""A room-wide OOM must never choose the room's init (issue 10, L4).

The init raises the oom_score_adj of what it starts, but any process may lower its own back to 0
(its oom_score_adj_min) and the init cannot go below 0 without CAP_SYS_RESOURCE in the initial
namespace. Payloads that keep their processes small and their memory in tmpfs pages (attributed
to no process) make the ~30 MB init the biggest task of the room: when the room's memory limit
was the room's cgroup, the kernel's OOM killer chose the init and the whole room died with it
(``SANDBOX_UNAVAILABLE``, "the room init was killed by SIGKILL", on the code before the fix).

Now the memory limit sits on the room's ``runs`` cgroup, which holds every run and not the init,
and the init stays out of a run's cgroup when the room's memory is nearly full.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import sec_helpers as h

from sandboxd.rooms import room_key

sec_user = h.sec_user
client_users = h.client_users
sec_daemon = h.sec_daemon
sec_client = h.sec_client
latency = h.latency

pytestmark = [pytest.mark.security, pytest.mark.integration]

MiB = 1024 * 1024
ROOM_MEMORY = 128 * MiB

#: Twenty small processes at oom_score_adj 0, and the room's memory filled with tmpfs pages that
#: count against the room but against no process's size: the init is the biggest task in sight.
SMALL_AND_ZERO = ("echo 0 > /proc/self/oom_score_adj; "
                  "for i in $(seq 20); do sleep 60 & done; "
                  "head -c 300M /dev/zero > /workspace/b; echo wrote")


def _init_pid(d: Any, room: str) -> int:
    meta = json.loads(Path(d.state_dir, "rooms", room_key(0, room), "room.json").read_text())
    return int(meta["initPid"])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_room_wide_oom_never_kills_the_init(sec_daemon: Any, sec_client: Any, room_id: str,
                                            latency: Any) -> None:
    sb = sec_client.sandbox(f"{room_id[:40]}-oom")
    sb.get({"limits": {"memoryBytes": ROOM_MEMORY}})
    try:
        assert sb.exec("cat /proc/self/oom_score_adj").stdout.strip() != "0"
        init = _init_pid(sec_daemon, sb.id)
        rss0 = h.rss_kb(sec_daemon.proc.pid)
        # A first run leaves files behind: they stay charged to the room after the run is gone.
        first = sb.exec("head -c 56M /dev/zero > /workspace/a")
        assert first.status == "OK", first
        with latency("room-wide OOM (memory 128 MiB, tmpfs + small processes)") as lat:
            r = sb.exec(SMALL_AND_ZERO, timeout=60)
        lat.check()
        # The run's verdict says what happened to it: out of memory, by the kernel's count.
        assert r.status == "ML" and r.oom_killed and r.limit_exceeded == "memory", r.raw
        assert r.memory_peak_bytes is not None and r.memory_peak_bytes <= ROOM_MEMORY + MiB
        # The same init still serves the room.
        assert _alive(init), "the room's init was killed by the OOM"
        assert _init_pid(sec_daemon, sb.id) == init
        sizes = {f.name: f.size for f in sb.list_files("/workspace")}
        assert sizes["a"] == 56 * MiB, sizes  # (the file API is the init's own work)
        # A room whose memory is full of files: each exec may be out of memory itself, but
        # never the init's end (the fast spawn path would stand the init in the run's cgroup).
        for _ in range(5):
            full = sb.exec("true")
            assert full.status in ("OK", "ML"), full.raw
            assert _alive(init), "an exec in a full room killed the init"
        sb.delete_file("/workspace/a")
        sb.delete_file("/workspace/b")
        assert sb.exec("echo alive").stdout == "alive\n"
        assert _init_pid(sec_daemon, sb.id) == init and _alive(init)
        info = sec_client.call("stats", {"sandboxId": sb.id})["sandboxes"][0]
        assert info["status"] == "ready", info
        # The daemon did not pay for it.
        assert h.rss_kb(sec_daemon.proc.pid) < rss0 + 32 * 1024
    finally:
        sb.destroy()


def test_oom_in_one_room_leaves_the_others_alone(sec_daemon: Any, sec_client: Any,
                                                 room_id: str) -> None:
    a = sec_client.sandbox(f"{room_id[:40]}-oa")
    b = sec_client.sandbox(f"{room_id[:40]}-ob")
    a.get({"limits": {"memoryBytes": ROOM_MEMORY}})
    b.get({"limits": {"memoryBytes": ROOM_MEMORY}})
    try:
        b.write_file("/workspace/keep", "kept\n")
        inits = {_init_pid(sec_daemon, a.id), _init_pid(sec_daemon, b.id)}
        a.exec("head -c 56M /dev/zero > /workspace/a")
        assert a.exec(SMALL_AND_ZERO, timeout=60).status == "ML"
        assert all(_alive(p) for p in inits)
        assert b.exec("cat /workspace/keep").stdout == "kept\n"
        assert os.path.exists(sec_daemon.socket)
    finally:
        a.destroy()
        b.destroy()
