"""Protocol fuzzing: malformed and hostile JSON-RPC thrown at a live daemon for a bounded time.

Hypothesis builds requests from the real method table with wrong types, odd ids, unknown fields,
batches, invalid UTF-8, control characters, huge numbers, deep nesting and garbage bytes, and
sends them over a raw socket. After every example a sentinel ``ping`` must come back on the same
connection (the daemon neither crashed nor gave up on the connection), and at the end the daemon
must be alive with its file descriptors, memory, rooms and child processes back where they were
(nothing leaks). Bounded: a fixed max_examples and a 30 s wall budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sec_helpers as h
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sec_helpers import client_of, descendants, start_daemon, stop_and_check

# The suite's shared fixtures, bound by name (sec_helpers says why this is not a conftest.py).
sec_user = h.sec_user

pytestmark = [pytest.mark.security, pytest.mark.integration]

BUDGET_S = 30.0
METHODS = ["exec", "ping", "getSandbox", "listSandboxes", "destroy", "readFile", "writeFile",
           "deleteFile", "renameFile", "moveFile", "mkdir", "exists", "listFiles",
           "gitCheckout", "runCode"]
ROOMS = ["fz-a", "fz-b", "", "-x", "../../etc", "a" * 64, "fz\u0000", "ünï"]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda ch: st.lists(ch, max_size=4)
                           | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=12)
ids = st.none() | st.integers() | st.text(max_size=6) | st.floats(allow_nan=False) \
    | st.booleans() | st.lists(st.integers(), max_size=2) | st.just({"a": 1})
commands = st.sampled_from(["true", "echo hi", "exit 3", "printf '\\377\\0'", "cat", ""]) \
    | st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=10)
known_params = st.fixed_dictionaries(
    {"sandboxId": st.sampled_from(ROOMS) | json_values},
    optional={"command": commands | json_values, "args": st.lists(st.text(max_size=5),
              max_size=3) | json_values, "path": st.text(max_size=20) | json_values,
              "content": st.text(max_size=20) | json_values, "timeout": json_values,
              "limits": json_values, "user": st.sampled_from(["root", "sandbox", "nobody"])
              | json_values, "stream": json_values, "encoding": json_values,
              "options": json_values, "env": json_values, "cwd": json_values})
requests = st.fixed_dictionaries(
    {"method": st.sampled_from(METHODS) | st.text(max_size=10) | json_values},
    optional={"jsonrpc": st.just("2.0") | json_values, "id": ids,
              "params": known_params | json_values, "extra": json_values})


def _line(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


garbage = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ") + b"\n"),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n + b"\n"),   # deep nesting
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n + b"\n"),
    st.just(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{}}'[:-5] + b"\n"),
    st.just(b'{"jsonrpc":"2.0","id":1e999999,"method":"ping"}\n'),
    st.just(b'{"jsonrpc":"2.0","id":1,"method":"exec","params":{"sandboxId":"fz-a",'
            b'"command":"echo \xff\xfe"}}\n'),
    st.just(b"[]\n"),
    st.just(b"\n\n\r\n \t\n"),
)
payloads = st.one_of(
    requests.map(lambda r: [_line(r)]),
    st.lists(requests, min_size=1, max_size=5).map(lambda rs: [_line(rs)]),
    st.lists(garbage, min_size=1, max_size=3),
)


class Conn:
    def __init__(self, path: str) -> None:
        self.path = path
        self.n = 0
        self.sock = self._connect()
        self.buf = b""

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(self.path)
        s.settimeout(20)
        return s

    def roundtrip(self, lines: list[bytes]) -> None:
        """Send the lines, then a sentinel ping; read until the sentinel's reply."""
        self.n += 1
        sentinel = f"sentinel-{self.n}"
        for line in lines:
            self.sock.sendall(line)
        self.sock.sendall(_line({"jsonrpc": "2.0", "id": sentinel, "method": "ping"}))
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                msg = json.loads(raw)  # every reply is valid JSON
                if isinstance(msg, dict) and msg.get("id") == sentinel:
                    assert "result" in msg, msg
                    return
                _check_reply(msg)
            data = self.sock.recv(1 << 20)
            assert data, "the daemon closed the connection"
            self.buf += data

    def close(self) -> None:
        self.sock.close()


def _check_reply(msg: Any) -> None:
    for m in msg if isinstance(msg, list) else [msg]:
        assert isinstance(m, dict) and m.get("jsonrpc") == "2.0", m
        if "error" in m:
            err = m["error"]
            assert isinstance(err["code"], int) and isinstance(err["message"], str), m
            # "the sandbox broke" must never be the answer to a bad request
            assert err.get("data", {}).get("code") != "INTERNAL_ERROR", m


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _until(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def fuzz_daemon(sec_user: Any) -> Iterator[Any]:
    d = start_daemon(sec_user, max_request_bytes=1 << 20, idle_timeout_s=0)
    yield d
    stop_and_check(d)


def test_protocol_fuzz(fuzz_daemon: Any) -> None:
    d = fuzz_daemon
    pid = d.proc.pid
    warm = Conn(d.socket)
    warm.roundtrip([_line({"jsonrpc": "2.0", "id": 1, "method": "exec",
                           "params": {"sandboxId": "fz-a", "command": "true"}})])
    warm.close()
    time.sleep(0.2)  # (a settle before the baseline; waiting for the fd count to fall failed)
    fds0, rss0 = _fds(pid), h.rss_kb(pid)
    conn = Conn(d.socket)
    end = time.monotonic() + BUDGET_S
    count = {"n": 0}

    @settings(max_examples=2000, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(payloads)
    def one(lines: list[bytes]) -> None:
        if time.monotonic() > end:
            return
        count["n"] += 1
        conn.roundtrip(lines)

    try:
        one()
    finally:
        conn.close()
    assert count["n"] >= 50, "the fuzz budget ran out before it did anything"
    # Alive, answering, and nothing kept: connections, fds, memory, rooms, processes.
    with client_of(d) as c:
        assert c.ping()["version"]
        for s in c.list_sandboxes():
            c.sandbox(s.sandbox_id).destroy()
    # Polled (a generous 30 s for the last connections to be closed), then asserted.
    with contextlib.suppress(AssertionError):
        _until(lambda: _fds(pid) <= fds0 + 2, "the fuzz connections' fds were closed")
    assert _fds(pid) <= fds0 + 2, (fds0, _fds(pid))
    assert h.rss_kb(pid) < rss0 + 64 * 1024
    assert len(descendants(pid)) == 1  # only the zygote: every room init and payload is gone
    log = d.log()
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 800):][:3000]
    print(f"fuzz: {count['n']} examples (budget {BUDGET_S:.0f} s)")
