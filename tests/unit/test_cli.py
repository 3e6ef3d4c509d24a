"""sandboxctl through click's CliRunner, against the in-test peer of test_client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sandboxd import cli, hostsetup

try:  # rootdir-relative import when tests/ is a package, plain one otherwise
    from .test_client import FakeDaemon  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from test_client import FakeDaemon  # type: ignore[no-redef,unused-ignore]


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    with tempfile.TemporaryDirectory(prefix="sbxcli-") as d:
        fake = FakeDaemon(os.path.join(d, "d.sock")).start()
        try:
            yield fake
        finally:
            fake.stop()


def sbx(daemon: FakeDaemon | None, *args: str, input: str | None = None) -> Result:
    sock = daemon.path if daemon else "/nonexistent/sandboxd.sock"
    return CliRunner().invoke(cli.main, ["--socket", sock, *args], input=input,
                              catch_exceptions=False)


def last_exec(daemon: FakeDaemon) -> dict[str, Any]:
    params: dict[str, Any] = [r for r in daemon.requests if r["method"] == "exec"][-1]["params"]
    return params


def test_ping(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "ping")
    assert r.exit_code == 0
    assert r.stdout.startswith("pong from sandboxd 0.0-test at ")
    r = sbx(daemon, "ping", "--json")
    assert json.loads(r.stdout)["version"] == "0.0-test"


def test_exec_argv_passes_through_and_exits_with_the_command_code(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "exec", "r1", "--env", "EXIT=3", "--cwd", "/w", "--", "ls", "-l", "x y")
    assert r.exit_code == 3
    assert r.stdout == "ls -l x y\n"
    assert r.stderr == "err\n"
    sent = last_exec(daemon)
    assert (sent["command"], sent["args"], sent["cwd"]) == ("ls", ["-l", "x y"], "/w")
    assert sent["stream"] is True


def test_exec_without_double_dash_leaves_command_options_alone(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "exec", "r1", "-t", "5", "grep", "-i", "--json", "foo")
    assert r.exit_code == 0
    sent = last_exec(daemon)
    assert (sent["command"], sent["args"]) == ("grep", ["-i", "--json", "foo"])
    assert sent["timeout"] == 5000
    assert "stdin" not in sent


def test_exec_streams_stdout_and_stderr_separately(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "exec", "r1", "-e", "CHUNKS=4", "--", "x")
    assert r.exit_code == 0
    assert r.stdout == "r1:0\nr1:2\n"
    assert r.stderr == "r1:1\nr1:3\n"


def test_exec_stdin(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "exec", "-i", "r1", "--", "cat", input="hello\n")
    assert r.stdout == "cat\nhello\n"
    assert last_exec(daemon)["stdin"] == "hello\n"


def test_exec_timeout_exits_124(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "exec", "r1", "--timeout", "1", "-e", "TIMEOUT=1", "--", "sleep", "9")
    assert r.exit_code == cli.EXIT_TIMEOUT == 124
    assert "timed out" in r.stderr


def test_exec_json(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "exec", "--json", "r1", "-e", "EXIT=2", "--", "true")
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert out["exitCode"] == 2 and out["futureField"] == {"x": 1}
    assert "stream" not in last_exec(daemon)


def test_sh_sends_a_shell_line(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "sh", "r1", "echo hi | wc -c")
    assert r.exit_code == 0
    sent = last_exec(daemon)
    assert sent["command"] == "echo hi | wc -c" and "args" not in sent


def test_repl_runs_cells_in_one_context_and_deletes_it(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "repl", "r1", "--lang", "javascript", input="41 + 1\ny\nexit\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == "hi\n42\nhi\n42\n"
    assert "NameError" not in r.stdout and "tb" in r.stderr
    methods = [q["method"] for q in daemon.requests if "CodeContext" in q["method"]
               or q["method"] == "runInContext"]
    assert methods == ["createCodeContext", "runInContext", "runInContext", "deleteCodeContext"]
    cells = [q["params"]["code"] for q in daemon.requests if q["method"] == "runInContext"]
    assert cells == ["41 + 1\n", "y\n"]


def test_repl_waits_for_a_whole_python_block(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "repl", "r1", input="def f():\n    return 1\n\nf()\n")
    assert r.exit_code == 0, r.output
    cells = [q["params"]["code"] for q in daemon.requests if q["method"] == "runInContext"]
    assert cells == ["def f():\n    return 1\n\n", "f()\n"]


def test_rpc_error_is_one_line_and_exit_1(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "destroy", "ghost")
    assert r.exit_code == cli.EXIT_ERROR == 1
    assert r.stderr == "sandboxctl: error: no room ghost [SANDBOX_NOT_FOUND]\n"


def test_invalid_params_is_exit_1(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "exec", "r1", "--cwd", "", "--", "x")  # empty path: refused by the schema
    assert r.exit_code == 1
    assert "INVALID_PARAMS" in r.stderr


def test_unreachable_has_its_own_exit_code() -> None:
    r = sbx(None, "ping")
    assert r.exit_code == cli.EXIT_UNREACHABLE == 69
    assert "/nonexistent/sandboxd.sock" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sbx(None, "exec", "r1", "--", "true").exit_code == 69


@pytest.mark.parametrize("args", [
    ["exec", "r1"],                     # no command
    ["exec", "r1", "-e", "NOEQ", "--", "x"],
    ["exec", "r1", "--timeout", "0", "--", "x"],
    ["sh", "r1"],
    ["destroy"],
    ["nosuchcommand"],
])
def test_usage_errors_exit_2(daemon: FakeDaemon, args: list[str]) -> None:
    assert sbx(daemon, *args).exit_code == 2


def test_rooms_table_and_json(daemon: FakeDaemon) -> None:
    sbx(daemon, "exec", "r1", "--", "true")
    r = sbx(daemon, "rooms")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ROOM", "STATUS", "CREATED", "LAST", "ACTIVITY"]
    assert lines[1].split()[:2] == ["alpha", "ready"]
    assert "2026-11-26T20:00:00Z" in lines[1]
    assert lines[2].split() == ["r1", "ready", "-", "-"]
    r = sbx(daemon, "rooms", "--json")
    assert [s["sandboxId"] for s in json.loads(r.stdout)] == ["alpha", "r1"]


def test_destroy(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "destroy", "alpha")
    assert (r.exit_code, r.stdout) == (0, "destroyed alpha\n")
    r = sbx(daemon, "destroy", "alpha")
    assert (r.exit_code, r.stdout) == (0, "alpha: nothing to destroy\n")


def test_port_prints_the_url_lists_and_unport_is_idempotent(daemon: FakeDaemon) -> None:
    r = sbx(daemon, "port", "alpha", "8000", "--wait", "5")
    assert (r.exit_code, r.stdout) == (0, "http://127.0.0.1:48000\n")
    waited = [q["params"] for q in daemon.requests if q["method"] == "waitForPort"]
    assert waited == [{"sandboxId": "alpha", "port": 8000, "timeout": 5000}]
    r = sbx(daemon, "port", "alpha", "8001", "--unix", "--name", "db")
    assert (r.exit_code, r.stdout) == (0, "/run/ports/8001.sock\n")
    r = sbx(daemon, "port", "alpha")
    assert r.stdout == "8000\t8000\thttp://127.0.0.1:48000\n8001\tdb\t/run/ports/8001.sock\n"
    assert sbx(daemon, "unport", "alpha", "8000").exit_code == 0
    r = sbx(daemon, "unport", "alpha", "8000")
    assert r.exit_code == 0 and "was not exposed" in r.stderr
    assert sbx(daemon, "port", "alpha", "70000").exit_code == 2  # a usage error


def test_help_documents_exit_codes() -> None:
    r = CliRunner().invoke(cli.main, ["exec", "--help"])
    assert r.exit_code == 0
    for code in ("69", "124", "usage error"):
        assert code in r.stdout


def test_doctor_exit_code_follows_essential_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = [hostsetup.Check("user namespaces", True, "fine", essential=True),
              hostsetup.Check("rootfs", False, "none", "host view", essential=False)]
    monkeypatch.setattr(hostsetup, "doctor", lambda **kw: checks)
    r = sbx(None, "doctor")
    assert r.exit_code == 0
    assert "✓ user namespaces: fine" in r.stdout and "! rootfs: none" in r.stdout
    assert "cost: host view" in r.stdout
    checks.append(hostsetup.Check("overlayfs", False, "no", "no rooms", essential=True))
    r = sbx(None, "doctor", "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)[2] == {"name": "overlayfs", "ok": False, "detail": "no",
                                       "cost": "no rooms", "essential": True, "scope": "user",
                                       "skipped": False}


def test_setup_prints_actions_and_reports_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_setup(user: str, state_dir: str | None) -> list[str]:
        calls.append((user, state_dir))
        if user == "bad":
            raise hostsetup.SetupError("no such user: bad")
        return ["did a", "did b"]

    monkeypatch.setattr(hostsetup, "setup", fake_setup)
    r = sbx(None, "setup", "--user", "alice", "--state-dir", "/srv/s")
    assert (r.exit_code, r.stdout) == (0, "did a\ndid b\n")
    assert calls == [("alice", "/srv/s")]
    r = sbx(None, "setup", "--user", "bad")
    assert r.exit_code == 1 and "no such user: bad" in r.stderr
    assert sbx(None, "setup").exit_code == 2


def test_console_script_entry_runs_as_a_module(daemon: FakeDaemon) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-m", "sandboxd.cli", "--socket", daemon.path, "exec",
                          "r9", "-e", "EXIT=7", "--", "echo", "x"], capture_output=True,
                         text=True, cwd=root, timeout=60, check=False)
    assert (out.returncode, out.stdout, out.stderr) == (7, "echo x\n", "err\n")


@pytest.mark.parametrize(("wire", "code"), [
    ({"exitCode": 0}, 0),
    ({"exitCode": 300}, 300 & 0xFF),
    ({"exitCode": -1, "signal": 9}, 137),
    ({"exitCode": -1, "signal": "SIGSEGV"}, 139),
    ({"exitCode": 1, "timedOut": True}, 124),
    ({"exitCode": 137, "status": "TO"}, 124),
    ({"exitCode": -1}, 1),
])
def test_exit_status_mapping(wire: dict[str, Any], code: int) -> None:
    from sandboxd.client import ExecResult

    assert cli._exit_status(ExecResult.from_wire(wire)) == code


def test_start_ps_logs_kill(daemon: FakeDaemon) -> None:
    """The background-process commands (issue 13): start's argv and shell forms, the table,
    logs with resume offsets and -f, kill with a signal."""
    r = sbx(daemon, "start", "r1", "--name", "web", "--", "python3", "-m", "http.server")
    assert (r.exit_code, r.stdout) == (0, "web pid 7\n")
    sent = [q for q in daemon.requests if q["method"] == "startProcess"][-1]["params"]
    assert (sent["command"], sent["args"], sent["processId"]) == (
        "python3", ["-m", "http.server"], "web")
    r = sbx(daemon, "start", "r1", "while sleep 1; do date; done")
    assert r.exit_code == 0 and r.stdout.startswith("proc-2 ")
    sent = [q for q in daemon.requests if q["method"] == "startProcess"][-1]["params"]
    assert "args" not in sent  # a lone CMD is a shell line
    r = sbx(daemon, "ps", "r1")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "PID", "STATUS", "EXIT", "STARTED", "COMMAND"]
    assert lines[1].split()[:4] == ["web", "7", "running", "-"]
    r = sbx(daemon, "logs", "r1", "web", "--stdout-offset", "4")
    assert r.exit_code == 0 and r.stdout == "456789"
    assert r.stderr == "sandboxctl: --stdout-offset 10 --stderr-offset 0\n"
    r = sbx(daemon, "logs", "r1", "web", "-f")
    assert (r.stdout, r.stderr) == ("std", "stdsandboxctl: web completed, exit 0\n")
    r = sbx(daemon, "kill", "r1", "web", "-s", "9")
    assert (r.exit_code, r.stdout) == (0, "web killed (SIGTERM)\n")
    assert [q for q in daemon.requests if q["method"] == "killProcess"][-1]["params"][
        "signal"] == 9
    r = sbx(daemon, "kill", "r1", "nope")
    assert r.exit_code == 1 and "PROCESS_NOT_FOUND" in r.stderr
    assert json.loads(sbx(daemon, "ps", "r1", "--json").stdout)[0]["status"] == "killed"


def test_logs_follow_cut_short_says_where_to_resume(daemon: FakeDaemon) -> None:
    sbx(daemon, "start", "r1", "--name", "cut", "--", "sleep", "9")
    r = sbx(daemon, "--rpc-timeout", "0.5", "logs", "r1", "cut", "-f", "--stdout-offset", "5")
    assert r.exit_code == 69 and r.stdout == "std"
    assert "resume with --stdout-offset 8 --stderr-offset 3" in r.stderr
