"""The wire contract against a live daemon: framing, batches, every protocol error, and the
daemon still serving after each piece of bad input."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.integration


class Raw:
    """A bare socket speaking lines, to send what no well-behaved client would."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def send(self, data: bytes) -> None:
        self.file.write(data)
        self.file.flush()

    def call(self, obj: Any) -> Any:
        self.send(json.dumps(obj).encode() + b"\n")
        return self.recv()

    def recv(self) -> Any:
        line = self.file.readline()
        assert line, "daemon closed the connection"
        return json.loads(line)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def raw(daemon: Any) -> Iterator[Raw]:
    r = Raw(daemon.socket)
    yield r
    r.close()


def ping(r: Raw, rid: Any = 99) -> None:
    reply = r.call({"jsonrpc": "2.0", "id": rid, "method": "ping"})
    assert reply["id"] == rid and reply["result"]["message"] == "pong"


def test_ping_reports_capabilities(raw: Raw) -> None:
    res = raw.call({"jsonrpc": "2.0", "id": 1, "method": "ping"})["result"]
    caps = res["capabilities"]
    assert set(caps["namespaces"]) >= {"user", "mnt", "pid", "net", "ipc", "uts"}
    assert caps["cgroup"]["backend"] in ("v1", "v2", "disabled")
    assert caps["rootfs"] and caps["seccomp"]["enabled"] is True
    assert "version" in res


def test_parse_error_has_null_id_and_connection_survives(raw: Raw) -> None:
    raw.send(b'{"jsonrpc": "2.0", "id": 1, "method": \n')
    reply = raw.recv()
    assert reply["id"] is None and reply["error"]["code"] == -32700
    raw.send(b"\xff\xfe not utf8\n")
    assert raw.recv()["error"]["code"] == -32700
    ping(raw)


@pytest.mark.parametrize("obj,code", [
    ({"id": 1, "method": "ping"}, -32600),                       # no jsonrpc
    ({"jsonrpc": "1.0", "id": 1, "method": "ping"}, -32600),     # wrong version
    ({"jsonrpc": "2.0", "id": 1}, -32600),                       # no method
    ({"jsonrpc": "2.0", "id": 1, "method": 7}, -32600),          # method not a string
    ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}, -32600),  # id an object
    ({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": 3}, -32600),
    ({"jsonrpc": "2.0", "id": 1, "method": "nope"}, -32601),
    ({"jsonrpc": "2.0", "id": 1, "method": "exec", "params": {"sandboxId": "a"}}, -32602),
    ({"jsonrpc": "2.0", "id": 1, "method": "exec",
      "params": {"sandboxId": "a", "command": 42}}, -32602),
    ({"jsonrpc": "2.0", "id": 1, "method": "exec",
      "params": {"sandboxId": "a", "command": "true", "timout": 5}}, -32602),  # misspelt field
    ({"jsonrpc": "2.0", "id": 1, "method": "exec",
      "params": {"sandboxId": "a", "command": "true", "timeout": -1}}, -32602),
])
def test_invalid_requests_get_the_right_code(raw: Raw, obj: Any, code: int) -> None:
    reply = raw.call(obj)
    assert reply["error"]["code"] == code, reply
    assert isinstance(reply["error"]["data"]["code"], str)
    ping(raw)


@pytest.mark.parametrize("bad", ["", "-a", "a-", "a b", "x" * 64, "../etc", "ä", "a/b", "a\x00"])
def test_bad_sandbox_ids(raw: Raw, bad: str) -> None:
    for method, extra in (("exec", {"command": "true"}), ("getSandbox", {}), ("destroy", {})):
        reply = raw.call({"jsonrpc": "2.0", "id": 1, "method": method,
                          "params": {"sandboxId": bad, **extra}})
        assert reply["error"]["code"] == -32000
        assert reply["error"]["data"]["code"] == "INVALID_SANDBOX_ID"
    ping(raw)


def test_unknown_room_and_idempotent_destroy(raw: Raw) -> None:
    reply = raw.call({"jsonrpc": "2.0", "id": "d", "method": "destroy",
                      "params": {"sandboxId": "never-made"}})
    assert reply["result"] == {"sandboxId": "never-made", "destroyed": False}


def test_batch_mixed_with_notification_and_errors(raw: Raw, room_id: str) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "ping"},
        {"jsonrpc": "2.0", "method": "ping"},                       # notification: no reply
        {"jsonrpc": "2.0", "id": "b", "method": "nope"},
        {"jsonrpc": "2.0", "id": "c", "method": "exec",
         "params": {"sandboxId": room_id, "command": "echo", "args": ["hi"]}},
        5,
    ]
    replies = raw.call(batch)
    assert isinstance(replies, list)
    by_id = {r["id"]: r for r in replies}
    assert set(by_id) == {"a", "b", "c", None}
    assert by_id["a"]["result"]["message"] == "pong"
    assert by_id["b"]["error"]["code"] == -32601
    assert by_id["c"]["result"]["stdout"] == "hi\n"
    assert by_id[None]["error"]["code"] == -32600
    assert raw.call([])["error"]["code"] == -32600
    ping(raw)


def test_notification_gets_no_reply(raw: Raw) -> None:
    raw.send(b'{"jsonrpc":"2.0","method":"ping"}\n{"jsonrpc":"2.0","method":"nope"}\n')
    ping(raw, rid="after")  # the first line back is the ping's


def test_responses_out_of_order_on_one_connection(raw: Raw, room_id: str) -> None:
    raw.send(json.dumps({"jsonrpc": "2.0", "id": "slow", "method": "exec",
                         "params": {"sandboxId": room_id, "command": "sleep 1; echo s"}}).encode()
             + b"\n")
    raw.send(json.dumps({"jsonrpc": "2.0", "id": "fast", "method": "exec",
                         "params": {"sandboxId": room_id, "command": "echo f"}}).encode() + b"\n")
    first, second = raw.recv(), raw.recv()
    assert (first["id"], second["id"]) == ("fast", "slow")
    assert first["result"]["stdout"] == "f\n" and second["result"]["stdout"] == "s\n"


def test_streaming_notifications_precede_the_result(raw: Raw, room_id: str) -> None:
    raw.send(json.dumps({"jsonrpc": "2.0", "id": 5, "method": "exec", "params": {
        "sandboxId": room_id, "command": "echo a; sleep 0.1; echo b >&2", "stream": True}}).encode()
        + b"\n")
    seen = []
    while True:
        msg = raw.recv()
        if "id" in msg:
            break
        assert msg["method"] == "exec.output" and msg["params"]["requestId"] == 5
        seen.append((msg["params"]["stream"], msg["params"]["data"]))
    assert seen == [("stdout", "a\n"), ("stderr", "b\n")]
    assert msg["result"]["stdout"] == "a\n" and msg["result"]["stderr"] == "b\n"


def test_oversized_request_is_refused_and_connection_survives(daemon: Any, raw: Raw) -> None:
    # The daemon's default cap is 48 MiB: send a 49 MiB line.
    chunk = b"x" * (1 << 20)
    raw.send(b'{"jsonrpc":"2.0","id":1,"method":"exec","params":{"command":"')
    for _ in range(49):
        raw.send(chunk)
    raw.send(b'"}}\n')
    reply = raw.recv()
    assert reply["error"]["data"]["code"] == "REQUEST_TOO_LARGE"
    ping(raw)


def test_client_disconnect_mid_exec_kills_the_run(daemon: Any, room_id: str) -> None:
    r = Raw(daemon.socket)
    r.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "exec", "params": {
        "sandboxId": room_id, "command": "sleep 600"}}).encode() + b"\n")
    with daemon.client() as c:
        sb = c.sandbox(room_id)
        for _ in range(200):
            if "sleep 600" in sb.exec("ps -eo args").stdout:
                break
        else:
            pytest.fail("the run never started: its kill on disconnect would pass vacuously")
        r.close()
        for _ in range(100):
            if "sleep 600" not in sb.exec("ps -eo args").stdout:
                break
        assert "sleep 600" not in sb.exec("ps -eo args").stdout
