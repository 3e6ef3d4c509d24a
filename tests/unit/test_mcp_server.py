"""sandboxctl mcp without a daemon: the missing extra's message, argument validation, clipping
at character boundaries, the bearer check, and the tools over a fake daemon connection (the real
thing is tests/integration/test_mcp.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest
from click.testing import CliRunner

import sandboxd
from sandboxd import cli, cli_mcp, errors, mcp_server


def test_without_the_extra_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.partition(".")[0] == "mcp"] + ["mcp"]:
        monkeypatch.setitem(sys.modules, name, None)  # import mcp... -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "sandboxd.mcp_server")
    monkeypatch.delattr(sandboxd, "mcp_server")  # else `from . import mcp_server` finds it
    result = CliRunner().invoke(cli.main, ["mcp"])
    assert result.exit_code == 1
    assert result.output.rstrip("\n").endswith(": pip install 'sandboxd[mcp]'")
    assert cli_mcp.INSTALL_HINT == "pip install 'sandboxd[mcp]'"
    # and the rest of the CLI does not need it
    assert CliRunner().invoke(cli.main, ["--help"]).exit_code == 0


def test_core_cli_imports_no_mcp_module() -> None:
    import subprocess

    code = ("import sys; import sandboxd.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('mcp', 'mcp_types', 'jsonschema', 'uvicorn', 'sandboxd.mcp_server')]; "
            "print(bad); sys.exit(1 if bad or 'sandboxd.mcp_server' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_validate_names_the_bad_argument() -> None:
    assert mcp_server.validate("exec", {"room": "r", "command": "ls"}) == {"room": "r",
                                                                          "command": "ls"}
    with pytest.raises(mcp_server.ToolError, match=r"invalid argument limits\.pids: "):
        mcp_server.validate("run_code", {"language": "c", "code": "", "limits": {"pids": 0}})
    with pytest.raises(mcp_server.ToolError, match="'colour' was unexpected"):
        mcp_server.validate("list_rooms", {"colour": 1})
    with pytest.raises(mcp_server.ToolError) as err:
        mcp_server.validate("nope", {})
    assert err.value.code == "UNKNOWN_TOOL"


def test_clip_text_cuts_at_a_character_boundary() -> None:
    assert mcp_server.clip_text("abc", 3) == ("abc", 3, 3)
    assert mcp_server.clip_text("aé" * 3, 5) == ("aéa", 4, 9)  # é is 2 bytes: not cut in half
    assert mcp_server.clip_text("", 10) == ("", 0, 0)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.5.0.1", True),
                                                ("localhost", True), ("::1", True),
                                                ("[::1]", True), ("0.0.0.0", False),
                                                ("10.0.0.1", False), ("example.org", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert mcp_server.is_loopback(host) is loopback


def test_bearer_auth() -> None:
    reached: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["type"])

    async def request(headers: list[tuple[bytes, bytes]], kind: str = "http") -> list[Any]:
        sent: list[Any] = []

        async def send(msg: Any) -> None:
            sent.append(msg)

        await mcp_server.BearerAuth(app, "tok")({"type": kind, "headers": headers}, None, send)
        return sent

    denied = asyncio.run(request([]))
    assert denied[0]["status"] == 401 and (b"www-authenticate", b"Bearer") in denied[0]["headers"]
    assert asyncio.run(request([(b"authorization", b"Bearer to")]))[0]["status"] == 401
    assert asyncio.run(request([(b"authorization", b"bearer tok")]))[0]["status"] == 401
    assert reached == []
    assert asyncio.run(request([(b"Authorization", b"Bearer tok")])) == []
    assert asyncio.run(request([], "lifespan")) == []
    assert reached == ["http", "lifespan"]


class FakeDaemon:
    """What Tools sends (method, params), answered from ``answers``."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, method: str, params: dict[str, Any], **kw: Any) -> Any:
        self.calls.append((method, params))
        answer = self.answers[method]
        if isinstance(answer, Exception):
            raise answer
        return answer


def _tools(answers: dict[str, Any], clip: int = 8) -> tuple[mcp_server.Tools, FakeDaemon]:
    fake = FakeDaemon(answers)
    return mcp_server.Tools(fake, clip), fake  # type: ignore[arg-type]


def test_run_code_fresh_room_destroyed_unless_clipped() -> None:
    run = {"status": "OK", "exitCode": 0, "stdout": "short\n", "stderr": "", "compile": None}
    tools, fake = _tools({"runCode": run, "destroy": {}, "writeFile": {}})
    res = asyncio.run(tools.call("run_code", {"language": "python", "code": "print()"}))
    assert not res.is_error and json.loads(res.content[0].text)["room"] is None
    room = fake.calls[0][1]["sandboxId"]
    assert room.startswith("mcp-run-") and fake.calls[1] == ("destroy", {"sandboxId": room})

    tools, fake = _tools({"runCode": {**run, "stdout": "0123456789abc"}, "destroy": {},
                          "writeFile": {}})
    out = json.loads(asyncio.run(tools.call("run_code", {"language": "py", "code": ""}))
                     .content[0].text)
    assert out["stdout"].startswith("01234567\n[sandboxd: stdout clipped: 8 of 13 bytes")
    assert out["room"] == fake.calls[0][1]["sandboxId"]
    assert [m for m, _ in fake.calls] == ["runCode", "writeFile"]  # kept, not destroyed
    assert fake.calls[1][1]["path"] == out["stdoutClipped"]["path"]


def test_daemon_errors_become_tool_errors_with_their_code() -> None:
    tools, _ = _tools({"listSandboxes": {"sandboxes": [{"sandboxId": "r"}]},
                       "exec": errors.LimitUnavailable("no pids controller", limit="pids")})
    res = asyncio.run(tools.call("exec", {"room": "r", "command": "ls"}))
    assert res.is_error
    assert res.content[0].text == 'LIMIT_UNAVAILABLE: no pids controller {"limit": "pids"}'
    res = asyncio.run(tools.call("exec", {"room": "other", "command": "ls"}))
    assert res.is_error and res.content[0].text.startswith("SANDBOX_NOT_FOUND: room 'other'")
    assert "your rooms: r" in res.content[0].text


def test_docs_tool_table_is_the_tool_list() -> None:
    """docs/mcp.md's table names every tool, in order, with exactly its arguments (``?`` for
    the optional ones)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "mcp.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \|([^|]*)\|", text, re.M)
    assert [name for name, _ in rows] == list(mcp_server.TOOL_NAMES)
    for name, cell in rows:
        schema = mcp_server.SCHEMAS[name][1]
        want = [p if p in schema["required"] else p + "?" for p in schema["properties"]]
        got = [a.strip() for a in cell.strip().strip("`").split(",") if a.strip()]
        assert sorted(got) == sorted(want), name


def test_process_output_offsets_when_the_ring_dropped_bytes() -> None:
    """The daemon's offset is where the text it sent ends; when the ring had dropped bytes the
    text starts later than asked, and the next offset must count from where it really starts."""
    rec = {"processId": "p", "status": "running"}
    logs = {"stdout": "abcdefghijkl", "stderr": "", "stdoutOffset": 100, "stderrOffset": 0,
            "truncated": True}
    tools, fake = _tools({"listSandboxes": {"sandboxes": [{"sandboxId": "r"}]},
                          "getProcess": rec, "getProcessLogs": logs})
    out = json.loads(asyncio.run(tools.call("process_output", {
        "room": "r", "processId": "p", "offset": 10})).content[0].text)
    assert out["nextOffset"] == 100 - 12 + 8 and "with offset 96 for the rest" in out["stdout"]
    assert out["stdout"].startswith("abcdefgh\n[sandboxd: stdout clipped: 8 of 12 bytes")
    assert out["nextStderrOffset"] == 0 and out["truncated"] is True
    assert fake.calls[-1][1]["stdoutOffset"] == 10


def test_a_spill_that_fails_still_returns_the_run() -> None:
    """The room's disk is full (say): the verdict and the clipped output still come back, the
    marker says why the rest is lost, and a fresh room is not kept for a file that is not
    there."""
    run = {"status": "OK", "exitCode": 0, "stdout": "0123456789abc", "stderr": "",
           "compile": None}
    tools, fake = _tools({"runCode": run, "destroy": {},
                          "writeFile": errors.QuotaExceeded("room disk full")})
    res = asyncio.run(tools.call("run_code", {"language": "py", "code": ""}))
    out = json.loads(res.content[0].text)
    assert not res.is_error and out["status"] == "OK" and out["room"] is None
    assert out["stdout"] == ("01234567\n[sandboxd: stdout clipped: 8 of 13 bytes shown, 5 cut; "
                             "the rest could not be kept in the room: QUOTA_EXCEEDED: room disk "
                             "full]")
    assert [m for m, _ in fake.calls] == ["runCode", "writeFile", "destroy"]
