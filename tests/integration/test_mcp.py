"""sandboxctl mcp against a real daemon (issue 17, "Done means"), driven by the ``mcp`` SDK's own
client: over stdio (``sandboxctl mcp --socket ...`` spawned from the test venv, as an agent config
launches it) and over Streamable HTTP on 127.0.0.1 (bearer token: missing and wrong ones get 401;
a non-loopback bind without a token is refused). Covered: initialize, the pinned tool list, every
tool, TO / ML / CE verdicts, clipped output read back by offset, a missing room, arguments the
schema refuses."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import select
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import mcp
import pytest
from conftest import SANDBOXCTL, DaemonProc
from mcp.client.streamable_http import streamable_http_client

pytestmark = pytest.mark.integration

TOOLS = ["run_code", "list_languages", "exec", "shell", "write_file", "read_file", "list_files",
         "delete_file", "create_room", "list_rooms", "destroy_room", "start_process",
         "process_output", "kill_process", "expose_port", "create_context", "run_in_context",
         "backup_room", "restore_room"]
CLIP = 1024


@asynccontextmanager
async def stdio_session(d: DaemonProc | str, *extra: str) -> AsyncIterator[Any]:
    sock = d if isinstance(d, str) else d.socket
    params = mcp.StdioServerParameters(command=SANDBOXCTL,
                                       args=["mcp", "--socket", sock, "--clip", str(CLIP),
                                             *extra])
    async with mcp.stdio_client(params) as (read, write), \
            mcp.ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def call(session: Any, tool: str, **args: Any) -> Any:
    """A tool call that must succeed: its JSON answer."""
    res = await session.call_tool(tool, args)
    text = res.content[0].text
    assert not res.is_error, f"{tool} {args}: {text}"
    return json.loads(text)


async def fails(session: Any, tool: str, **args: Any) -> str:
    """A tool call that must be a tool error (isError): its text."""
    res = await session.call_tool(tool, args)
    assert res.is_error, f"{tool} {args} did not fail: {res.content[0].text}"
    return str(res.content[0].text)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 240))


async def room_ids(session: Any) -> set[str]:
    return {r["sandboxId"] for r in await call(session, "list_rooms")}


# --- stdio ---------------------------------------------------------------------------------------


def test_initialize_and_the_pinned_tool_list(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with stdio_session(daemon) as s:
            init = await s.initialize()
            assert init.server_info.name == "sandboxd"
            tools = (await s.list_tools()).tools
            assert [t.name for t in tools] == TOOLS
            for t in tools:
                assert t.input_schema["type"] == "object", t.name
                assert t.input_schema["additionalProperties"] is False, t.name
                assert len(t.description or "") > 20, t.name
            langs = await call(s, "list_languages")
            assert any(lang["id"] == "python" and lang["available"] for lang in langs)

    run(go())


def test_run_code_verdicts_in_fresh_rooms(daemon: DaemonProc) -> None:
    async def go() -> None:
        async with stdio_session(daemon) as s:
            before = await room_ids(s)
            ok = await call(s, "run_code", language="python",
                            code="print(input()[::-1])", stdin="olleh")
            assert (ok["status"], ok["exitCode"], ok["stdout"]) == ("OK", 0, "hello\n")
            assert ok["cpuTimeMs"] is not None and ok["wallTimeMs"] is not None
            assert ok["room"] is None  # the fresh room is gone again
            re_ = await call(s, "run_code", language="python",
                             code="import sys; print('bad', file=sys.stderr); sys.exit(3)")
            assert (re_["status"], re_["exitCode"], re_["stderr"]) == ("RE", 3, "bad\n")
            to = await call(s, "run_code", language="python", code="while True: pass",
                            limits={"cpuTimeMs": 500})
            assert to["status"] == "TO" and to["timedOut"] is True
            ml = await call(s, "run_code", language="python",
                            code="x = bytearray(512 << 20); print(len(x))",
                            limits={"memoryBytes": 64 << 20})
            assert ml["status"] == "ML" and ml["stdout"] == ""
            ce = await call(s, "run_code", language="c", code="int main(void) { return x; }")
            assert ce["status"] == "CE"
            assert "error" in ce["compile"]["stderr"] and "undeclared" in ce["compile"]["stderr"]
            files = await call(s, "run_code", language="python",
                               code="print(open('data.txt').read())",
                               files={"data.txt": "from a file"})
            assert files["stdout"] == "from a file\n"
            assert await room_ids(s) == before  # every fresh room destroyed

    run(go())


def test_rooms_exec_shell_and_files(daemon: DaemonProc, room_id: str) -> None:
    async def go() -> None:
        async with stdio_session(daemon) as s:
            made = await call(s, "create_room", room=room_id,
                              limits={"memoryBytes": 256 << 20, "pids": 64})
            assert made["room"] == room_id and made["options"]["limits"]["pids"] == 64
            assert room_id in await room_ids(s)
            w = await call(s, "write_file", room=room_id, path="src/hello.txt",
                           content="héllo\nworld\n")
            assert w["bytesWritten"] == len("héllo\nworld\n".encode())
            r = await call(s, "read_file", room=room_id, path="src/hello.txt")
            assert (r["content"], r["encoding"], "more" in r) == ("héllo\nworld\n", "utf-8",
                                                                    False)
            b = await call(s, "write_file", room=room_id, path="bin", content="AAEC/w==",
                           encoding="base64")
            assert b["bytesWritten"] == 4
            rb = await call(s, "read_file", room=room_id, path="bin")
            assert (rb["content"], rb["encoding"]) == ("AAEC/w==", "base64")
            ls = await call(s, "list_files", room=room_id, path="/workspace", recursive=True)
            names = {f["relativePath"]: f["type"] for f in ls["files"]}
            assert names["src"] == "directory" and names["src/hello.txt"] == "file"
            ex = await call(s, "exec", room=room_id, command="cat", args=["src/hello.txt"],
                            cwd="/workspace")
            assert (ex["status"], ex["stdout"]) == ("OK", "héllo\nworld\n")
            env = await call(s, "exec", room=room_id, command="sh",
                             args=["-c", 'echo "$GREETING"'], env={"GREETING": "hi there"})
            assert env["stdout"] == "hi there\n"
            sh = await call(s, "shell", room=room_id, command="grep -c o src/hello.txt && "
                                                             "exit 4")
            assert (sh["status"], sh["exitCode"], sh["stdout"]) == ("RE", 4, "2\n")
            to = await call(s, "shell", room=room_id, command="sleep 30", timeout=0.5)
            assert to["status"] == "TO" and to["exitCode"] != 0
            await call(s, "delete_file", room=room_id, path="src/hello.txt")
            gone = await fails(s, "read_file", room=room_id, path="src/hello.txt")
            assert gone.startswith("FILE_NOT_FOUND: ")
            rc = await call(s, "run_code", language="python", room=room_id,
                            code="import os; print(sorted(os.listdir('/workspace')))")
            assert "'bin'" in rc["stdout"] and rc["room"] == room_id
            assert room_id in await room_ids(s)  # a given room is kept
            d = await call(s, "destroy_room", room=room_id)
            assert d == {"room": room_id, "destroyed": True}
            assert room_id not in await room_ids(s)

    run(go())


def test_clipped_outputs_say_how_to_read_the_rest(daemon: DaemonProc, room_id: str) -> None:
    big = "".join(f"line {i:05d}\n" for i in range(5000))  # 55000 bytes

    async def go() -> None:
        async with stdio_session(daemon) as s:
            await call(s, "create_room", room=room_id)
            ex = await call(s, "exec", room=room_id, command="python3",
                            args=["-c", "import sys; sys.stdout.write(''.join("
                                        "f'line {i:05d}\\n' for i in range(5000)))"])
            clip = ex["stdoutClipped"]
            assert (clip["shownBytes"], clip["totalBytes"]) == (CLIP, len(big))
            shown, _, marker = ex["stdout"].partition("\n[sandboxd: ")
            assert shown == big[:CLIP]
            assert f"{CLIP} of {len(big)} bytes shown" in marker and clip["path"] in marker
            assert f"offset {CLIP}" in marker
            # the rest, by offset, from the file named in the marker
            got, offset = shown, CLIP
            while True:
                part = await call(s, "read_file", room=room_id, path=clip["path"],
                                  offset=offset, limit=20000)
                got += part["content"]
                offset += part["bytesShown"]
                if "more" not in part:
                    break
                assert f"offset {offset}" in part["more"]
            assert got == big
            first = await call(s, "read_file", room=room_id, path=clip["path"])
            assert first["bytesShown"] == CLIP and f"offset {CLIP}" in first["more"]

            # run_code in a fresh room: the room is kept so the file can be read
            rc = await call(s, "run_code", language="python",
                            code="print('y' * 5000)")
            kept = rc["room"]
            assert kept and rc["stdoutClipped"]["room"] == kept and kept in rc["note"]
            tail = await call(s, "read_file", room=kept, path=rc["stdoutClipped"]["path"],
                              offset=4990)
            assert tail["content"] == "y" * 10 + "\n"
            await call(s, "destroy_room", room=kept)

            # a background process: the marker gives the next offset
            p = await call(s, "start_process", room=room_id, command="python3",
                           args=["-c", "print('z' * 2000, flush=True)"], processId="flood")
            assert p["processId"] == "flood"
            for _ in range(100):
                out = await call(s, "process_output", room=room_id, processId="flood")
                if out["process"]["status"] != "running":
                    break
                await asyncio.sleep(0.1)
            assert out["stdout"].startswith("z" * CLIP + "\n[sandboxd: stdout clipped")
            assert out["nextOffset"] == CLIP and f"offset {CLIP}" in out["stdout"]
            rest = await call(s, "process_output", room=room_id, processId="flood",
                              offset=out["nextOffset"])
            assert rest["stdout"] == "z" * (2000 - CLIP) + "\n"
            assert rest["nextOffset"] == 2001
            await call(s, "destroy_room", room=room_id)

    run(go())


def test_read_file_over_read_files_cap_is_read_by_parts(daemon: DaemonProc,
                                                       room_id: str) -> None:
    """A 40 MiB file: over readFile's 32 MiB cap, so read_file streams it and keeps only the
    part asked for (a spilled output can be that big with run_code's limits.outputBytes)."""
    total = 40 << 20

    async def go() -> None:
        async with stdio_session(daemon) as s:
            await call(s, "create_room", room=room_id)
            await call(s, "shell", room=room_id,
                       command=f"head -c {total} /dev/zero | tr '\\0' a > big; printf END >> big")
            end = await call(s, "read_file", room=room_id, path="big", offset=total - 2,
                             limit=100)
            assert (end["content"], end["size"], "more" in end) == ("aaEND", total + 3, False)
            mid = await call(s, "read_file", room=room_id, path="big", offset=1 << 20,
                             limit=10)
            assert mid["content"] == "a" * 10 and f"offset {(1 << 20) + 10}" in mid["more"]
            await call(s, "destroy_room", room=room_id)

    run(go())


def test_processes_ports_and_backups(daemon: DaemonProc, room_id: str) -> None:
    async def go() -> None:
        async with stdio_session(daemon) as s:
            await call(s, "create_room", room=room_id)
            await call(s, "write_file", room=room_id, path="site/index.html",
                       content="served from the room\n")
            p = await call(s, "start_process", room=room_id, command="python3",
                           args=["-m", "http.server", "8000", "-d", "site"], processId="web")
            assert p["status"] == "running"
            exposed = await call(s, "expose_port", room=room_id, port=8000)
            url = exposed["url"]
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
            body = None
            for _ in range(100):
                try:
                    with urllib.request.urlopen(url + "/index.html", timeout=5) as resp:
                        body = resp.read()
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            assert body == b"served from the room\n"
            out = await call(s, "process_output", room=room_id, processId="web")
            assert "GET /index.html" in out["stderr"]
            killed = await call(s, "kill_process", room=room_id, processId="web")
            assert killed["processId"] == "web"
            for _ in range(100):
                rec = (await call(s, "process_output", room=room_id, processId="web"))["process"]
                if rec["status"] != "running":
                    break
                await asyncio.sleep(0.1)
            assert rec["status"] == "killed"
            missing = await fails(s, "process_output", room=room_id, processId="nope")
            assert missing.startswith("PROCESS_NOT_FOUND: ")

            backup = await call(s, "backup_room", room=room_id, name="before")
            assert backup["backupId"] and backup["sizeBytes"] > 0
            await call(s, "delete_file", room=room_id, path="site/index.html")
            restored = await call(s, "restore_room", room=room_id, backupId=backup["backupId"])
            assert restored["backupId"] == backup["backupId"]
            back = await call(s, "read_file", room=room_id, path="site/index.html")
            assert back["content"] == "served from the room\n"
            bad = await fails(s, "restore_room", room=room_id, backupId="no-such-backup")
            assert bad.startswith("BACKUP_NOT_FOUND: ")
            await call(s, "destroy_room", room=room_id)

    run(go())


def test_contexts_keep_state_and_return_images_as_images(daemon: DaemonProc,
                                                         room_id: str) -> None:
    async def go() -> None:
        async with stdio_session(daemon) as s:
            await call(s, "create_room", room=room_id)
            ctx = await call(s, "create_context", room=room_id, language="python")
            cid = ctx["contextId"]

            async def cell(code: str) -> Any:
                res = await s.call_tool("run_in_context",
                                        {"room": room_id, "contextId": cid, "code": code})
                assert not res.is_error, res.content[0].text
                return res.content
            await cell("import base64\nx = 41")
            out = await cell("print('side'); x + 1")
            texts = [c.text for c in out if c.type == "text"]
            assert texts[0] == "[stdout]\nside\n" and "42" in texts, texts
            # a PNG display comes back as an MCP image, decodable as a PNG
            png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGA"
                   "hKmMIQAAAABJRU5ErkJggg==")
            out = await cell("from IPython.display import Image, display\n"
                             f"display(Image(data=base64.b64decode('{png}')))")
            images = [c for c in out if c.type == "image"]
            assert len(images) == 1 and images[0].mime_type == "image/png"
            assert base64.b64decode(images[0].data).startswith(b"\x89PNG")
            # the user's error is a normal result with its traceback, the state survives it
            out = await cell("1 / 0")
            texts = [c.text for c in out if c.type == "text"]
            assert any(t.startswith("[error] ZeroDivisionError") for t in texts), texts
            assert any('"error": true' in t for t in texts)
            assert any("41" in t for t in
                       [c.text for c in await cell("x") if c.type == "text"])
            missing = await fails(s, "run_in_context", room=room_id, contextId="nope", code="1")
            assert missing.startswith("CONTEXT_NOT_FOUND: "), missing
            await call(s, "destroy_room", room=room_id)

    run(go())


def test_errors_missing_room_and_bad_arguments(daemon: DaemonProc, room_id: str) -> None:
    async def go() -> None:
        async with stdio_session(daemon) as s:
            for tool, args in [("exec", {"command": "true"}), ("shell", {"command": "true"}),
                               ("read_file", {"path": "x"}),
                               ("run_code", {"language": "python", "code": "1"})]:
                text = await fails(s, tool, room=room_id, **args)
                assert text.startswith(f"SANDBOX_NOT_FOUND: room '{room_id}' does not exist")
                assert "create_room" in text
            assert room_id not in await room_ids(s)  # and it was not created by the attempt

            bad = await fails(s, "run_code", language="python", code="1",
                              limits={"cpuTimeMs": "fast"})
            assert bad.startswith("INVALID_ARGUMENT: invalid argument limits.cpuTimeMs: ")
            assert "'fast' is not of type 'integer'" in bad
            extra = await fails(s, "run_code", language="python", code="1", lang="python")
            assert extra.startswith("INVALID_ARGUMENT: ") and "'lang'" in extra
            missing = await fails(s, "exec", room=room_id)
            assert "'command' is a required property" in missing
            badroom = await fails(s, "create_room", room="../etc")
            assert badroom.startswith("INVALID_ARGUMENT: invalid argument room: ")
            unknown = await fails(s, "rm_rf")
            assert unknown.startswith("UNKNOWN_TOOL: ") and "run_code" in unknown

            # the daemon's own refusals come back with its code
            lang = await fails(s, "run_code", language="cobol", code="1")
            assert lang.startswith("UNSUPPORTED_LANGUAGE: ")
            net = await fails(s, "create_room", room=room_id,
                              network={"allow": ["pypi.org:http"]})
            assert net.startswith("VALIDATION_FAILED: ") and "pypi.org:http" in net
            schema = await fails(s, "create_room", room=room_id, network={"allow": "pypi.org"})
            assert schema.startswith("INVALID_ARGUMENT: ") and "network" in schema

    run(go())


def test_an_unreachable_daemon_is_a_tool_error(tmp_path: Path) -> None:
    async def go() -> None:
        async with stdio_session(str(tmp_path / "no.sock")) as s:
            assert len((await s.list_tools()).tools) == len(TOOLS)
            text = await fails(s, "run_code", language="python", code="print(1)")
            assert text.startswith("DAEMON_UNREACHABLE: ") and "no.sock" in text

    run(go())


# --- Streamable HTTP -----------------------------------------------------------------------------


def _start_http(d: DaemonProc, *args: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """``sandboxctl mcp --http ...`` started: the process, its URL and what it said first."""
    proc = subprocess.Popen([SANDBOXCTL, "mcp", "--socket", d.socket, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            if m := re.search(rb"at (http://\S+/mcp)\n", seen):
                return proc, m.group(1).decode(), seen.decode()
    proc.kill()
    proc.wait(30)
    proc.stderr.close()
    raise AssertionError(f"sandboxctl mcp --http did not start: {seen.decode()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)
    assert proc.stderr is not None
    proc.stderr.close()


def test_http_transport_with_a_bearer_token(daemon: DaemonProc, tmp_path: Path) -> None:
    token = "s3cret-" + os.urandom(8).hex()
    (tmp_path / "token").write_text(token + "\n")
    proc, url, _ = _start_http(daemon, "--http", "127.0.0.1:0", "--token-file",
                            str(tmp_path / "token"))

    async def go() -> None:
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "0"}}}
        headers = {"Accept": "application/json, text/event-stream"}
        async with httpx2.AsyncClient() as raw:
            none = await raw.post(url, json=init, headers=headers)
            wrong = await raw.post(url, json=init,
                                   headers={**headers, "Authorization": "Bearer " + token[:-1]})
            assert (none.status_code, wrong.status_code) == (401, 401)
            assert none.headers["www-authenticate"] == "Bearer"
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                                      timeout=120) as http, \
                streamable_http_client(url, http_client=http) as (read, write), \
                mcp.ClientSession(read, write) as s:
            await s.initialize()
            assert [t.name for t in (await s.list_tools()).tools] == TOOLS
            ok = await call(s, "run_code", language="python", code="print(6 * 7)")
            assert (ok["status"], ok["stdout"]) == ("OK", "42\n")

    try:
        run(go())
    finally:
        _stop(proc)


def test_http_generated_token_and_non_loopback_refused(daemon: DaemonProc) -> None:
    refused = subprocess.run([SANDBOXCTL, "mcp", "--socket", daemon.socket, "--http",
                              "0.0.0.0:0"], capture_output=True, timeout=60,
                             env={k: v for k, v in os.environ.items()
                                  if k != "SANDBOXD_MCP_TOKEN"})
    assert refused.returncode == 2
    assert b"not a loopback address" in refused.stderr and b"--token-file" in refused.stderr
    proc, url, said = _start_http(daemon, "--http", "127.0.0.1:0")
    try:
        assert url.startswith("http://127.0.0.1:")
        m = re.search(r"bearer token: (\S+)\n", said)
        assert m, said
        init = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                           "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                      "clientInfo": {"name": "t", "version": "0"}}}).encode()
        headers = {"Accept": "application/json, text/event-stream",
                   "Content-Type": "application/json"}
        req = urllib.request.Request(url, data=init, method="POST", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
        err.value.close()
        req = urllib.request.Request(url, data=init, method="POST",
                                     headers={**headers, "Authorization": f"Bearer {m[1]}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200 and b'"serverInfo"' in resp.read()
    finally:
        _stop(proc)
