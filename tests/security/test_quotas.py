"""Caps on what one client can take, each answered with its error code (issue 7, "The daemon's
own surface"): rooms per uid, concurrent runs per room, request size, connections (in all and
per uid), and pending stream bytes (a client that never reads is paused, then dropped, and the
daemon's memory stays bounded).

One daemon with deliberately small caps; clients that must not be exempt (root and the daemon's
own uid are, by design, for rooms and connections) run as the unprivileged ``sbxother``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sec_helpers as h
from sec_helpers import (
    CLIENT_GROUP,
    Latency,
    client_of,
    host_pids_of,
    run_as_client,
    start_daemon,
    stop_and_check,
)

from sandboxd import errors
from sandboxd.client import AsyncClient

# The suite's shared fixtures, bound by name (sec_helpers says why this is not a conftest.py).
sec_user = h.sec_user
client_users = h.client_users

pytestmark = [pytest.mark.security, pytest.mark.integration]

MiB = 1024 * 1024
STALL_S = 3.0  # stream_stall_timeout_s of this daemon


@pytest.fixture(scope="module")
def qdaemon(sec_user: Any, client_users: Any) -> Iterator[Any]:
    import pwd
    import subprocess

    subprocess.run(["usermod", "-aG", CLIENT_GROUP, sec_user.pw_name], check=True)
    d = start_daemon(pwd.getpwnam(sec_user.pw_name), socket_group=CLIENT_GROUP,
                     max_rooms_per_uid=2, max_runs_per_room=2, max_runs_per_uid=3,
                     max_request_bytes=1 * MiB,
                     max_connections_per_uid=3, max_pending_bytes=1 * MiB,
                     stream_stall_timeout_s=STALL_S)
    yield d
    stop_and_check(d)


def _rpc(sock: socket.socket, obj: Any) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _read_msgs(sock: socket.socket, want: int, timeout: float = 10) -> list[Any]:
    sock.settimeout(timeout)
    buf = b""
    out: list[Any] = []
    while len(out) < want:
        data = sock.recv(65536)
        if not data:
            break
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            out.append(json.loads(line))
    return out


def test_rooms_per_uid(qdaemon: Any, client_users: Any) -> None:
    _, other = client_users
    out = run_as_client(other, qdaemon.socket, """
got = []
for i in range(3):
    try:
        c.sandbox(f'q-room-{i}').exec('true')
        got.append('ok')
    except errors.SandboxError as err:
        got.append(err.code)
for i in range(3):
    try:
        c.sandbox(f'q-room-{i}').destroy()
    except errors.SandboxError:
        pass
out = got
""")
    assert out == ["ok", "ok", "QUOTA_EXCEEDED"]


def test_rooms_per_uid_hold_for_one_batch(qdaemon: Any, client_users: Any) -> None:
    """Issue 10 H2: one batch of getSandbox calls made a room for nearly every entry (242 of 250
    with a quota of 64): each call passed the quota check before any room counted."""
    _, other = client_users
    out = run_as_client(other, qdaemon.socket, """
import socket as so
s = so.socket(so.AF_UNIX)
s.connect(c.path if hasattr(c, 'path') else SOCK)
batch = [{'jsonrpc': '2.0', 'id': i, 'method': 'getSandbox',
          'params': {'sandboxId': f'qb-{i}'}} for i in range(40)]
s.sendall(json.dumps(batch).encode() + b'\\n')
buf = b''
while not buf.endswith(b'\\n'):
    buf += s.recv(1 << 20)
replies = json.loads(buf)
ok = [r['id'] for r in replies if 'result' in r]
codes = sorted({r['error']['data']['code'] for r in replies if 'error' in r})
listed = [x['sandboxId'] for x in c.call('listSandboxes', {})['sandboxes']]
for i in range(40):
    c.call('destroy', {'sandboxId': f'qb-{i}'})
out = {'ok': len(ok), 'codes': codes, 'listed': len(listed)}
""".replace("SOCK", repr(qdaemon.socket)), timeout=120)
    assert out == {"ok": 2, "codes": ["QUOTA_EXCEEDED"], "listed": 2}, out
    with client_of(qdaemon) as c:
        assert c.ping().get("capabilities", {}).get("idSlices", {}).get("slicesFree") != 0


# A run that says it started (a marker) and holds until /workspace/.go exists (30 s at most).
HOLD = ("touch /workspace/.started-{i}; n=0; until [ -e /workspace/.go ]; do n=$((n+1)); "
        "[ $n -gt 600 ] && exit 1; sleep 0.05; done")


async def until_started(sb: Any, n: int) -> None:
    for _ in range(600):
        if all([await sb.exists(f"/workspace/.started-{i}") for i in range(n)]):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} held runs started")


def test_runs_per_room(qdaemon: Any) -> None:
    async def go() -> list[Any]:
        async with AsyncClient(qdaemon.socket) as ac:
            sb = ac.sandbox("q-runs")
            await sb.exec("rm -f /workspace/.go /workspace/.started-*")
            # Two runs that hold until released (a marker), each saying it started: the third
            # is tried while both certainly run, not after a 500 ms pause.
            slow = [asyncio.ensure_future(sb.exec(HOLD.format(i=i))) for i in range(2)]
            await until_started(sb, 2)
            try:
                await sb.exec("echo third")
                third: Any = "ran"
            except errors.QuotaExceeded as err:
                third = err
            await sb.write_file("/workspace/.go", "")
            done = await asyncio.gather(*slow)
            after = await sb.exec("echo after")
            await sb.destroy()
            return [third, *done, after]

    third, a, b, after = asyncio.run(go())
    assert isinstance(third, errors.QuotaExceeded) and third.context.get("limit") == 2
    assert a.exit_code == b.exit_code == 0 and after.stdout == "after\n"


def test_runs_per_uid(qdaemon: Any, client_users: Any) -> None:
    """Issue 10, H5: runs are capped per uid across its rooms, not only per room."""
    _, other = client_users
    out = run_as_client(other, qdaemon.socket, """
import asyncio
from sandboxd.client import AsyncClient
async def go():
    async with AsyncClient(SOCK) as ac:
        a, b = ac.sandbox('q-u-a'), ac.sandbox('q-u-b')
        for x in (a, b):
            await x.exec('rm -f /workspace/.go /workspace/.started-*')
        # held until released, each saying it started: no 700 ms pause
        slow = [asyncio.ensure_future(x.exec(HOLD.format(i=i)))
                for x, i in ((a, 0), (a, 1), (b, 0))]
        await until_started(a, 2); await until_started(b, 1)
        try:
            await b.exec('echo fourth')
            fourth = 'ran'
        except errors.QuotaExceeded as err:
            fourth = [err.code, err.context.get('limit'), err.context.get('scope')]
        for x in (a, b):
            await x.write_file('/workspace/.go', '')
        codes = [r.exit_code for r in await asyncio.gather(*slow)]
        after = (await b.exec('echo after')).stdout
        await a.destroy(); await b.destroy()
        return {'fourth': fourth, 'codes': codes, 'after': after}
out = asyncio.run(go())
""".replace("SOCK", repr(qdaemon.socket)).replace("HOLD", f"({HOLD!r})").replace(
        "async def go", "async def until_started(sb, n):\n"
        "    for _ in range(600):\n"
        "        if all([await sb.exists(f'/workspace/.started-{i}') for i in range(n)]):\n"
        "            return\n"
        "        await asyncio.sleep(0.05)\n"
        "    raise AssertionError(f'fewer than {n} held runs started')\n"
        "async def go", 1), timeout=90)
    assert out == {"fourth": ["QUOTA_EXCEEDED", 3, "uid"], "codes": [0, 0, 0],
                   "after": "after\n"}, out


def test_request_size(qdaemon: Any) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(qdaemon.socket)
        big = {"jsonrpc": "2.0", "id": 1, "method": "exec",
               "params": {"sandboxId": "q-big", "command": "x" * (2 * MiB)}}
        _rpc(s, big)
        _rpc(s, {"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {}})
        msgs = _read_msgs(s, 2)
    assert msgs[0]["error"]["data"]["code"] == "REQUEST_TOO_LARGE"
    assert msgs[0]["error"]["data"]["limit"] == 1 * MiB
    assert msgs[1]["id"] == 2 and "result" in msgs[1]  # the connection goes on


def test_connections_per_uid(qdaemon: Any, client_users: Any) -> None:
    _, other = client_users
    out = run_as_client(other, qdaemon.socket, f"""
import socket, json
held = []
for i in range(3):
    s = socket.socket(socket.AF_UNIX)
    s.connect({qdaemon.socket!r})
    s.sendall(b'{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{}}}}\\n')
    s.recv(65536)
    held.append(s)
extra = socket.socket(socket.AF_UNIX)
extra.connect({qdaemon.socket!r})
extra.settimeout(5)
msg = json.loads(extra.recv(65536).split(b'\\n')[0])
eof = extra.recv(10) == b''
out = [msg['error']['data']['code'], eof]
""")
    assert out == ["QUOTA_EXCEEDED", True]
    # The cap is per uid: root (exempt) and, once those connections closed, the same user again.
    with client_of(qdaemon) as c:
        assert c.ping()["version"]
    assert run_as_client(other, qdaemon.socket, "out = c.ping()['version']")


def test_client_that_never_reads_is_paused_then_dropped(qdaemon: Any) -> None:
    """An output flood to a client that never reads: the run is paused at max_pending_bytes (the
    daemon's RSS stays bounded), the client is dropped after stream_stall_timeout_s and its run
    killed; a neighbour room answers throughout."""
    pid = qdaemon.proc.pid
    rss0 = h.rss_kb(pid)
    marker = f"flood-{secrets.token_hex(4)}"
    lat = Latency(qdaemon, "q-neighbour", "flood to a client that never reads")
    with lat:
        s = socket.socket(socket.AF_UNIX)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(qdaemon.socket)
        _rpc(s, {"jsonrpc": "2.0", "id": 1, "method": "exec", "params": {
            "sandboxId": "q-flood", "command": f"cat /dev/zero | base64; : {marker}",
            "stream": True,
            "limits": {"outputBytes": 64 * MiB}}})  # the default ceiling
        peak = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < STALL_S + 4:
            peak = max(peak, h.rss_kb(pid))
            time.sleep(0.1)
    lat.check()
    # Dropped: reading now drains what the kernel buffered, then EOF (or a reset).
    s.settimeout(5)
    got = 0
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += len(data)
    except ConnectionResetError:
        pass
    s.close()
    assert got < 16 * MiB, got
    print(f"daemon RSS {rss0} kB before, {peak} kB peak during the flood; {got} bytes buffered")
    assert peak - rss0 < 64 * 1024, f"daemon RSS grew {peak - rss0} kB"
    # The run is gone (killed with the connection) and the room usable again.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and host_pids_of(marker):
        time.sleep(0.1)
    assert host_pids_of(marker) == []
    with client_of(qdaemon) as c:
        sb = c.sandbox("q-flood")
        assert sb.exec("echo ok").stdout == "ok\n"
        sb.destroy()
        c.sandbox("q-neighbour").destroy()
    assert "dropping client" in qdaemon.log()
