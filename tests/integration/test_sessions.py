"""Sessions from the wire (issue 15, "Sessions"): cwd, variables, functions and aliases persist
from one exec to the next; a call's own cwd/env apply to it only; a timeout or a limit kills the
command and spares the session (even a builtin loop); ``exit`` ends it; calls run one at a time
in order; startProcess and openTerminal start from it; the state is root's alone; nothing of a
session remains after deleteSession or destroy."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import DaemonProc
from test_limits import host_ok
from test_terminals import Wire

from sandboxd import errors
from sandboxd.client import AsyncClient

pytestmark = pytest.mark.integration


def test_cd_variables_functions_and_aliases_persist(client: Any, daemon: DaemonProc,
                                                    room_id: str) -> None:
    sb = client.sandbox(room_id)
    sid = sb.create_session("main", env={"GREETING": "hi"}).session_id
    assert sid == "main"
    for line in ("mkdir -p /workspace/a/b && cd /workspace/a/b", "export X=exported; Y='two words'",
                 "greet() { echo \"$GREETING from $1\"; }", "alias ll='echo aliased'",
                 "arr=(one two three)"):
        r = sb.exec(line, session_id=sid)
        assert (r.status, r.exit_code) == ("OK", 0), r.raw
    r = sb.exec('pwd; echo "$X|$Y|${arr[2]}"; greet me; ll; sh -c \'echo child:$X\'',
                session_id=sid)
    assert r.stdout == ("/workspace/a/b\nexported|two words|three\nhi from me\naliased\n"
                        "child:exported\n"), r.raw
    assert "sessionEnded" not in r.raw or r.raw["sessionEnded"] is False
    # A sessionless exec stays what it was: a fresh process, none of the session's state.
    r = sb.exec('pwd; echo "[$X]"')
    assert r.stdout == "/workspace\n[]\n", r.raw
    info = {s.session_id: s for s in sb.list_sessions()}
    assert info[sid].calls == 6 and info[sid].busy is False
    host_ok(daemon, sb)


def test_a_calls_cwd_and_env_apply_to_that_call_only(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sid = sb.create_session(cwd="/tmp", env={"MODE": "session"}).session_id
    r = sb.exec('pwd; echo "$MODE $EXTRA"', session_id=sid, cwd="/workspace",
                env={"MODE": "call", "EXTRA": "x"})
    assert r.stdout == "/workspace\ncall x\n", r.raw
    r = sb.exec('pwd; echo "$MODE [${EXTRA-unset}]"', session_id=sid)
    assert r.stdout == "/tmp\nsession [unset]\n", r.raw
    # A null value unsets, for that call only too.
    r = sb.exec('echo "[${MODE-unset}]"', session_id=sid, env={"MODE": None})
    assert r.stdout == "[unset]\n", r.raw
    assert sb.exec('echo "$MODE"', session_id=sid).stdout == "session\n"
    # The line's own cd still moves the session, even on a call with its own cwd.
    sb.exec("cd /workspace/..", session_id=sid, cwd="/workspace")
    assert sb.exec("pwd", session_id=sid).stdout == "/\n"
    with pytest.raises(errors.ValidationError, match="shell variable"):
        sb.exec("true", session_id=sid, env={"1BAD": "x"})


def test_a_timeout_kills_the_command_not_the_session(client: Any, daemon: DaemonProc,
                                                     room_id: str) -> None:
    sb = client.sandbox(room_id)
    sid = sb.create_session().session_id
    sb.exec("cd /tmp; KEPT=yes", session_id=sid)
    r = sb.exec("KEPT=no; sleep 100", session_id=sid, timeout=0.5)
    assert (r.status, r.timed_out) == ("TO", True), r.raw
    # A builtin loop runs in the shell itself: the call's tree is killed, the session is not.
    r = sb.exec("KEPT=no; while :; do :; done", session_id=sid, limits={"cpuTimeMs": 300})
    assert (r.status, r.raw["limitExceeded"]) == ("TO", "cpu"), r.raw
    r = sb.exec("KEPT=no; head -c 300000000 /dev/zero | tr '\\0' x", session_id=sid,
                limits={"outputBytes": 4096})
    assert r.status == "OL", r.raw
    r = sb.exec('pwd; echo "$KEPT"', session_id=sid)
    assert r.stdout == "/tmp\nyes\n", r.raw
    host_ok(daemon, sb)


def test_exit_ends_the_session(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sid = sb.create_session().session_id
    r = sb.exec("false", session_id=sid)
    assert r.exit_code == 1 and not r.raw.get("sessionEnded"), r.raw
    r = sb.exec("echo bye; exit 3", session_id=sid)
    assert (r.exit_code, r.stdout, r.raw["sessionEnded"]) == (3, "bye\n", True), r.raw
    with pytest.raises(errors.SessionNotFound):
        sb.exec("true", session_id=sid)
    assert sid not in [s.session_id for s in sb.list_sessions()]
    # set -e and a failing command: the shell exits, as it would at a prompt
    sid = sb.create_session().session_id
    r = sb.exec("set -e; false; echo not-reached", session_id=sid)
    assert (r.exit_code, r.stdout, r.raw["sessionEnded"]) == (1, "", True), r.raw
    # and its state directory went with it
    assert sb.exec(f"ls /tmp/.sandboxd | grep -c session-{sid} || true").stdout == "0\n"


def test_errors(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    with pytest.raises(errors.SessionNotFound):
        sb.exec("true", session_id="nope")
    with pytest.raises(errors.SessionNotFound):
        sb.delete_session("nope")
    sb.create_session("dup")
    with pytest.raises(errors.SessionExists):
        sb.create_session("dup")
    with pytest.raises(errors.ValidationError, match="No such file"):
        sb.create_session("nowhere", cwd="/no/such/dir")
    assert [s.session_id for s in sb.list_sessions()] == ["dup"]
    with pytest.raises(errors.InvalidParams, match="sessionId"):
        sb.create_session("bad/id")
    with pytest.raises(errors.ValidationError, match="root"):
        sb.exec("true", session_id="dup", user="sandbox")
    with pytest.raises(errors.SessionNotFound):
        sb.start_process("true", session_id="nope")
    # A bad request took nothing down: the session still works.
    assert sb.exec("echo ok", session_id="dup").stdout == "ok\n"


def test_calls_in_one_session_run_one_at_a_time_in_order(daemon: DaemonProc,
                                                         room_id: str) -> None:
    async def main() -> list[Any]:
        async with AsyncClient(daemon.socket) as c:
            sb = c.sandbox(room_id)
            sid = (await sb.create_session()).session_id
            first = asyncio.ensure_future(sb.exec("sleep 0.5; N=1", session_id=sid))
            await asyncio.sleep(0.1)
            second = asyncio.ensure_future(sb.exec('N=$((N+1)); echo "$N"', session_id=sid))
            third = asyncio.ensure_future(sb.exec('echo "$N"', session_id=sid))
            return list(await asyncio.gather(first, second, third))
    t0 = time.monotonic()
    first, second, third = asyncio.run(main())
    assert first.status == "OK", first.raw
    assert (second.stdout, third.stdout) == ("2\n", "2\n"), (second.raw, third.raw)
    assert time.monotonic() - t0 >= 0.5


def test_processes_and_terminals_start_from_the_session(client: Any, daemon: DaemonProc,
                                                        room_id: str) -> None:
    sb = client.sandbox(room_id)
    sid = sb.create_session().session_id
    sb.exec("cd /tmp; export FROM=session; hello() { echo hello-$FROM; }; alias hi=hello",
            session_id=sid)
    proc = sb.start_process('pwd; echo "$FROM"', session_id=sid)
    proc.wait(timeout=30)
    assert proc.logs().stdout == "/tmp\nsession\n"
    proc = sb.start_process("printenv", ["FROM"], session_id=sid)
    proc.wait(timeout=30)
    assert proc.logs().stdout == "session\n"
    wire = Wire(daemon.socket)
    try:
        tid = wire.call("openTerminal", sandboxId=room_id, sessionId=sid)["terminalId"]
        wire.write(tid, b"pwd; hi; echo E-$((6*7))\n")
        out = wire.wait_output(tid, rb"E-42")
        assert b"/tmp\r\nhello-session\r\n" in out, out
        wire.write(tid, b"exit\n")
        wire.wait_exit(tid)
        # The terminal read the state; nothing it did is written back.
        assert sb.exec("echo $FROM", session_id=sid).stdout == "session\n"
    finally:
        wire.close()


@pytest.mark.subordinate_ids
def test_the_sandbox_user_cannot_read_or_plant_a_sessions_state(client: Any,
                                                              room_id: str) -> None:
    sb = client.sandbox(room_id)
    sid = sb.create_session().session_id
    sb.exec("SECRET=s3cr3t", session_id=sid)
    state = f"/tmp/.sandboxd/session-{sid}/state"
    r = sb.exec(f"cat {state}", user="sandbox")
    assert r.exit_code != 0 and "s3cr3t" not in r.stdout, r.raw
    r = sb.exec(f"echo 'echo planted' > {state}; ln -sf /x {state}", user="sandbox")
    assert r.exit_code != 0, r.raw
    r = sb.exec('echo "$SECRET"', session_id=sid)
    assert r.stdout == "s3cr3t\n", r.raw


def test_delete_and_destroy_leave_nothing(client: Any, daemon: DaemonProc,
                                          room_id: str) -> None:
    sb = client.sandbox(room_id)
    a = sb.create_session("a").session_id
    sb.create_session("b")
    assert sb.delete_session(a).session_id == a
    with pytest.raises(errors.SessionNotFound):
        sb.exec("true", session_id=a)
    assert sb.exec("ls /tmp/.sandboxd").stdout == "session-b\n"
    sb.destroy()
    assert sb.list_sessions() == []
    with pytest.raises(errors.SessionNotFound):
        sb.exec("true", session_id="b")
    host_ok(daemon, sb)
