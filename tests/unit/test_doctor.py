"""sandboxctl doctor diagnoses the daemon you run (issue 22): as root it printed nine ``!`` lines
about *root's* cgroup delegation ("cgroup v1 memory parent sandboxd/root … missing") while the
daemon scripts/run.sh started runs as ``sandboxd`` with every controller. Now it diagnoses the
user the daemon at the socket runs as (its SO_PEERCRED uid, when it answers ``ping``), or the
one ``--user`` names; the first line says which user and which daemon; host-wide checks, root's
to fix, come apart at the end; the output ends with a newline."""

from __future__ import annotations

import json
import os
import pwd
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sandboxd import cli, hostsetup, protocol

try:  # rootdir-relative import when tests/ is a package, plain one otherwise
    from .test_client import FakeDaemon  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from test_client import FakeDaemon  # type: ignore[no-redef,unused-ignore]

NOBODY = pwd.getpwuid(65534)
PING: dict[str, Any] = {
    "message": "pong", "version": "0.0-test", "capabilities": {
        "namespaces": ["user"], "cgroup": {"backend": "v1"}, "rootfs": "host",
        "idMapping": "subordinate", "idSlices": {"mode": "subordinate", "slices": 1024,
                                                 "slicesFree": 1000, "sliceSize": 4096},
        "seccomp": {"enabled": True}, "limits": ["memoryBytes", "wallTimeMs"]}}


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    with tempfile.TemporaryDirectory(prefix="sbxdoctor-") as d:
        fake = FakeDaemon(os.path.join(d, "d.sock")).start()
        try:
            yield fake
        finally:
            fake.stop()


def daemon_runs_as(monkeypatch: pytest.MonkeyPatch, uid: int) -> None:
    """The daemon at any socket answers ping and runs as ``uid`` (its SO_PEERCRED)."""
    result = protocol.PingResult.from_wire(PING)
    monkeypatch.setattr(hostsetup, "_ping", lambda socket: (result, uid, ""))


def doctor(*args: str, socket: str = "/run/test/sandboxd.sock") -> Result:
    return CliRunner().invoke(cli.main, ["--socket", socket, "doctor", *args],
                              catch_exceptions=False)


def test_the_client_learns_the_uid_the_daemon_runs_as(daemon: FakeDaemon) -> None:
    subject = hostsetup.find_subject(None, daemon.path)
    assert (subject.uid, subject.daemon_uid, subject.why) == (os.geteuid(), os.geteuid(), "you")
    assert subject.ping is not None and subject.ping.version == "0.0-test"
    assert subject.headline().endswith(f"you; sandboxd 0.0-test at {daemon.path} runs as you")


def test_doctor_diagnoses_the_user_the_daemon_runs_as(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_runs_as(monkeypatch, NOBODY.pw_uid)
    r = doctor()
    lines = r.stdout.splitlines()
    assert lines[0] == (f"sandboxctl doctor: user {NOBODY.pw_name} (uid {NOBODY.pw_uid}), the "
                        "user sandboxd 0.0-test at /run/test/sandboxd.sock runs as")
    assert r.stdout.endswith("\n") and lines[-1].startswith("essential checks ")
    assert lines[-1].endswith(NOBODY.pw_name)
    # Nothing about the caller's (root's) own delegation: every per-user check names nobody.
    assert not [line for line in lines if "sandboxd/root" in line]
    subids = next(line for line in lines if "subordinate ids" in line)
    assert NOBODY.pw_name in subids
    # The host-wide checks come apart, after the user's.
    host = lines.index("host-wide, root's to fix (sandboxctl setup, sysctls):")
    assert any(line.startswith("  ✓ kernel: ") for line in lines[host:])
    assert not any("kernel" in line for line in lines[:host])
    assert any(line.startswith(("✓ daemon:", "! daemon:")) for line in lines[1:host])
    assert "cgroup backend v1, limits: memoryBytes, wallTimeMs" in r.stdout
    # The v2 probe looks at this process's cgroup: beside a v1 daemon it is not a failure.
    assert not [line for line in lines if line.startswith("! cgroup2 delegated")]


def test_as_a_user_other_than_root_the_probes_are_listed_apart_not_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_runs_as(monkeypatch, NOBODY.pw_uid)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)  # a group member, not root, not nobody
    checks = hostsetup.doctor(socket="/run/test/sandboxd.sock")
    probes = [c for c in checks if c.name in ("user namespaces", "overlayfs in a user namespace")]
    assert len(probes) == 2
    for c in probes:
        assert (c.skipped, c.scope, c.essential) == (True, "host", True)
        assert "only root can run the probe as" in c.detail


def test_user_option_names_whom_to_diagnose(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.geteuid()
    daemon_runs_as(monkeypatch, me)
    r = doctor("--user", NOBODY.pw_name)
    first = r.stdout.splitlines()[0]
    if me == NOBODY.pw_uid:  # pragma: no cover - tests do not run as nobody
        return
    assert first.startswith(f"sandboxctl doctor: user {NOBODY.pw_name} (uid {NOBODY.pw_uid}, "
                            "as --user says); the daemon at ")
    assert first.endswith(f"runs as {pwd.getpwuid(me).pw_name} instead")
    assert "! daemon: " in r.stdout and f"not {NOBODY.pw_name}" in r.stdout


def test_without_a_daemon_the_report_is_about_you_and_says_so(tmp_path: Any) -> None:
    sock = str(tmp_path / "none.sock")
    r = doctor(socket=sock)
    me = pwd.getpwuid(os.geteuid()).pw_name
    assert r.stdout.splitlines()[0] == (
        f"sandboxctl doctor: user {me} (uid {os.geteuid()}, you); no daemon answers at {sock} "
        "(start it, or name its user with --user)")
    assert r.stdout.endswith("\n")


def test_json_carries_scope_and_ends_with_a_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_runs_as(monkeypatch, NOBODY.pw_uid)
    r = doctor("--json")
    assert r.stdout.endswith("]\n")
    checks = json.loads(r.stdout)
    assert {c["scope"] for c in checks} == {"user", "host"}
    assert next(c for c in checks if c["name"] == "kernel")["scope"] == "host"


def test_the_readme_first_screen_is_two_commands_then_what_you_see() -> None:
    """Issue 22's "done": a newcomer's first screen (24 lines) is the two commands to type and
    what they do, and the doctor and exit-code notes live further down."""
    readme = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")
    with open(readme) as f:
        screen = f.read().splitlines()[:24]
    fences = [i for i, line in enumerate(screen) if line.startswith("```")]
    assert len(fences) >= 2, screen
    block = screen[fences[0] + 1:fences[1]]
    assert block == ["./scripts/run.sh", "./scripts/test.sh"]
    after = " ".join(screen[fences[1] + 1:])
    assert "The first sets everything up" in after and "The second runs the test suite" in after
    assert "doctor" not in " ".join(screen)
