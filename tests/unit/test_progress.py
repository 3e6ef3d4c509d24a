"""Progress of long operations and typed results of the client's composite calls (issue 22).

``sandboxctl cp`` shows the bytes moved and the rate on stderr only when stderr is a terminal:
checked in a real terminal under tmux, and through click's runner (not a terminal: nothing but
the summary line). ``copy_to``/``copy_from`` return typed results (they returned dicts) that
still read as dicts, and report progress to a callback."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import skip_unless_ci

from sandboxd import cli, protocol
from sandboxd.cli_base import Progress, human_bytes
from sandboxd.client import Client, CopyFromResult, CopyToResult, RunCodeResult

try:  # rootdir-relative import when tests/ is a package, plain one otherwise
    from .test_client import FakeDaemon  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from test_client import FakeDaemon  # type: ignore[no-redef,unused-ignore]

ROOT = Path(__file__).resolve().parents[2]


class TarDaemon(FakeDaemon):
    """The test peer, whose ``tar -c -f ARCHIVE -C DIR -- NAME`` writes a real archive of one
    file NAME (its content: ``self.payload``) into its file store, as the room's tar would."""

    payload = b"x" * 100_000

    async def m_exec(self, p: protocol.ExecParams, rid: Any, send: Any) -> dict[str, Any]:
        args = p.args or []
        if p.command == "tar" and args[:1] == ["-c"]:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tf:
                info = tarfile.TarInfo(args[-1])
                info.size = len(self.payload)
                tf.addfile(info, io.BytesIO(self.payload))
            self.files[args[2]] = buf.getvalue()
        return await super().m_exec(p, rid, send)


@pytest.fixture
def daemon() -> Iterator[TarDaemon]:
    with tempfile.TemporaryDirectory(prefix="sbxprogress-") as d:
        fake = TarDaemon(os.path.join(d, "d.sock")).start()
        try:
            yield fake
        finally:
            fake.stop()


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_only_on_a_terminal() -> None:
    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress("cp", stream, every=0)
        p(1024)
        p(3 << 20)
        p.finish()
    assert pipe.getvalue() == ""
    shown = tty.getvalue()
    assert shown.count("\r\x1b[K") == 3 and shown.endswith("\n")
    assert "sandboxctl: cp: 1.0 KiB (" in shown
    assert re.search(r"sandboxctl: cp: 3\.0 MiB in \d+\.\d s \([\d.]+ \w+/s\)\n$", shown)
    assert human_bytes(512) == "512 bytes" and human_bytes(5 << 30) == "5.0 GiB"


def test_copy_results_are_typed_and_read_as_dicts(daemon: TarDaemon, tmp_path: Path) -> None:
    src = tmp_path / "project"
    src.mkdir()
    (src / "a.txt").write_bytes(b"y" * 50_000)
    seen: list[int] = []
    with Client(daemon.path) as c:
        up = c.sandbox("r1").copy_to(str(src), "/workspace", progress=seen.append)
        assert isinstance(up, CopyToResult)
        assert up.bytes == up["bytes"] == seen[-1] > 50_000
        down_seen: list[int] = []
        down = c.sandbox("r1").copy_from("/workspace/out.bin", str(tmp_path / "back"),
                                         progress=down_seen.append)
        assert isinstance(down, CopyFromResult)
        assert (down.files, down["bytes"], down.skipped) == (1, len(TarDaemon.payload), 0)
        assert down_seen and down_seen == sorted(down_seen)
        assert (tmp_path / "back" / "out.bin").read_bytes() == TarDaemon.payload
        res = c.sandbox("r1").run_code("c", "int main(){}", stdin="x")
        assert isinstance(res, RunCodeResult) and res.stdout == res["stdout"] == "X"


def test_cp_prints_no_progress_when_stderr_is_not_a_terminal(daemon: TarDaemon,
                                                              tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"z" * 10_000)
    r = CliRunner().invoke(cli.main, ["--socket", daemon.path, "cp", str(tmp_path / "f"),
                                      "r1:/workspace"], catch_exceptions=False)
    assert r.exit_code == 0
    assert re.fullmatch(r"copied \d+ bytes of archive into r1:/workspace\n", r.stderr)
    r = CliRunner().invoke(cli.main, ["--socket", daemon.path, "cp", "r1:/workspace/out.bin",
                                      str(tmp_path / "back")], catch_exceptions=False)
    assert r.exit_code == 0
    assert r.stderr == (f"copied 1 files, 0 directories, 0 symlinks "
                        f"({len(TarDaemon.payload)} bytes) to {tmp_path / 'back'}\n")


def test_top_once_reads_the_typed_stats(daemon: TarDaemon) -> None:
    r = CliRunner().invoke(cli.main, ["--socket", daemon.path, "top", "--once"],
                           catch_exceptions=False)
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].split()[:3] == ["ROOM", "RUNS", "CPU%"]
    assert r.stdout.splitlines()[1].split()[:4] == ["alpha", "0", "-", "0.0s"]


def test_cp_on_a_terminal_shows_bytes_and_rate(daemon: TarDaemon, tmp_path: Path) -> None:
    """A real terminal: tmux runs sandboxctl cp of 9 MiB (three 4 MiB pieces) into the room."""
    if shutil.which("tmux") is None:
        skip_unless_ci("tmux is not installed (scripts/deps.sh installs it)")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(9 << 20))
    done = tmp_path / "done"
    session = f"sbxcp{os.getpid()}"
    command = (f"{sys.executable} -m sandboxd.cli --socket {daemon.path} cp {src} r1:/workspace;"
               f" echo rc=$? > {done}; sleep 60")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "20",
                    command], check=True, cwd=ROOT, env={**os.environ, "TERM": "xterm"})
    try:
        for _ in range(600):  # the copy's own time bounds this; no figure is asserted
            if done.exists() and done.read_text().strip():
                break
            time.sleep(0.1)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                capture_output=True, text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    assert done.read_text().strip() == "rc=0", screen
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    assert re.fullmatch(r"sandboxctl: cp: 9\.\d MiB in \d+\.\d s \([\d.]+ \w+/s\)", lines[0]), \
        screen
    assert re.fullmatch(r"copied \d+ bytes of archive into r1:/workspace", lines[1]), screen
