"""Kernel pools every room shares with the daemon's uid: one room must not drain them.

Issue 10, H7 and H8. Per-user counters (inotify instances, queued signals, POSIX message-queue
bytes, fanotify groups) are charged to the daemon's uid in the host namespace, whatever room
spends them, and the pty pool is global: a room holding 128 inotify instances, ~96k queued
signals, a few message queues or 3,069 ptys made the same call fail in every other room. Each
test lets room A take all it can *and hold it* while room B (a neighbour of the same daemon)
does the ordinary thing once; B must succeed, A must have been stopped at its own ceiling.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import sec_helpers as h

sec_user = h.sec_user
client_users = h.client_users
sec_daemon = h.sec_daemon
sec_client = h.sec_client
rooms = h.rooms

pytestmark = [pytest.mark.security, pytest.mark.integration]

# The hog says it holds everything it got (a directory: mkdir needs no fd, and a hog may have
# none left) and holds until the test releases it (45 s at most): the neighbour's try can never
# come before the hog is full or after it let go, however loaded the machine is.
HOLD = """
import os, time
def hold():
    os.mkdir("/workspace/.holding")
    for _ in range(450):  # (under the hog's exec timeout: the mqueue hog unlinks after)
        if os.path.exists("/workspace/.release"):
            return
        time.sleep(0.1)
"""

# Each hog takes resources until the kernel says no, prints how many it got, and holds them.
HOGS = {
    "inotify": """
import ctypes, os, json, sys, time
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while n < 100000:
    if libc.inotify_init1(0) < 0:
        break
    n += 1
print(json.dumps({"n": n, "errno": ctypes.get_errno()}), flush=True)
hold()
""",
    "signals": """
import os, signal, json, time, threading
sig = signal.SIGRTMIN
signal.pthread_sigmask(signal.SIG_BLOCK, [sig])
n, err = 0, 0
while n < 200000:
    try:
        signal.pthread_kill(threading.get_ident(), sig)
    except OSError as e:
        err = e.errno
        break
    n += 1
print(json.dumps({"n": n, "errno": err}), flush=True)
hold()
""",
    "mqueue": """
import ctypes, json, time
rt = ctypes.CDLL("librt.so.1", use_errno=True)
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
n = 0
while n < 1000:
    if rt.mq_open(f"/q{n}".encode(), 0o100 | 0o2, 0o600, None) < 0:
        break
    n += 1
print(json.dumps({"n": n, "errno": ctypes.get_errno()}), flush=True)
hold()
for i in range(n):  # named queues outlive their creator: let go of them
    rt.mq_unlink(f"/q{i}".encode())
""",
    "pty": """
import os, json, time
fds = []
err = 0
while len(fds) < 5000:
    try:
        fds.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))
    except OSError as e:
        err = e.errno
        break
print(json.dumps({"n": len(fds), "errno": err}), flush=True)
hold()
""",
}

# What the neighbour does once: the same call, a single time.
ONCE = {
    "inotify": "import ctypes; l = ctypes.CDLL(None, use_errno=True); "
               "fd = l.inotify_init1(0); print('ok' if fd >= 0 else ctypes.get_errno())",
    "signals": "import signal, threading; s = signal.SIGRTMIN; "
               "signal.pthread_sigmask(signal.SIG_BLOCK, [s]); "
               "signal.pthread_kill(threading.get_ident(), s); print('ok')",
    "mqueue": "import ctypes; rt = ctypes.CDLL('librt.so.1', use_errno=True); "
              "rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, "
              "ctypes.c_void_p]; fd = rt.mq_open(b'/mine', 0o100 | 0o2, 0o600, None); "
              "print('ok' if fd >= 0 else ctypes.get_errno())",
    "pty": "import os; os.open('/dev/ptmx', os.O_RDWR | os.O_NOCTTY); print('ok')",
}

# The most one room may take (the contract of caps.ROOM_RLIMIT_SHARE, user.ROOM_UCOUNTS and
# mnt.PTY_MAX, written out), from the host's pools.
def _ceiling(kind: str) -> int:
    import resource

    if kind == "inotify":
        with open("/proc/sys/fs/inotify/max_user_instances") as f:
            return max(4, int(f.read()) // 8)
    if kind == "signals":
        hard = resource.getrlimit(resource.RLIMIT_SIGPENDING)[1]
        return hard // 16
    if kind == "mqueue":
        # A queue of the default attributes (10 messages of 8 KiB) costs 80 KiB and a little.
        hard = resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1]
        return max(1, hard // 8 // 81920)
    return 64


@pytest.mark.parametrize("kind", sorted(HOGS))
def test_one_room_cannot_drain_a_shared_kernel_pool(sec_daemon: Any, rooms: Any,
                                                    kind: str) -> None:
    hog_room, neighbour = rooms(2)
    neighbour.exec("true")
    hog_room.exec("rm -rf /workspace/.holding /workspace/.release")
    got: dict[str, Any] = {}

    def hog() -> None:
        code = HOLD + HOGS[kind]
        got["r"] = hog_room.exec("python3", ["-c", code], timeout=60)

    t = threading.Thread(target=hog)
    t.start()
    with h.client_of(sec_daemon) as side:
        mine = side.sandbox(hog_room.id)
        for _ in range(1200):  # until the hog has taken all it can and holds it
            if mine.exists("/workspace/.holding") or not t.is_alive():
                break
            time.sleep(0.05)
        assert mine.exists("/workspace/.holding"), got
        try:
            # Through the second connection: the sync client serializes its calls, so on the
            # hog's connection this try waited until the hog had let go (the test was vacuous).
            r = side.sandbox(neighbour.id).exec("python3", ["-c", ONCE[kind]], timeout=30)
        finally:
            mine.write_file("/workspace/.release", "")
    t.join()
    report = json.loads(got["r"].stdout)
    assert r.stdout.strip() == "ok", (kind, r, report)
    assert 0 < report["n"] <= _ceiling(kind), (kind, report)
    # And the hog's room itself keeps working once it let go.
    assert hog_room.exec("python3", ["-c", ONCE[kind]]).stdout.strip() == "ok"


def test_fanotify_is_denied_in_rooms(rooms: Any) -> None:
    """fanotify groups are another per-user count shared with the daemon's uid; no toolchain
    needs them, so a room has none (max_fanotify_groups 0 in its user namespace)."""
    (sb,) = rooms(1)
    code = ("import ctypes; l = ctypes.CDLL(None, use_errno=True); "
            "fd = l.fanotify_init(0x200 | 0x0, 0); print(fd, ctypes.get_errno())")
    fd, _err = sb.exec("python3", ["-c", code]).stdout.split()
    assert int(fd) < 0, "fanotify_init succeeded in a room"
    values = sb.exec("cat /proc/sys/user/max_fanotify_groups /proc/sys/user/max_inotify_instances"
                     ).stdout.split()
    assert values[0] == "0" and 0 < int(values[1]) <= _ceiling("inotify")
    # The room cannot raise them again (no capability, and /proc/sys is read-only).
    r = sb.exec("echo 100000 > /proc/sys/user/max_inotify_instances")
    assert r.exit_code != 0
