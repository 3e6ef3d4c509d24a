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


class Tmux:
    """A detached tmux server running ``script`` in a window of ``cols`` x ``rows``."""

    def __init__(self, name: str, script: Path, cols: int, rows: int) -> None:
        if shutil.which("tmux") is None:
            skip_unless_ci("tmux is not installed")
        self.name = name
        subprocess.run(["tmux", "-L", name, "new-session", "-d", "-x", str(cols), "-y",
                        str(rows), "-s", name, "sh", str(script)], check=True)

    def keys(self, *k: str) -> None:
        subprocess.run(["tmux", "-L", self.name, "send-keys", "-t", self.name, *k], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "-L", self.name, "capture-pane", "-p", "-t", self.name],
                              check=True, capture_output=True, text=True).stdout

    def wait_screen(self, text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in self.screen():
            assert time.monotonic() < deadline, self.screen()
            time.sleep(0.1)

    def wait_file(self, path: Path) -> None:
        """Until ``path`` exists and is not empty (the script wrote it)."""
        deadline = time.monotonic() + 30
        while not path.exists() or not path.read_text():
            assert time.monotonic() < deadline, self.screen()
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.name, "kill-server"], check=False)


def test_shell_under_tmux(daemon: DaemonProc, room_id: str, tmp_path: Path) -> None:
    after = tmp_path / "after"
    before = tmp_path / "before"
    script = tmp_path / "run.sh"
    script.write_text(f"stty -a > {before}\n{SANDBOXCTL} --socket {daemon.socket} shell "
                      f"{room_id} -- /bin/sh\necho EXIT=$? > {tmp_path}/code\n"
                      f"stty -a > {after}\nsleep 600\n")
    t = Tmux(f"sbx-{os.getpid()}", script, 100, 30)
    keys, wait_screen = t.keys, t.wait_screen
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
        t.wait_file(after)
        assert (tmp_path / "code").read_text().strip() == "EXIT=5"
        time.sleep(0.2)
        assert after.read_text() == before.read_text()  # raw mode undone
    finally:
        t.close()


def test_shell_without_a_tty_says_so_and_runs_without_a_pty(daemon: DaemonProc,
                                                            room_id: str) -> None:
    got = subprocess.run([SANDBOXCTL, "--socket", daemon.socket, "shell", room_id, "--",
                          "tty; exit 4"], stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=60)
    assert "stdin is not a terminal" in got.stderr
    assert got.stdout.strip() == "not a tty" and got.returncode == 4


def test_exec_tty_runs_one_command_on_a_pty_under_tmux(daemon: DaemonProc, room_id: str,
                                                       tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    # python3 -i is a REPL only on a terminal: its prompt, then the answer to a typed line
    script.write_text(f"{SANDBOXCTL} --socket {daemon.socket} exec --tty --cwd /tmp "
                      f"-e GREETING=hi {room_id} -- python3 -q -i -c 'import os, sys'\n"
                      f"echo EXIT=$? > {tmp_path}/code\nsleep 600\n")
    t = Tmux(f"sbx-x-{os.getpid()}", script, 90, 25)
    try:
        t.wait_screen(">>>")
        t.keys("print(sys.stdin.isatty(), os.getcwd(), os.environ['GREETING'], "
               "os.get_terminal_size().columns)", "Enter")
        t.wait_screen("True /tmp hi 90")
        t.keys("raise SystemExit(3)", "Enter")
        t.wait_file(tmp_path / "code")
        assert (tmp_path / "code").read_text().strip() == "EXIT=3"
    finally:
        t.close()
    # without a terminal, --tty says what it needs
    got = subprocess.run([SANDBOXCTL, "--socket", daemon.socket, "exec", "--tty", room_id, "--",
                          "true"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=60)
    assert got.returncode == 2 and "--tty needs a terminal" in got.stderr, got
