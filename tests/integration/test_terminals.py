"""Terminals from the wire (issue 15, "Done means", the pty half): a real pty of the room's
devpts (tty is /dev/pts/N), the size follows resizeTerminal, ^C interrupts, full-screen programs
run, output is binary-safe, a re-attach replays, a detached terminal is closed after its grace,
closeTerminal and destroy leave nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProc, make_daemon, skip_unless_ci

from sandboxd import errors

pytestmark = pytest.mark.integration


class Wire:
    """A raw JSON-RPC connection: answers by id, terminal notifications by terminal id."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.ids = iter(range(1, 1 << 30))
        self.answers: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.output: dict[str, bytearray] = {}
        self.exits: dict[str, dict[str, Any]] = {}
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                with self.changed:
                    if msg.get("method") == "terminal.output":
                        p = msg["params"]
                        self.output.setdefault(p["terminalId"], bytearray()).extend(
                            base64.b64decode(p["data"]))
                    elif msg.get("method") == "terminal.exit":
                        self.exits[msg["params"]["terminalId"]] = msg["params"]
                    elif "id" in msg:
                        self.answers.setdefault(msg["id"], queue.Queue()).put(msg)
                    self.changed.notify_all()

    def call(self, method: str, **params: Any) -> Any:
        rid = next(self.ids)
        with self.changed:
            q = self.answers.setdefault(rid, queue.Queue())
        self.sock.sendall(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                      "params": params}).encode() + b"\n")
        msg = q.get(timeout=60)
        if "error" in msg:
            raise RuntimeError(msg["error"]["data"]["code"] if msg["error"].get("data")
                               else msg["error"])
        return msg["result"]

    def write(self, tid: str, data: bytes) -> None:
        self.call("writeTerminal", terminalId=tid, data=base64.b64encode(data).decode())

    def wait_output(self, tid: str, pattern: bytes, timeout: float = 30) -> bytes:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not re.search(pattern, bytes(self.output.get(tid, b""))):
                left = deadline - time.monotonic()
                assert left > 0, f"no {pattern!r} in {bytes(self.output.get(tid, b''))!r}"
                self.changed.wait(left)
            return bytes(self.output[tid])

    def wait_exit(self, tid: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while tid not in self.exits:
                left = deadline - time.monotonic()
                assert left > 0, f"no exit of {tid}"
                self.changed.wait(left)
            return self.exits[tid]

    def close(self) -> None:
        # (shutdown first: close() alone leaves the reader thread's recv holding the socket
        # open, and the daemon would never see the client go)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def wire(daemon: DaemonProc) -> Any:
    w = Wire(daemon.socket)
    yield w
    w.close()


def test_a_terminal_is_a_pty_of_the_room_and_follows_resize(wire: Wire, room_id: str) -> None:
    t = wire.call("openTerminal", sandboxId=room_id, command="/bin/sh", args=[],
                  cols=100, rows=30)
    tid = t["terminalId"]
    assert re.fullmatch(r"/dev/pts/\d+", t["tty"])
    wire.write(tid, b"tty; stty size; echo END1\n")
    out = wire.wait_output(tid, rb"\nEND1\r\n")
    assert re.search(rb"/dev/pts/\d+\r\n30 100\r\n", out), out
    wire.call("resizeTerminal", terminalId=tid, cols=132, rows=43)
    wire.write(tid, b"stty size; echo END2\n")
    assert b"43 132\r\n" in wire.wait_output(tid, rb"\nEND2\r\n")
    # The program is the session leader with the pty as its controlling terminal.
    wire.write(tid, b"ps -o pid,sid,tty -p $$ | tail -1; echo END3\n")
    assert re.search(rb"(\d+)\s+\1\s+pts/\d+", wire.wait_output(tid, rb"\nEND3\r\n"))
    wire.write(tid, b"exit 7\n")
    assert wire.wait_exit(tid)["exitCode"] == 7
    with pytest.raises(RuntimeError, match="TERMINAL_NOT_FOUND"):
        wire.call("writeTerminal", terminalId=tid, data="eA==")
    wire.call("destroy", sandboxId=room_id)


def test_ctrl_c_interrupts_and_output_is_binary_safe(wire: Wire, room_id: str) -> None:
    tid = wire.call("openTerminal", sandboxId=room_id, command="sh")["terminalId"]
    wire.write(tid, b"sleep 100\n")
    time.sleep(0.5)  # (sleep must be running for the ^C to reach it, not sh's line editor)
    wire.write(tid, b"\x03")
    wire.wait_output(tid, rb"\^C")
    # sleep is gone: the next command runs now, not 100 s later (wait_output gives up at 30)
    wire.write(tid, b"echo after-$((3*3))\n")
    wire.wait_output(tid, rb"after-9")
    wire.write(tid, b"stty raw -echo; printf '\\377\\000\\001\\376'; printf 'B''IN'; "
               b"stty sane\n")
    out = wire.wait_output(tid, rb"BIN")
    assert b"\xff\x00\x01\xfe" in out
    info = wire.call("closeTerminal", terminalId=tid)
    assert info["status"] == "exited"
    assert wire.call("listTerminals", sandboxId=room_id)["terminals"] == []
    wire.call("destroy", sandboxId=room_id)


def test_a_full_screen_program_runs(wire: Wire, room_id: str) -> None:
    have = wire.call("exec", sandboxId=room_id, command="command -v vi || command -v top")
    if have["exitCode"] != 0:
        skip_unless_ci("the rootfs has neither vi nor top")
    prog = have["stdout"].strip()
    tid = wire.call("openTerminal", sandboxId=room_id, command=prog,
                    args=[],
                    cols=80, rows=24)["terminalId"]
    if prog.endswith("vi"):
        wire.wait_output(tid, rb"\x1b\[")  # escape sequences: it drives the screen
        wire.write(tid, b"ihello-vi\x1b:wq /workspace/vi.txt\r")
        wire.wait_exit(tid)
        got = wire.call("exec", sandboxId=room_id, command="cat /workspace/vi.txt")
        assert got["stdout"].strip() == "hello-vi"
    else:
        wire.wait_output(tid, rb"\x1b\[")
        wire.write(tid, b"q")
        assert wire.wait_exit(tid)["exitCode"] == 0
    wire.call("destroy", sandboxId=room_id)


def test_reattach_after_disconnect_replays_then_follows(daemon: DaemonProc,
                                                        room_id: str) -> None:
    first = Wire(daemon.socket)
    tid = first.call("openTerminal", sandboxId=room_id, command="sh")["terminalId"]
    first.write(tid, b"echo before-$((6*7))\n")
    first.wait_output(tid, rb"before-42")
    first.close()
    second = Wire(daemon.socket)
    try:
        info = second.call("attachTerminal", terminalId=tid)
        assert info["status"] == "running"
        assert b"before-42" in second.wait_output(tid, rb"before-42")
        second.write(tid, b"echo after-$((7*7))\n")
        out = second.wait_output(tid, rb"after-49")
        assert out.count(b"before-42") == 1  # replayed once, never repeated by the live part
        assert second.call("listTerminals", sandboxId=room_id)["terminals"][0]["attached"]
        second.call("destroy", sandboxId=room_id)
    finally:
        second.close()


def test_a_detached_terminal_is_closed_after_its_grace_and_nothing_is_left(
        test_user: Any) -> None:
    d = make_daemon(test_user)
    conf = os.path.join(os.path.dirname(d.state_dir), "sandboxd.toml")
    Path(conf).write_text("terminal_grace_s = 1.0\n")
    os.chmod(conf, 0o644)
    d.extra_args += ["--config", conf]
    d.start()
    try:
        w = Wire(d.socket)
        tid = w.call("openTerminal", sandboxId="grace",
                     command="sleep 1000 & echo marker-grace; wait")["terminalId"]
        w.wait_output(tid, rb"marker-grace")
        w.close()
        deadline = time.monotonic() + 30
        w2 = Wire(d.socket)
        while w2.call("listTerminals", sandboxId="grace")["terminals"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert not [x for x in d.leftovers(settle=5) if "sleep 1000" in x]
        # destroy with a terminal open: nothing (pty, process, cgroup) is left
        w2.call("openTerminal", sandboxId="grace", command="sleep 1000")
        w2.call("destroy", sandboxId="grace")
        w2.close()
    finally:
        assert d.stop() == 0
    assert d.leftovers() == []


def test_unknown_terminal_and_the_per_room_ceiling(wire: Wire, room_id: str) -> None:
    with pytest.raises(RuntimeError, match="TERMINAL_NOT_FOUND"):
        wire.call("resizeTerminal", terminalId="term-000000000000", cols=10, rows=10)
    for _ in range(8):
        wire.call("openTerminal", sandboxId=room_id, command="sleep 100")
    with pytest.raises(RuntimeError, match="QUOTA_EXCEEDED"):
        wire.call("openTerminal", sandboxId=room_id, command="sleep 100")
    wire.call("destroy", sandboxId=room_id)


def test_a_terminal_of_the_sandbox_user_owns_its_pty(wire: Wire, room_id: str) -> None:
    tid = wire.call("openTerminal", sandboxId=room_id, command="sh", user="sandbox")["terminalId"]
    wire.write(tid, b"echo uid=$(id -u) owner=$(stat -c %u $(tty)); echo END\n")
    out = wire.wait_output(tid, rb"\nEND\r\n")
    uid = re.search(rb"uid=(\d+) owner=(\d+)", out)
    assert uid is not None and uid.group(1) == uid.group(2) != b"0", out
    wire.call("destroy", sandboxId=room_id)


def test_a_client_that_does_not_read_blocks_the_program(daemon: DaemonProc,
                                                        room_id: str) -> None:
    """Flow control: the daemon stops reading the master while the client's backlog is over
    max_pending_bytes, so the program blocks on its pty instead of the daemon buffering."""
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(daemon.socket)
    req = {"jsonrpc": "2.0", "id": 1, "method": "openTerminal", "params": {
        "sandboxId": room_id, "command":
        "i=0; while :; do i=$((i+1)); echo $i > /workspace/n; printf '%01000d\\n' 0; done"}}
    slow.sendall(json.dumps(req).encode() + b"\n")
    other = Wire(daemon.socket)
    try:
        def count() -> int:
            got = other.call("exec", sandboxId=room_id, command="cat /workspace/n")["stdout"]
            return int(got or 0)
        deadline = time.monotonic() + 25  # (under stream_stall_timeout_s: not dropped yet)
        last, stuck = -1, 0
        while stuck < 3:
            assert time.monotonic() < deadline, "the program never blocked"
            time.sleep(0.3)
            now = count()
            stuck = stuck + 1 if now == last else 0
            last = now
        # Far less than the program would write in that time unblocked, and it moves again
        # as soon as the client reads.
        for _ in range(200):
            slow.recv(1 << 16)
        deadline = time.monotonic() + 20
        while count() == last:
            assert time.monotonic() < deadline, "the program stayed blocked after reads"
            slow.recv(1 << 16)
        other.call("destroy", sandboxId=room_id)
    finally:
        other.close()
        slow.close()


def test_the_python_client_terminal_reads_what_the_program_writes(client: Any, daemon: DaemonProc,
                                                                  room_id: str) -> None:
    sb = client.sandbox(room_id)
    with sb.terminal("/bin/sh", [], cols=100, rows=30) as t:
        assert re.fullmatch(r"/dev/pts/\d+", t.tty or "")
        t.write(b"stty size; echo typed-$((6*7))\n")
        assert re.search(rb"30 100\r\ntyped-42\r\n", t.read_until(b"typed-42\r\n"))
        t.resize(120, 40)
        t.write("stty size\n")
        assert b"40 120\r\n" in t.read_until(b"40 120\r\n")
        t.write(b"exit 6\n")
        assert t.wait(30) == 6
    # closed (hung up) with the block: a terminal left running is killed with its tree
    with sb.terminal("sh", ["-c", "sleep 100"]) as t:
        tid = t.id
    with pytest.raises(errors.TerminalNotFound):
        sb.write_terminal(tid, b"x")
