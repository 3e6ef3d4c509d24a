"""sandboxctl exec/sh say which limit ended a command (issue 22): ``--memory 64M`` and a
200 MiB bytearray exited 137 and printed nothing, so a limit looked like a crash. Now one line on
stderr names it, with or without ``--report``; the exit code of each verdict is documented in
--help (and docs/limits.md) and these tests hold the code to it."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sandboxd import cli, protocol

try:  # rootdir-relative import when tests/ is a package, plain one otherwise
    from .test_client import FakeDaemon  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from test_client import FakeDaemon  # type: ignore[no-redef,unused-ignore]

# What the daemon reports for each verdict (runs.verdict), as the wire carries it.
VERDICTS: dict[str, dict[str, Any]] = {
    "OK": {"status": "OK", "exitCode": 0},
    "RE": {"status": "RE", "exitCode": 3},
    "SG": {"status": "SG", "exitCode": 139, "signal": "SIGSEGV"},
    "TO-wall": {"status": "TO", "exitCode": 124, "timedOut": True, "limitExceeded": "wall",
                "signal": "SIGKILL"},
    "TO-cpu": {"status": "TO", "exitCode": 124, "timedOut": True, "limitExceeded": "cpu",
               "signal": "SIGKILL"},
    "ML": {"status": "ML", "exitCode": 137, "signal": "SIGKILL", "oomKilled": True,
           "limitExceeded": "memory"},
    "OL": {"status": "OL", "exitCode": 137, "signal": "SIGKILL", "outputTruncated": True,
           "limitExceeded": "output"},
    "XFSZ": {"status": "SG", "exitCode": 153, "signal": "SIGXFSZ",
             "limitExceeded": "fileSize"},
    "XX": {"status": "XX", "exitCode": 1, "error": "payload set-up failed at setresuid: EPERM"},
}


class VerdictDaemon(FakeDaemon):
    """The test peer, answering exec with the verdict named by the VERDICT variable."""

    async def m_exec(self, p: protocol.ExecParams, rid: Any, send: Any) -> dict[str, Any]:
        wire = VERDICTS[(p.env or {})["VERDICT"]]
        return {"success": wire["status"] == "OK", "stdout": "", "stderr": "",
                "command": p.command, "duration": 5, "timestamp": "2026-12-03T08:00:00Z",
                "cpuTimeMs": 41, "wallTimeMs": 110, "memoryPeakBytes": 64 << 20, **wire}


@pytest.fixture
def daemon() -> Iterator[VerdictDaemon]:
    with tempfile.TemporaryDirectory(prefix="sbxverdict-") as d:
        fake = VerdictDaemon(os.path.join(d, "d.sock")).start()
        try:
            yield fake
        finally:
            fake.stop()


def run(daemon: FakeDaemon, verdict: str, *opts: str, sh: bool = False) -> Result:
    cmd = (["sh", "r1", "x"] if sh else ["exec", "r1"]) + ["-e", f"VERDICT={verdict}", *opts]
    if not sh:
        cmd += ["--", "python3", "-c", "x"]
    return CliRunner().invoke(cli.main, ["--socket", daemon.path, *cmd],
                              catch_exceptions=False)


@pytest.mark.parametrize(("verdict", "opts", "line", "code"), [
    ("ML", ["--memory", "64M"], "sandboxctl: killed: memory limit 64 MiB exceeded (ML)", 137),
    ("ML", [], "sandboxctl: killed: memory limit exceeded (ML)", 137),
    ("TO-wall", ["--timeout", "2"], "sandboxctl: killed: timed out after 2 s (TO)", 124),
    ("TO-cpu", ["--cpu-time", "0.3"], "sandboxctl: killed: CPU time limit 0.3 s exceeded (TO)",
     124),
    ("OL", ["--output-limit", "1M"], "sandboxctl: killed: output limit 1 MiB exceeded (OL)", 137),
    ("XFSZ", [], "sandboxctl: killed: file size limit exceeded (SG)", 153),
    ("XX", [], "sandboxctl: the sandbox failed, not the command: payload set-up failed at "
               "setresuid: EPERM (XX)", 1),
])
def test_a_limit_that_ends_the_command_is_named_on_stderr(
        daemon: VerdictDaemon, verdict: str, opts: list[str], line: str, code: int) -> None:
    for sh in (False, True):
        r = run(daemon, verdict, *opts, sh=sh)
        assert (r.exit_code, r.stderr, r.stdout) == (code, line + "\n", "")
    # --report adds its status line after it; --json (the whole result on stdout) adds nothing.
    r = run(daemon, verdict, *opts, "--report")
    assert r.stderr.splitlines()[0] == line
    assert r.stderr.splitlines()[1].startswith("sandboxctl: status=")
    r = run(daemon, verdict, *opts, "--json")
    assert r.stderr == "" and r.exit_code == code


@pytest.mark.parametrize("verdict", ["OK", "RE", "SG"])
def test_a_command_that_ended_by_itself_gets_no_line(daemon: VerdictDaemon, verdict: str) -> None:
    r = run(daemon, verdict)
    assert r.stderr == ""


def _documented() -> dict[str, str]:
    """Verdict -> the code's text, from the exec/sh --help table."""
    part = cli.EXEC_EXIT_CODES_HELP.split("by verdict", 1)[1]
    return dict(re.findall(r"^  (OK|RE|SG|TO|ML|OL|XX)  (.*)$", part, re.M))


def test_the_exit_code_of_each_verdict_is_documented_and_holds(daemon: VerdictDaemon) -> None:
    table = _documented()
    assert set(table) == {"OK", "RE", "SG", "TO", "ML", "OL", "XX"}
    for verdict, wire in VERDICTS.items():
        doc = table[wire["status"]]
        code = run(daemon, verdict).exit_code
        if verdict == "RE":
            assert code == wire["exitCode"] and "own code" in doc
        elif verdict in ("SG", "XFSZ"):
            assert code == wire["exitCode"] and doc.startswith("128+N")
        else:
            assert doc.split()[0].rstrip(",") == str(code), (verdict, doc, code)
    for command in ("exec", "sh"):
        out = CliRunner().invoke(cli.main, [command, "--help"]).output
        assert "by verdict" in out and "ML  137" in out
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "limits.md")) as f:
        docs = f.read()
    for verdict, text in table.items():
        assert f"| `{verdict}` | {text} |" in docs, verdict
