"""rootfs/build.sh shows its progress (issue 22): one line per step with the time since the start,
and on a terminal mmdebstrap's chatter goes to DEST.build.log (its phases stay on screen, as
steps). Run against a stand-in mmdebstrap on PATH, which prints what the real one prints (its
"I:" phase lines among apt's chatter) and makes the tree's manifest; no network, no Debian."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import skip_unless_ci

BUILD_SH = Path(__file__).resolve().parents[2] / "rootfs" / "build.sh"
STEP = re.compile(r"^build\.sh: \[\d+:\d\d\] (.*)$")

FAKE_MMDEBSTRAP = """#!/bin/sh
for target; do :; done  # the last argument: the tree to build (no mirror is given)
echo "I: automatically chosen format: directory" >&2
echo "I: running apt-get update..." >&2
echo "Get:1 http://deb.example trixie InRelease [fake chatter]"
echo "I: downloading packages with apt..." >&2
echo "Unpacking fake-chatter (1.0) ..."
echo "I: running --customize-hook in shell: sh -c '...'" >&2
mkdir -p "$target/etc/sandboxd"
echo '{"os": "fake"}' > "$target/etc/sandboxd/manifest.json"
echo "I: success in 0.1 seconds" >&2
"""


@pytest.fixture
def fake_path(tmp_path: Path) -> str:
    if os.geteuid() != 0:
        skip_unless_ci("rootfs/build.sh --mode root (the stand-in build) needs root")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mmdebstrap"
    fake.write_text(FAKE_MMDEBSTRAP)
    fake.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def steps(text: str) -> list[str]:
    return [m.group(1) for line in text.splitlines() if (m := STEP.match(line.rstrip()))]


def test_build_sh_prints_a_line_per_step_with_elapsed_time(fake_path: str,
                                                          tmp_path: Path) -> None:
    """Not a terminal (CI, a pipe): the steps, and mmdebstrap's own output passed through."""
    dest = tmp_path / "tree"
    res = subprocess.run([str(BUILD_SH), str(dest)], capture_output=True, text=True,
                         env={**os.environ, "PATH": fake_path}, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    got = steps(res.stderr)
    assert got[0].startswith("building trixie into ") and "mode root" in got[0]
    assert "mmdebstrap done" in got and "swapping the new tree in" in got
    assert got[-1].startswith("done in ") and str(dest) in got[-1]
    assert "I: running apt-get update..." in res.stderr  # passed through as it is
    assert "fake chatter" in res.stdout + res.stderr
    assert (dest / "etc" / "sandboxd" / "manifest.json").is_file()
    assert not Path(f"{dest}.build.log").exists()


def on_a_terminal(command: str, tmp_path: Path) -> tuple[str, str]:
    """Run ``command`` in a real terminal (tmux); (its exit status line, the screen)."""
    if shutil.which("tmux") is None:
        skip_unless_ci("tmux is not installed (scripts/deps.sh installs it)")
    done = tmp_path / "rc"
    session = f"sbxrootfs{os.getpid()}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "40",
                    f"{command}; echo rc=$? > {done}; sleep 60"], check=True)
    try:
        for _ in range(1200):  # bounded by the build itself; no figure is asserted
            if done.exists() and done.read_text().strip():
                break
            time.sleep(0.1)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    return done.read_text().strip(), screen


def test_build_sh_on_a_terminal_shows_steps_and_logs_the_chatter(fake_path: str,
                                                                 tmp_path: Path) -> None:
    dest = tmp_path / "tree"
    rc, screen = on_a_terminal(f"PATH={fake_path} {BUILD_SH} {dest}", tmp_path)
    assert rc == "rc=0", screen
    got = steps(screen)
    log = Path(f"{dest}.build.log")
    assert f"mmdebstrap's output: {log}" in got, screen
    for phase in ("running apt-get update...", "downloading packages with apt...",
                  "success in 0.1 seconds"):
        assert f"mmdebstrap: {phase}" in got, screen
    assert got[-1].startswith("done in "), screen
    # Every line on the screen is a step: the chatter is in the log only.
    assert all(STEP.match(line) for line in screen.splitlines() if line.strip()), screen
    assert "fake chatter" in log.read_text() and "fake chatter" not in screen


def test_build_sh_on_a_terminal_shows_the_log_when_mmdebstrap_fails(fake_path: str,
                                                                   tmp_path: Path) -> None:
    fake = Path(fake_path.split(":")[0]) / "mmdebstrap"
    fake.write_text(FAKE_MMDEBSTRAP.replace('mkdir -p "$target', 'echo "E: fake failure" >&2\n'
                                            'exit 1\nmkdir -p "$target'))
    dest = tmp_path / "tree"
    rc, screen = on_a_terminal(f"PATH={fake_path} {BUILD_SH} {dest}", tmp_path)
    assert rc == "rc=1", screen
    assert "mmdebstrap: E: fake failure" in steps(screen)
    assert f"mmdebstrap failed; the end of {dest}.build.log:" in steps(screen)
    assert "Unpacking fake-chatter (1.0) ..." in screen  # the log's tail
    assert not dest.exists()
