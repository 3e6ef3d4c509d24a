"""exec against a real daemon run by an unprivileged user: both forms, stdin, env, cwd,
streaming, timeouts with whole-tree kill, concurrency."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from sandboxd import errors
from sandboxd.client import AsyncClient

pytestmark = pytest.mark.integration


def test_shell_form_runs_in_workspace_with_clean_env(client: Any, room_id: str) -> None:
    r = client.sandbox(room_id).exec(
        "pwd; echo $HOME $LANG; env | sort | cut -d= -f1 | tr '\\n' ' '")
    assert r.exit_code == 0 and r.success
    lines = r.stdout.splitlines()
    assert lines[0] == "/workspace"
    assert lines[1] == "/root C.UTF-8"
    names = set(lines[2].split())
    assert {"PATH", "HOME", "LANG"} <= names
    assert not names & {"XDG_RUNTIME_DIR", "SANDBOXD_SOCKET", "SUDO_USER", "NOTIFY_SOCKET"}


def test_argv_form_passes_arguments_verbatim(client: Any, room_id: str) -> None:
    tricky = ["a b", "$HOME", "'quoted'", "; rm -rf /", "ünïcode", ""]
    r = client.sandbox(room_id).exec("printf", ["%s|", *tricky])
    assert r.exit_code == 0
    assert r.stdout == "".join(f"{a}|" for a in tricky)


def test_argv_form_with_empty_args_and_path_lookup(client: Any, room_id: str) -> None:
    r = client.sandbox(room_id).exec("true", [])
    assert r.exit_code == 0 and r.status == "OK"


def test_missing_program_is_exit_127_not_an_error(client: Any, room_id: str) -> None:
    r = client.sandbox(room_id).exec("no-such-program-xyz", [])
    assert r.exit_code == 127 and not r.success
    assert "no-such-program-xyz" in r.stderr


def test_nonzero_exit_and_stderr(client: Any, room_id: str) -> None:
    r = client.sandbox(room_id).exec("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.status) == (3, "out\n", "err\n", "RE")


def test_stdin_is_fed_and_defaults_to_empty(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    assert sb.exec("tr a-z A-Z", stdin="hello\nworld\n").stdout == "HELLO\nWORLD\n"
    assert sb.exec("wc -c").stdout.strip() == "0"  # no stdin: EOF at once, never a hang


def test_large_stdin_and_output_round_trip(client: Any, room_id: str) -> None:
    data = "x" * (3 * 1024 * 1024) + "\n"
    r = client.sandbox(room_id).exec("cat", [], stdin=data)
    assert r.stdout == data


def test_env_merges_over_defaults(client: Any, room_id: str) -> None:
    r = client.sandbox(room_id).exec("echo $FOO $LANG", env={"FOO": "bar", "LANG": "C"})
    assert r.stdout == "bar C\n"


def test_cwd_absolute_and_relative(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    sb.exec("mkdir -p /workspace/sub/dir")
    assert sb.exec("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sb.exec("pwd", cwd="sub/dir").stdout == "/workspace/sub/dir\n"
    r = sb.exec("pwd", cwd="/does/not/exist")
    assert r.exit_code != 0 and "does/not/exist" in r.stderr


def test_output_is_decoded_with_replacement(client: Any, room_id: str) -> None:
    r = client.sandbox(room_id).exec("printf 'ok \\377\\376 done'")
    assert r.stdout == "ok \ufffd\ufffd done"


def test_streaming_delivers_chunks_in_order_before_the_result(client: Any, daemon: Any,
                                                              room_id: str) -> None:
    # Readiness instead of a 350 ms bound: after each line the command waits until this side
    # has *seen* it (the callback drops a marker through a second connection), so it can only
    # finish if every chunk was delivered while it still ran; otherwise it gives up after 30 s
    # and exits 1.
    seen: list[tuple[str, str]] = []
    with daemon.client() as side:
        def on_output(stream: str, data: str) -> None:
            seen.append((stream, data))
            if stream == "stderr":
                side.sandbox(room_id).write_file(f"/workspace/.seen-{data.strip()}", "")

        r = client.sandbox(room_id).exec(
            "rm -f /workspace/.seen-*; for i in 1 2 3; do echo out$i; echo err$i >&2; "
            "n=0; until [ -e /workspace/.seen-err$i ]; do n=$((n+1)); [ $n -gt 600 ] && exit 1; "
            "sleep 0.05; done; done", on_output=on_output)
    assert r.exit_code == 0, "a chunk was not delivered while the command still ran"
    assert "".join(d for s, d in seen if s == "stdout") == "out1\nout2\nout3\n" == r.stdout
    assert "".join(d for s, d in seen if s == "stderr") == "err1\nerr2\nerr3\n" == r.stderr


def test_timeout_kills_the_whole_tree(client: Any, room_id: str, daemon: Any) -> None:
    sb = client.sandbox(room_id)
    # (No elapsed-time bound: a daemon that waited for the 1000 s sleepers would run into
    # pytest's 300 s timeout; the contract is TO and nothing left.)
    r = sb.exec("(setsid sleep 1000 &); (sleep 1001 & ) ; (trap '' TERM; sleep 1002) & "
                "sh -c 'kill -STOP $$' & sleep 1003", timeout=0.5)
    assert r.timed_out and r.exit_code == 124 and r.status == "TO"
    left = sb.exec("ps -eo args").stdout
    assert "sleep 100" not in left, left


def test_main_process_exit_kills_its_leftovers(client: Any, room_id: str) -> None:
    sb = client.sandbox(room_id)
    r = sb.exec("(setsid sleep 999 &); echo started")
    assert r.stdout == "started\n"
    assert "sleep 999" not in sb.exec("ps -eo args").stdout


def test_concurrent_execs_in_one_room_do_not_block_each_other(client: Any, daemon: Any,
                                                              room_id: str) -> None:
    # The slow run waits for the last quick one's marker: it only ends well ("slow", exit 0)
    # if the quick ones ran while it was running (if they queued behind it, it gives up after
    # 30 s and exits 1). No wall-clock bound.
    async def go() -> list[Any]:
        async with AsyncClient(daemon.socket) as ac:
            sb = ac.sandbox(room_id)
            await sb.exec("rm -f /workspace/.quick-done")
            slow = asyncio.ensure_future(sb.exec(
                "n=0; until [ -e /workspace/.quick-done ]; do n=$((n+1)); "
                "[ $n -gt 600 ] && exit 1; sleep 0.05; done; echo slow"))
            quick = [await sb.exec(f"echo {i}") for i in range(5)]
            await sb.exec("touch /workspace/.quick-done")
            return [await slow, *quick]

    results = asyncio.run(go())
    assert results[0].exit_code == 0 and results[0].stdout == "slow\n", results[0]
    assert [r.stdout for r in results[1:]] == [f"{i}\n" for i in range(5)]


def test_many_requests_in_flight_on_one_connection(daemon: Any, room_id: str) -> None:
    async def go() -> list[Any]:
        async with AsyncClient(daemon.socket) as ac:
            sb = ac.sandbox(room_id)
            return list(await asyncio.gather(*(sb.exec(f"sleep 0.$((RANDOM % 3)); echo {i}")
                                               for i in range(40))))

    results = asyncio.run(go())
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(40)]


def test_requests_across_connections_and_threads(daemon: Any, room_id: str) -> None:
    outs: dict[int, str] = {}

    def worker(i: int) -> None:
        with daemon.client() as c:
            outs[i] = c.sandbox(f"{room_id}-{i % 3}").exec(f"echo {i}").stdout

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outs == {i: f"{i}\n" for i in range(12)}
    with daemon.client() as c:
        for k in range(3):
            c.sandbox(f"{room_id}-{k}").destroy()


def test_nul_in_argument_is_a_validation_error(client: Any, room_id: str) -> None:
    with pytest.raises(errors.ValidationError):
        client.sandbox(room_id).exec("echo", ["a\x00b"])
    assert client.sandbox(room_id).exec("echo still fine").stdout == "still fine\n"


def test_env_null_unsets_the_variable(client: Any, room_id: str) -> None:
    """Cloudflare's semantics: ``env: {NAME: null}`` unsets NAME (even a default one) instead of
    failing the call (issue 10, judge fidelity)."""
    sb = client.sandbox(room_id)
    r = sb.exec("echo ${HOME-unset} ${LANG-unset} ${KEEP-unset}",
                env={"HOME": None, "LANG": None, "KEEP": "kept"})
    assert r.stdout == "unset unset kept\n", r
    r = client.call("exec", {"sandboxId": room_id, "command": "printenv TMPDIR || echo none",
                             "env": {"TMPDIR": None}})
    assert r["stdout"] == "none\n"
