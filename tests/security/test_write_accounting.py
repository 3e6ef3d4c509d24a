"""writeFile: atomic (issue 23, D4) and charged to the room, not the daemon (issue 10, H4).

D4: a client that disconnected right after sending writeFile got its handler cancelled after
the init had opened the target O_TRUNC: the file was left at 0 bytes, neither old nor new.
H4: the daemon wrote the content itself through an fd the init opened, so tmpfs pages went to
the daemon's memory cgroup: 32 writes of 32 MiB put 1 GiB into a room limited to 64 MiB while
the room's usage stayed at 5 MB.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from typing import Any

import pytest
import sec_helpers as h

from sandboxd import errors

sec_user = h.sec_user
client_users = h.client_users
sec_daemon = h.sec_daemon
sec_client = h.sec_client
rooms = h.rooms

pytestmark = [pytest.mark.security, pytest.mark.integration]

MiB = 1024 * 1024


def _digest(sb: Any, path: str) -> str:
    r = sb.exec(f"sha256sum {path} | cut -d' ' -f1; ls -a $(dirname {path})")
    return r.stdout


@pytest.mark.parametrize("mib", [1, 8, 30])
def test_write_cut_off_by_a_disconnect_leaves_old_or_new(sec_daemon: Any, rooms: Any,
                                                         mib: int) -> None:
    (sb,) = rooms(1)
    old = b"old content\n" * 1000
    sb.write_file("/workspace/f.bin", base64.b64encode(old).decode(), encoding="base64")
    new = bytes(range(256)) * (mib * MiB // 256)
    digests = {hashlib.sha256(old).hexdigest(), hashlib.sha256(new).hexdigest()}
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "writeFile", "params": {
        "sandboxId": sb.id, "path": "/workspace/f.bin", "encoding": "base64",
        "content": base64.b64encode(new).decode()}}).encode() + b"\n"
    for delay in (0.0, 0.01, 0.05, 0.2):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sec_daemon.socket)
        s.sendall(line)
        time.sleep(delay)
        s.close()  # gone before (or while) the daemon writes
        # Until the cancelled (or finished) write has removed its temporary file — a generous
        # 30 s, then it is a leftover — instead of a 300 ms pause; the rename is atomic, so
        # the file is old or new at every moment.
        deadline = time.monotonic() + 30
        while True:
            out = sb.exec("sha256sum /workspace/f.bin | cut -d' ' -f1; ls -a /workspace").stdout
            digest, listing = out.split("\n", 1)
            assert digest in digests, f"torn file after a disconnect at {delay} s"
            if "sbx-write" not in listing or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert "sbx-write" not in listing, listing  # no temporary file left behind


def test_disk_full_write_keeps_the_old_file(sec_client: Any, room_id: str) -> None:
    sb = sec_client.sandbox(f"{room_id[:40]}-full")
    sb.get({"limits": {"diskBytes": 16 * MiB}})
    try:
        sb.write_file("/workspace/keep.txt", "precious\n")
        with pytest.raises(errors.NoSpace):
            sb.write_file("/workspace/keep.txt", "x" * (24 * MiB))
        assert sb.read_file("/workspace/keep.txt").text == "precious\n"
        assert "sbx-write" not in sb.exec("ls -a /workspace").stdout
        # The space came back: the room is usable.
        sb.write_file("/workspace/other.txt", "y" * (4 * MiB))
    finally:
        sb.destroy()


def test_written_files_count_against_the_rooms_memory(sec_client: Any, room_id: str) -> None:
    sb = sec_client.sandbox(f"{room_id[:40]}-mem")
    sb.get({"limits": {"memoryBytes": 64 * MiB, "diskBytes": 2048 * MiB}})
    try:
        chunk = "z" * (32 * MiB)
        written = 0
        for i in range(32):
            try:
                sb.write_file(f"/workspace/f{i}", chunk)
                written += 1
            except errors.NoSpace as err:
                assert "memory" in err.message
                break
        assert written <= 2, f"{written} x 32 MiB went into a room limited to 64 MiB"
        usage = sec_client.call("stats", {"sandboxId": sb.id})["sandboxes"][0]["usage"]
        assert usage["memoryCurrentBytes"] >= written * 32 * MiB, usage
        assert sb.exec("echo alive").stdout == "alive\n"
    finally:
        sb.destroy()


@pytest.mark.subordinate_ids  # the sandbox user's file
def test_write_follows_a_symlink_in_the_room_and_keeps_owner_and_mode(rooms: Any) -> None:
    (sb,) = rooms(1)
    # (payloads have no capabilities, so the sandbox user makes its own file)
    sb.exec("mkdir -p /workspace/real && chmod 777 /workspace/real && ln -s real/t /workspace/link"
            " && ln -s /proc/self/fd/3 /workspace/magic")
    setup = sb.exec("echo a > /workspace/real/t && chmod 600 /workspace/real/t", user="sandbox")
    assert setup.exit_code == 0, setup
    sb.write_file("/workspace/link", "b\n")
    r = sb.exec("cat /workspace/real/t; stat -c '%u %g %a' /workspace/real/t; "
                "test -L /workspace/link && echo still-a-link", user="sandbox")
    assert r.stdout == "b\n1000 1000 600\nstill-a-link\n", r
    sb.write_file("/workspace/real/t", "c\n", append=True)
    assert sb.read_file("/workspace/real/t").text == "b\nc\n"
    with pytest.raises(errors.SandboxError):
        sb.write_file("/workspace/magic", "x")


def test_append_cut_off_leaves_old_or_old_plus_new(sec_daemon: Any, rooms: Any) -> None:
    (sb,) = rooms(1)
    sb.write_file("/workspace/log", "head\n")
    new = "n" * (16 * MiB)
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "writeFile", "params": {
        "sandboxId": sb.id, "path": "/workspace/log", "content": new,
        "append": True}}).encode() + b"\n"
    sizes = set()
    for delay in (0.0, 0.02, 0.1):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sec_daemon.socket)
        s.sendall(line)
        time.sleep(delay)
        s.close()
        # An append is in place: while the daemon still pours (or cuts back a cancelled one)
        # a piece may show. Poll until the size is whole (a generous 30 s): one that stays a
        # piece is the failure. No fixed pause.
        deadline = time.monotonic() + 30
        while (size := int(sb.exec("stat -c %s /workspace/log").stdout)) % len(new) != 5 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (size - 5) % len(new) == 0, size  # whole appends only
        sizes.add(size)
    assert sb.exec("head -c 5 /workspace/log").stdout == "head\n"
