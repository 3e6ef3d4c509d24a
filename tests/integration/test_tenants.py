"""Two unprivileged client users of one daemon cannot see, exec in, read from or destroy each
other's rooms (issue 7: clients are identified only by SO_PEERCRED).

The daemon runs as its own user (``sbxsec``) with its socket in group ``sbxclients``; the two
tenants are ``sbxtest`` and ``sbxother``, both in that group and neither the daemon's uid nor
root (those list every room, but address only their own by id). Each tenant's calls run in a
process of its own under its uid, so the only thing telling them apart is the kernel's SO_PEERCRED.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    DaemonProc,
    _ensure_user,
    _setup_user,
    as_user,
    make_daemon,
    skip_unless_ci,
)

from sandboxd.rooms import room_key

pytestmark = pytest.mark.integration

GROUP = "sbxclients"
ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def tenants() -> Iterator[tuple[DaemonProc, pwd.struct_passwd, pwd.struct_passwd]]:
    if os.geteuid() != 0:
        skip_unless_ci("needs root to create users")
    owner = _setup_user("sbxsec", groups=(GROUP,))
    a, b = _ensure_user("sbxtest", groups=(GROUP,)), _ensure_user("sbxother", groups=(GROUP,))
    d = make_daemon(owner)
    cfg = os.path.join(os.path.dirname(d.state_dir), "sandboxd.toml")
    Path(cfg).write_text(f'socket_group = "{GROUP}"\n')
    os.chmod(cfg, 0o644)
    d.extra_args += ["--config", cfg]
    d.start()
    yield d, a, b
    code = d.stop()
    left = d.leftovers()
    if code == 0 and not left:
        shutil.rmtree(os.path.dirname(d.state_dir), ignore_errors=True)
    assert code == 0 and not left, (code, left)


def call(user: pwd.struct_passwd, d: DaemonProc, method: str, params: dict[str, Any]) -> Any:
    """One JSON-RPC call as ``user``; returns the result, or {"error": CODE}."""
    prog = (
        f"import json, sys; sys.path.insert(0, {ROOT!r})\n"
        "from sandboxd.client import Client\n"
        "from sandboxd import errors\n"
        f"c = Client({d.socket!r}, timeout=30)\n"
        "try:\n"
        f"    out = c.call({method!r}, json.loads({json.dumps(params)!r}))\n"
        "except errors.SandboxError as err:\n"
        "    out = {'error': err.code}\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(as_user(user, [sys.executable, "-c", prog]), capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_tenants_cannot_touch_each_others_rooms(tenants: Any) -> None:
    d, alice, bob = tenants
    room = f"alice-{secrets.token_hex(3)}"
    token = secrets.token_hex(16)
    r = call(alice, d, "exec", {"sandboxId": room,
                                "command": f"echo {token} > /workspace/secret; echo made"})
    assert r["stdout"] == "made\n"

    # Bob: alice's room is not listed, and every call of his by that id reaches a room of his
    # own (fresh and empty), never alice's, and gives no hint that hers exists.
    assert room not in json.dumps(call(bob, d, "listSandboxes", {}))
    attempts = {
        "exec": call(bob, d, "exec", {"sandboxId": room, "command": "cat /workspace/secret"}),
        "ping": call(bob, d, "ping", {"sandboxId": room}),
        "getSandbox": call(bob, d, "getSandbox", {"sandboxId": room}),
        "readFile": call(bob, d, "readFile", {"sandboxId": room, "path": "/workspace/secret"}),
        "writeFile": call(bob, d, "writeFile", {"sandboxId": room, "path": "/workspace/secret",
                                               "content": "pwned"}),
        "destroy": call(bob, d, "destroy", {"sandboxId": room}),
    }
    for name, got in attempts.items():
        assert token not in json.dumps(got), name
    assert attempts["exec"]["exitCode"] == 1
    assert attempts["readFile"] == {"error": "FILE_NOT_FOUND"}
    assert attempts["getSandbox"]["incarnation"] == 1
    assert attempts["destroy"] == {"sandboxId": room, "destroyed": True}  # his own room

    # Alice's room is intact and hers; her secret unchanged.
    r = call(alice, d, "exec", {"sandboxId": room, "command": "cat /workspace/secret"})
    assert r["stdout"] == f"{token}\n"
    assert room in json.dumps(call(alice, d, "listSandboxes", {}))
    # The daemon's own uid and root list every room, with its owner (documented in README)...
    with d.client() as c:
        listed = [s.raw for s in c.list_sandboxes() if s.sandbox_id == room]
        assert listed and listed[0]["owner"] == alice.pw_uid
        # ... but an id names their own room: root cannot be tricked into alice's by id.
        assert c.sandbox(room).exec("cat /workspace/secret 2>&1 || true").stdout != f"{token}\n"
        c.sandbox(room).destroy()
    assert call(alice, d, "destroy", {"sandboxId": room}) == {"sandboxId": room, "destroyed": True}


def test_same_room_id_for_two_tenants_is_two_rooms(tenants: Any) -> None:
    """Room ids are per tenant (issue 10 M1): bob's "r" is his own room, not alice's and not a
    refusal that would tell him alice has one (an existence oracle, and squatting)."""
    d, alice, bob = tenants
    room = f"shared-{secrets.token_hex(3)}"
    assert call(alice, d, "exec", {"sandboxId": room,
                                   "command": "echo alice > /workspace/who"})["exitCode"] == 0
    # Before bob has one, his answers are what any unused id gives.
    assert call(bob, d, "destroy", {"sandboxId": room}) == {"sandboxId": room, "destroyed": False}
    got = call(bob, d, "exec", {"sandboxId": room,
                                "command": "cat /workspace/who 2>&1; echo bob > /workspace/who"})
    assert "alice" not in got["stdout"] and got["exitCode"] == 0, got
    assert call(alice, d, "readFile", {"sandboxId": room, "path": "/workspace/who"}
                )["content"] == "alice\n"
    assert call(bob, d, "readFile", {"sandboxId": room, "path": "/workspace/who"}
                )["content"] == "bob\n"
    # Different host names for the two rooms (state dirs), each naming its owner.
    names = sorted(os.listdir(os.path.join(d.state_dir, "rooms")))
    assert room_key(alice.pw_uid, room) in names and room_key(bob.pw_uid, room) in names
    assert call(bob, d, "destroy", {"sandboxId": room})["destroyed"] is True
    assert call(alice, d, "exec", {"sandboxId": room, "command": "cat /workspace/who"}
                )["stdout"] == "alice\n"
    call(alice, d, "destroy", {"sandboxId": room})


def test_room_keys_are_valid_bounded_and_distinct() -> None:
    longest = "a" * 63
    keys = {room_key(uid, rid) for uid in (0, 1000, 4294967294)
            for rid in ("r", "r-1", longest, longest[:-1] + "b", "a" * 62)}
    assert len(keys) == 15
    for k in keys:
        assert len(k) <= 63 and re.fullmatch(r"[A-Za-z0-9_-]{1,63}", k), k


def test_unrelated_user_cannot_connect(tenants: Any) -> None:
    """A user outside the socket's group is refused by the kernel before the daemon sees it."""
    d, _, _ = tenants
    outsider = _ensure_user("sbxoutsider")
    prog = (f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({d.socket!r})")
    res = subprocess.run(as_user(outsider, [sys.executable, "-c", prog]), capture_output=True,
                         text=True, timeout=30, check=False)
    assert res.returncode != 0 and "PermissionError" in res.stderr
