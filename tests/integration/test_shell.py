"""`sandboxctl shell` in a real terminal under tmux (issue 15): typed commands run, the size is
the window's, ^C reaches the program, the exit code comes back, the terminal is restored."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DaemonProc, skip_unless_ci

pytestmark = pytest.mark.integration

SANDBOXCTL = str(Path(sys.executable).parent / "sandboxctl")


def test_shell_under_tmux(daemon: DaemonProc, room_id: str, tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        skip_unless_ci("tmux is not installed")
    session = f"sbx-{os.getpid()}"
    after = tmp_path / "after"
    before = tmp_path / "before"
    script = tmp_path / "run.sh"
    script.write_text(f"stty -a > {before}\n{SANDBOXCTL} --socket {daemon.socket} shell "
                      f"{room_id} -- /bin/sh\necho EXIT=$? > {tmp_path}/code\n"
                      f"stty -a > {after}\nsleep 600\n")
    subprocess.run(["tmux", "-L", session, "new-session", "-d", "-x", "100", "-y", "30",
                    "-s", session, "sh", str(script)], check=True)

    def keys(*k: str) -> None:
        subprocess.run(["tmux", "-L", session, "send-keys", "-t", session, *k], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "-L", session, "capture-pane", "-p", "-t", session],
                              check=True, capture_output=True, text=True).stdout

    def wait_screen(text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in screen():
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)

    try:
        wait_screen("#")  # the room's shell prompt
        keys("echo typed-$((5*5)); stty size", "Enter")
        wait_screen("typed-25")
        wait_screen("30 100")
        keys("sleep 100", "Enter")
        time.sleep(0.5)
        keys("C-c")
        keys("echo back-$((2*4))", "Enter")
        wait_screen("back-8")  # (sleep would hold it for 100 s)
        keys("exit 5", "Enter")
        deadline = time.monotonic() + 30
        while not after.exists() or not after.read_text():
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)
        assert (tmp_path / "code").read_text().strip() == "EXIT=5"
        time.sleep(0.2)
        assert after.read_text() == before.read_text()  # raw mode undone
    finally:
        subprocess.run(["tmux", "-L", session, "kill-server"], check=False)


def test_shell_without_a_tty_says_so_and_runs_without_a_pty(daemon: DaemonProc,
                                                            room_id: str) -> None:
    got = subprocess.run([SANDBOXCTL, "--socket", daemon.socket, "shell", room_id, "--",
                          "tty; exit 4"], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    assert "stdin is not a terminal" in got.stderr
    assert got.stdout.strip() == "not a tty" and got.returncode == 4


def test_exec_tty_runs_one_command_on_a_pty_under_tmux(daemon: DaemonProc, room_id: str,
                                                       tmp_path: Path) -> None:
    if shutil.which("tmux") is None:
        skip_unless_ci("tmux is not installed")
    session = f"sbx-x-{os.getpid()}"
    script = tmp_path / "run.sh"
    # python3 -i is a REPL only on a terminal: its prompt, then the answer to a typed line
    script.write_text(f"{SANDBOXCTL} --socket {daemon.socket} exec --tty --cwd /tmp "
                      f"-e GREETING=hi {room_id} -- python3 -q -i -c 'import os, sys'\n"
                      f"echo EXIT=$? > {tmp_path}/code\nsleep 600\n")
    subprocess.run(["tmux", "-L", session, "new-session", "-d", "-x", "90", "-y", "25",
                    "-s", session, "sh", str(script)], check=True)

    def screen() -> str:
        return subprocess.run(["tmux", "-L", session, "capture-pane", "-p", "-t", session],
                              check=True, capture_output=True, text=True).stdout

    def wait_screen(text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in screen():
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)

    try:
        wait_screen(">>>")
        subprocess.run(["tmux", "-L", session, "send-keys", "-t", session,
                        "print(sys.stdin.isatty(), os.getcwd(), os.environ['GREETING'], "
                        "os.get_terminal_size().columns)", "Enter"], check=True)
        wait_screen("True /tmp hi 90")
        subprocess.run(["tmux", "-L", session, "send-keys", "-t", session, "raise SystemExit(3)",
                        "Enter"], check=True)
        deadline = time.monotonic() + 30
        while not (tmp_path / "code").exists():
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)
        assert (tmp_path / "code").read_text().strip() == "EXIT=3"
    finally:
        subprocess.run(["tmux", "-L", session, "kill-server"], check=False)
    # without a terminal, --tty says what it needs
    got = subprocess.run([SANDBOXCTL, "--socket", daemon.socket, "exec", "--tty", room_id, "--",
                          "true"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60)
    assert got.returncode == 2 and "--tty needs a terminal" in got.stderr, got
