"""The file API against a real daemon run by an unprivileged user: every method, every error
code, binary and unicode round-trips, the 32 MiB edge, streamed reads, a full writable layer."""

from __future__ import annotations

import base64
import errno
import os
import time
from typing import Any

import pytest

from sandboxd import errors

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def call(client: Any, method: str, room: str, **params: Any) -> Any:
    return client.call(method, {"sandboxId": room, **params})


def write(client: Any, room: str, path: str, data: bytes | str) -> Any:
    if isinstance(data, bytes):
        return call(client, "writeFile", room, path=path,
                    content=base64.b64encode(data).decode(), encoding="base64")
    return call(client, "writeFile", room, path=path, content=data)


def read_bytes(client: Any, room: str, path: str) -> bytes:
    r = call(client, "readFile", room, path=path, encoding="base64")
    assert r["encoding"] == "base64"
    return base64.b64decode(r["content"])


def sh(client: Any, room: str, line: str) -> Any:
    return client.sandbox(room).exec(line)


def expect(code: type[errors.SandboxError], fn: Any, *args: Any, **kw: Any) -> Any:
    with pytest.raises(code) as info:
        fn(*args, **kw)
    assert info.value.code == code.code
    return info.value


# --- writeFile / readFile ------------------------------------------------------------------------


def test_write_then_read_text_relative_to_workspace(client: Any, room_id: str) -> None:
    w = write(client, room_id, "hello.txt", "hi there\n")
    assert w["success"] and w["path"] == "/workspace/hello.txt" and w["bytesWritten"] == 9
    assert w["timestamp"].endswith("Z")
    r = call(client, "readFile", room_id, path="/workspace/hello.txt")
    assert r["content"] == "hi there\n" and r["encoding"] == "utf-8" and not r["isBinary"]
    assert r["size"] == 9 and r["mimeType"] == "text/plain" and r["success"]
    # The room sees exactly what we wrote.
    assert sh(client, room_id, "cat /workspace/hello.txt").stdout == "hi there\n"


def test_write_creates_missing_parents_and_truncates(client: Any, room_id: str) -> None:
    write(client, room_id, "a/b/c/d.txt", "long content here")
    write(client, room_id, "a/b/c/d.txt", "short")
    assert call(client, "readFile", room_id, path="a/b/c/d.txt")["content"] == "short"
    assert sh(client, room_id, "stat -c %F /workspace/a/b/c").stdout == "directory\n"


def test_all_256_byte_values_round_trip(client: Any, room_id: str) -> None:
    data = bytes(range(256)) * 17
    assert write(client, room_id, "bin/all.bin", data)["bytesWritten"] == len(data)
    r = call(client, "readFile", room_id, path="bin/all.bin")
    assert r["encoding"] == "base64" and r["isBinary"]
    assert base64.b64decode(r["content"]) == data
    assert r["mimeType"] == "application/octet-stream"
    # and written by the room, read by us
    sh(client, room_id, "head -c 1000 /dev/urandom > /workspace/rnd; sha256sum /workspace/rnd")
    raw = read_bytes(client, room_id, "rnd")
    import hashlib

    assert hashlib.sha256(raw).hexdigest() == sh(
        client, room_id, "sha256sum /workspace/rnd").stdout.split()[0]


def test_empty_file(client: Any, room_id: str) -> None:
    assert write(client, room_id, "empty", "")["bytesWritten"] == 0
    r = call(client, "readFile", room_id, path="empty")
    assert (r["content"], r["size"], r["isBinary"]) == ("", 0, False)


def test_unicode_content_and_odd_file_names(client: Any, room_id: str) -> None:
    names = ["ünïcödé 文件.txt", "with space", "-dash-first", "new\nline", "tab\there",
             "quote'\"s", "$(echo pwned)", "🙂.md", "a" * 255, ".hidden", "back\\slash"]
    text = "naïve café — 日本語 🙂 \u0000 nul inside\n"
    for name in names:
        w = write(client, room_id, f"odd/{name}", text)
        assert w["path"] == f"/workspace/odd/{name}"
        r = call(client, "readFile", room_id, path=f"odd/{name}")
        assert r["content"] == text and r["encoding"] == "utf-8", name
    listed = {f["name"] for f in call(client, "listFiles", room_id, path="odd",
                                      includeHidden=True)["files"]}
    assert listed == set(names)
    # The room agrees on the names (the shell does not run them: no "pwned" file appears).
    assert "pwned" not in sh(client, room_id, "ls -A /workspace/odd").stdout.replace(
        "$(echo pwned)", "")


def test_read_encodings(client: Any, room_id: str) -> None:
    write(client, room_id, "t.json", '{"a": 1}')
    r = call(client, "readFile", room_id, path="t.json", encoding="base64")
    assert r["encoding"] == "base64" and base64.b64decode(r["content"]) == b'{"a": 1}'
    assert not r["isBinary"] and r["mimeType"] == "application/json"
    write(client, room_id, "bad.txt", b"ok \xff\xfe end")
    r = call(client, "readFile", room_id, path="bad.txt", encoding="utf-8")
    assert r["encoding"] == "utf-8" and r["isBinary"] and r["content"] == "ok \ufffd\ufffd end"


def test_read_at_the_32_mib_edge(client: Any, room_id: str) -> None:
    sh(client, room_id, "head -c 33554432 /dev/zero | tr '\\0' a > /workspace/edge; "
                        "head -c 33554433 /dev/zero > /workspace/over")
    t0 = time.monotonic()
    r = call(client, "readFile", room_id, path="edge")
    took = time.monotonic() - t0
    assert r["size"] == 32 * MiB and len(r["content"]) == 32 * MiB and r["content"][-1] == "a"
    print(f"readFile 32 MiB text: {took * 1000:.0f} ms")
    e = expect(errors.FileTooLarge, call, client, "readFile", room_id, path="over")
    assert e.context["path"] == "over" and e.context["size"] == 32 * MiB + 1
    # binary at the edge, through base64
    sh(client, room_id, "head -c 33554432 /dev/urandom > /workspace/edgebin")
    r = call(client, "readFile", room_id, path="edgebin")
    assert r["isBinary"] and len(base64.b64decode(r["content"])) == 32 * MiB


def test_write_32_mib_binary(client: Any, room_id: str) -> None:
    data = os.urandom(32 * MiB)
    t0 = time.monotonic()
    assert write(client, room_id, "big.bin", data)["bytesWritten"] == len(data)
    print(f"writeFile 32 MiB binary: {(time.monotonic() - t0) * 1000:.0f} ms")
    import hashlib

    assert sh(client, room_id, "sha256sum /workspace/big.bin").stdout.split()[0] == \
        hashlib.sha256(data).hexdigest()


def test_streamed_read_of_200_mib(daemon: Any, room_id: str) -> None:
    from sandboxd.client import Client

    size = 200 * MiB
    with Client(daemon.socket, timeout=300) as c:
        c.call("getSandbox", {"sandboxId": room_id,
                              "options": {"limits": {"diskBytes": 256 * MiB}}})
        r = c.sandbox(room_id).exec("head -c 209715200 /dev/urandom > /workspace/huge && "
                                    "sha256sum /workspace/huge")
        want = r.stdout.split()[0]
        import hashlib

        h = hashlib.sha256()
        seen = {"n": 0, "bytes": 0, "max": 0, "offset": 0}

        def on_chunk(method: str, params: dict[str, Any]) -> None:
            assert method == "file.chunk" and params["encoding"] == "base64"
            raw = base64.b64decode(params["data"])
            assert params["offset"] == seen["offset"]  # in order, no gap
            seen["offset"] += len(raw)
            h.update(raw)
            seen["n"] += 1
            seen["max"] = max(seen["max"], len(raw))

        t0 = time.monotonic()
        res = c.call("readFile", {"sandboxId": room_id, "path": "huge", "stream": True},
                     on_chunk)
        took = time.monotonic() - t0
        c.call("destroy", {"sandboxId": room_id})
    assert res["size"] == size and res["chunks"] == seen["n"] and res["content"] == ""
    assert seen["max"] <= 64 * 1024
    assert h.hexdigest() == want
    print(f"streamed 200 MiB in {took:.2f} s = {size / MiB / took:.0f} MiB/s")


def test_stream_utf8_keeps_characters_whole(client: Any, room_id: str) -> None:
    text = "é" * 100_000  # 200 000 bytes: chunk borders fall inside characters
    write(client, room_id, "u.txt", text)
    parts: list[str] = []
    res = client.call("readFile", {"sandboxId": room_id, "path": "u.txt", "stream": True,
                                   "encoding": "utf-8"},
                      lambda m, p: parts.append(p["data"]))
    assert "".join(parts) == text and res["encoding"] == "utf-8"


# --- deleteFile / renameFile / moveFile / mkdir / exists / listFiles ----------------------------


def test_delete_file_and_refuse_directories(client: Any, room_id: str) -> None:
    write(client, room_id, "d/x.txt", "x")
    r = call(client, "deleteFile", room_id, path="d/x.txt")
    assert r["success"] and r["path"] == "/workspace/d/x.txt"
    assert not call(client, "exists", room_id, path="d/x.txt")["exists"]
    e = expect(errors.IsDirectory, call, client, "deleteFile", room_id, path="d")
    assert e.context["path"] == "d"
    expect(errors.FileNotFound, call, client, "deleteFile", room_id, path="d/x.txt")


def test_delete_symlink_removes_the_link_not_the_target(client: Any, room_id: str) -> None:
    write(client, room_id, "target.txt", "keep me")
    sh(client, room_id, "ln -s /workspace/target.txt /workspace/link")
    call(client, "deleteFile", room_id, path="link")
    assert call(client, "readFile", room_id, path="target.txt")["content"] == "keep me"


def test_rename_and_move(client: Any, room_id: str) -> None:
    write(client, room_id, "r/one.txt", "1")
    r = call(client, "renameFile", room_id, oldPath="r/one.txt", newPath="r/two.txt")
    assert r["path"] == "/workspace/r/one.txt" and r["newPath"] == "/workspace/r/two.txt"
    assert call(client, "readFile", room_id, path="r/two.txt")["content"] == "1"
    call(client, "mkdir", room_id, path="r/into")
    m = call(client, "moveFile", room_id, sourcePath="r/two.txt", destinationPath="r/into")
    assert m["newPath"] == "/workspace/r/into/two.txt"
    m = call(client, "moveFile", room_id, sourcePath="/workspace/r/into/two.txt",
             destinationPath="/tmp/three.txt")
    assert m["newPath"] == "/tmp/three.txt"
    assert call(client, "readFile", room_id, path="/tmp/three.txt")["content"] == "1"
    expect(errors.FileNotFound, call, client, "renameFile", room_id, oldPath="r/nope",
           newPath="r/x")
    write(client, room_id, "r/full/f", "f")
    call(client, "mkdir", room_id, path="r/dir")
    expect(errors.FileExists, call, client, "renameFile", room_id, oldPath="r/dir",
           newPath="r/full")
    expect(errors.IsDirectory, call, client, "renameFile", room_id, oldPath="r/full/f",
           newPath="r/dir")
    write(client, room_id, "r/file", "f")
    expect(errors.NotDirectory, call, client, "renameFile", room_id, oldPath="r/dir",
           newPath="r/file")


def test_mkdir(client: Any, room_id: str) -> None:
    r = call(client, "mkdir", room_id, path="m")
    assert r == {**r, "success": True, "path": "/workspace/m", "recursive": False}
    expect(errors.FileExists, call, client, "mkdir", room_id, path="m")
    expect(errors.FileNotFound, call, client, "mkdir", room_id, path="m/a/b")
    assert call(client, "mkdir", room_id, path="m/a/b", recursive=True)["recursive"]
    call(client, "mkdir", room_id, path="m/a/b", recursive=True)  # idempotent
    write(client, room_id, "m/file", "")
    expect(errors.FileExists, call, client, "mkdir", room_id, path="m/file", recursive=True)
    expect(errors.NotDirectory, call, client, "mkdir", room_id, path="m/file/sub")
    expect(errors.NotDirectory, call, client, "mkdir", room_id, path="m/file/sub",
           recursive=True)


def test_exists(client: Any, room_id: str) -> None:
    write(client, room_id, "e.txt", "")
    assert call(client, "exists", room_id, path="e.txt") == {
        "success": True, "path": "/workspace/e.txt", "exists": True, "type": "file"}
    assert call(client, "exists", room_id, path="/workspace")["type"] == "directory"
    assert not call(client, "exists", room_id, path="nope")["exists"]
    assert not call(client, "exists", room_id, path="e.txt/below")["exists"]
    sh(client, room_id, "ln -s /nowhere /workspace/dangling")
    assert not call(client, "exists", room_id, path="dangling")["exists"]


def test_list_files(client: Any, room_id: str) -> None:
    for p in ("l/a.txt", "l/sub/b.txt", "l/sub/deeper/c.txt", "l/.hid", "l/.hdir/x"):
        write(client, room_id, p, "12345")
    sh(client, room_id, "ln -s /usr /workspace/l/usrlink; mkfifo /workspace/l/fifo; "
                        "chmod 600 /workspace/l/a.txt")
    r = call(client, "listFiles", room_id, path="l")
    assert r["success"] and r["path"] == "/workspace/l"
    by = {f["name"]: f for f in r["files"]}
    assert set(by) == {"a.txt", "sub", "usrlink", "fifo"} and r["count"] == 4
    a = by["a.txt"]
    assert a == {**a, "type": "file", "size": 5, "absolutePath": "/workspace/l/a.txt",
                 "relativePath": "a.txt", "mode": "rw-------"}
    assert a["modifiedAt"].endswith("Z")
    assert (by["sub"]["type"], by["usrlink"]["type"], by["fifo"]["type"]) == (
        "directory", "symlink", "other")
    rr = call(client, "listFiles", room_id, path="l", recursive=True, includeHidden=True)
    rels = {f["relativePath"] for f in rr["files"]}
    assert {"sub/b.txt", "sub/deeper/c.txt", ".hid", ".hdir/x"} <= rels
    assert not any(r.startswith("usrlink/") for r in rels)  # symlinks are not followed
    assert rr["count"] == len(rr["files"])
    e = expect(errors.NotDirectory, call, client, "listFiles", room_id, path="l/a.txt")
    assert e.context["path"] == "l/a.txt"
    expect(errors.FileNotFound, call, client, "listFiles", room_id, path="nope")
    assert call(client, "listFiles", room_id)["path"] == "/workspace"


# --- error codes ---------------------------------------------------------------------------------


def test_file_not_found_and_is_directory(client: Any, room_id: str) -> None:
    e = expect(errors.FileNotFound, call, client, "readFile", room_id, path="missing.txt")
    assert e.context["path"] == "missing.txt"
    expect(errors.IsDirectory, call, client, "readFile", room_id, path="/workspace")
    expect(errors.IsDirectory, call, client, "writeFile", room_id, path="/tmp", content="x")
    write(client, room_id, "f", "x")
    expect(errors.NotDirectory, call, client, "readFile", room_id, path="f/g")
    expect(errors.NotDirectory, call, client, "writeFile", room_id, path="f/g", content="x")


def test_read_only_runtime_tree(client: Any, room_id: str) -> None:
    e = expect(errors.ReadOnly, call, client, "writeFile", room_id, path="/usr/bin/python3",
               content="pwned")
    assert e.context["path"] == "/usr/bin/python3"
    expect(errors.ReadOnly, call, client, "deleteFile", room_id, path="/usr/bin/env")
    expect(errors.ReadOnly, call, client, "mkdir", room_id, path="/usr/evil")
    assert "pwned" not in call(client, "readFile", room_id, path="/usr/bin/python3")["content"][:10]


def test_permission_denied(client: Any, room_id: str) -> None:
    # Kernel interfaces are not files for this API.
    for path in ("/proc/1/environ", "/proc/self/status", "/proc/self/mem", "/proc/cpuinfo"):
        expect(errors.PermissionDenied, call, client, "readFile", room_id, path=path)
    expect(errors.PermissionDenied, call, client, "writeFile", room_id,
           path="/proc/sys/kernel/hostname", content="x")
    # Special files: a FIFO would block a reader, a device is not content.
    sh(client, room_id, "mkfifo /workspace/fifo")
    # (An open that blocked on the FIFO would never answer: the client's timeout or pytest's
    # fails the test, no elapsed-time bound needed.)
    expect(errors.PermissionDenied, call, client, "readFile", room_id, path="fifo")
    expect(errors.PermissionDenied, call, client, "writeFile", room_id, path="fifo", content="x")
    expect(errors.PermissionDenied, call, client, "readFile", room_id, path="/dev/zero")
    expect(errors.PermissionDenied, call, client, "writeFile", room_id, path="/dev/null",
           content="x")


def test_validation_failed(client: Any, room_id: str) -> None:
    for bad in ("", "a\x00b", "x" * 4097):
        for method, extra in (("readFile", {}), ("writeFile", {"content": ""}),
                              ("deleteFile", {}), ("mkdir", {}), ("exists", {}),
                              ("listFiles", {})):
            e = expect(errors.ValidationError, call, client, method, room_id, path=bad, **extra)
            assert "path" in e.context
    expect(errors.ValidationError, call, client, "renameFile", room_id, oldPath="", newPath="x")
    expect(errors.ValidationError, call, client, "moveFile", room_id, sourcePath="x",
           destinationPath="y\x00")
    e = expect(errors.ValidationError, call, client, "writeFile", room_id, path="b64",
               content="not base64!!", encoding="base64")
    assert e.context["path"] == "b64"
    assert not call(client, "exists", room_id, path="b64")["exists"]
    # A path of exactly 4096 characters is valid input (the kernel then says the name is long).
    with pytest.raises(errors.SandboxError) as info:
        call(client, "readFile", room_id, path="/" + "x" * 4095)
    # It passes the daemon's bound (A01) and reaches the kernel, whose ENAMETOOLONG comes back.
    assert info.value.code == "VALIDATION_FAILED", info.value
    assert info.value.context.get("errno") == errno.ENAMETOOLONG, info.value.context


def test_unknown_params_and_encoding_are_refused(client: Any, room_id: str) -> None:
    expect(errors.InvalidParams, call, client, "readFile", room_id, path="x", bogus=1)
    expect(errors.InvalidParams, call, client, "writeFile", room_id, path="x", content="",
           encoding="latin-1")


def test_no_space_and_others_unaffected(daemon: Any, room_id: str) -> None:
    from sandboxd.client import Client

    other = room_id[:50] + "-other"
    with Client(daemon.socket, timeout=120) as c:
        c.call("getSandbox", {"sandboxId": room_id, "options": {"limits": {"diskBytes": 8 * MiB}}})
        data = base64.b64encode(os.urandom(12 * MiB)).decode()
        e = expect(errors.NoSpace, c.call, "writeFile",
                   {"sandboxId": room_id, "path": "fill.bin", "content": data,
                    "encoding": "base64"})
        assert e.context["path"] == "fill.bin"
        # The failed write gave its space back: the room still works.
        c.call("writeFile", {"sandboxId": room_id, "path": "after.txt", "content": "still ok"})
        # Filled by the room itself, the next write is refused too.
        c.sandbox(room_id).exec("cat /dev/zero > /workspace/pad 2>/dev/null; true")
        expect(errors.NoSpace, c.call, "writeFile",
               {"sandboxId": room_id, "path": "more.txt", "content": "x" * 100_000})
        # Another room and the host are unaffected.
        c.call("writeFile", {"sandboxId": other, "path": "fine.bin", "content": data,
                             "encoding": "base64"})
        assert c.call("readFile", {"sandboxId": other, "path": "fine.bin",
                                   "encoding": "base64"})["size"] == 12 * MiB
        st = os.statvfs(daemon.state_dir)
        assert st.f_bavail * st.f_frsize > 64 * MiB
        for rid in (room_id, other):
            c.call("destroy", {"sandboxId": rid})


def test_errors_name_the_path_and_the_room_is_created_on_demand(client: Any,
                                                                room_id: str) -> None:
    e = expect(errors.FileNotFound, call, client, "readFile", room_id, path="/nope/x")
    assert e.to_wire()["data"] == {**e.to_wire()["data"], "code": "FILE_NOT_FOUND",
                                   "path": "/nope/x"}
    assert any(s.sandbox_id == room_id for s in client.list_sandboxes())


def test_other_users_room_is_not_reachable(client: Any, daemon: Any, room_id: str,
                                           other_user: Any) -> None:
    write(client, room_id, "mine.txt", "secret of root's room")
    # The daemon's owner is sbxtest; rooms created by root are visible to root only and
    # the daemon's uid. A second unprivileged user cannot even connect to a 0600 socket, which
    # is the first fence; ownership (SANDBOX_NOT_FOUND) is covered by the rooms tests.
    st = os.stat(daemon.socket)
    assert st.st_mode & 0o077 == 0


def test_append_writes_in_chunks(client: Any, room_id: str) -> None:
    write(client, room_id, "log.txt", "a")
    for part in ("b", "c"):
        r = call(client, "writeFile", room_id, path="log.txt", content=part, append=True)
        assert r["bytesWritten"] == 1
    assert call(client, "readFile", room_id, path="log.txt")["content"] == "abc"
    call(client, "writeFile", room_id, path="new/log", content="x", append=True)
    assert call(client, "readFile", room_id, path="new/log")["content"] == "x"


def test_a_file_growing_while_read_respects_the_cap(daemon: Any, room_id: str) -> None:
    """The room appends to a file as fast as it can while we read it: every answer is either
    at most 32 MiB or FILE_TOO_LARGE, never more (the daemon reads at most cap + 1 bytes)."""
    import threading

    from sandboxd.client import Client

    with Client(daemon.socket, timeout=60) as c:
        c.call("getSandbox", {"sandboxId": room_id,
                              "options": {"limits": {"diskBytes": 96 * MiB}}})
        c.call("writeFile", {"sandboxId": room_id, "path": "grow", "content": "start"})

    def grow() -> None:
        with Client(daemon.socket, timeout=60) as g:
            g.sandbox(room_id).exec("cat /dev/zero >> /workspace/grow", timeout=3)

    th = threading.Thread(target=grow)
    th.start()
    seen: set[str] = set()
    try:
        with Client(daemon.socket, timeout=60) as c:
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                try:
                    r = c.call("readFile", {"sandboxId": room_id, "path": "grow",
                                            "encoding": "base64"})
                except errors.FileTooLarge:
                    seen.add("too large")
                    continue
                assert r["size"] <= 32 * MiB
                assert len(base64.b64decode(r["content"])) == r["size"]
                seen.add("ok")
    finally:
        th.join(30)
    assert "too large" in seen


# --- client, sandboxctl, the example ------------------------------------------------------------


def test_client_file_methods(client: Any, room_id: str) -> None:
    import io

    sb = client.sandbox(room_id)
    assert sb.write_file("c/bin", bytes(range(256)))["bytesWritten"] == 256
    got = sb.read_file("c/bin")
    assert got.data == bytes(range(256)) and got.is_binary and got.encoding == "base64"
    sb.write_file("c/t.txt", "héllo")
    assert sb.read_file("c/t.txt").text == "héllo"
    assert sb.read_file("c/t.txt", stream=True).data == "héllo".encode()
    parts: list[bytes] = []
    sb.read_file("c/bin", stream=parts.append)
    assert b"".join(parts) == bytes(range(256))
    buf = io.BytesIO()
    assert sb.read_file("c/bin", stream=buf).size == 256 and buf.getvalue() == bytes(range(256))
    assert sb.exists("c/t.txt") and not sb.exists("c/none")
    sb.mkdir("c/d/e", recursive=True)
    assert sb.move_file("c/t.txt", "c/d")["newPath"] == "/workspace/c/d/t.txt"
    sb.rename_file("c/d/t.txt", "c/d/u.txt")
    files = sb.list_files("c", recursive=True)
    assert {f.relative_path for f in files} == {"bin", "d", "d/e", "d/u.txt"}
    assert next(f for f in files if f.name == "bin").size == 256
    sb.delete_file("c/d/u.txt")
    with pytest.raises(errors.FileNotFound):
        sb.read_file("c/d/u.txt")


def test_async_client_file_methods(daemon: Any, room_id: str) -> None:
    import asyncio

    from sandboxd.client import AsyncClient

    async def go() -> None:
        async with AsyncClient(daemon.socket, timeout=60) as ac:
            sb = ac.sandbox(room_id)
            await sb.write_file("a.bin", b"\x00\xff" * 1000)
            assert (await sb.read_file("a.bin")).data == b"\x00\xff" * 1000
            assert (await sb.read_file("a.bin", stream=True)).data == b"\x00\xff" * 1000
            await sb.mkdir("x/y", recursive=True)
            await sb.move_file("a.bin", "x/y")
            assert await sb.exists("x/y/a.bin")
            assert [f.name for f in await sb.list_files("x/y")] == ["a.bin"]
            await sb.rename_file("x/y/a.bin", "x/b.bin")
            await sb.delete_file("x/b.bin")
            assert not await sb.exists("x/b.bin")
            await ac.call("destroy", {"sandboxId": room_id})

    asyncio.run(go())


def _ctl(daemon: Any, *args: str, stdin: bytes | None = None) -> Any:
    import subprocess

    from tests.conftest import SANDBOXCTL

    return subprocess.run([SANDBOXCTL, "--socket", daemon.socket, *args], input=stdin,
                          capture_output=True, timeout=120)


def test_sandboxctl_file_commands(daemon: Any, room_id: str, tmp_path: Any) -> None:
    data = os.urandom(9 * MiB + 7)  # more than one 4 MiB upload piece
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    assert _ctl(daemon, "write", room_id, "cli/big.bin", str(src)).returncode == 0
    assert _ctl(daemon, "write", room_id, "cli/in.txt", stdin=b"from stdin\n").returncode == 0
    assert _ctl(daemon, "read", room_id, "cli/in.txt").stdout == b"from stdin\n"
    out = tmp_path / "out.bin"
    assert _ctl(daemon, "read", room_id, "cli/big.bin", "-o", str(out)).returncode == 0
    assert out.read_bytes() == data
    assert _ctl(daemon, "mkdir", room_id, "-p", "cli/x/y").returncode == 0
    assert _ctl(daemon, "mv", room_id, "cli/in.txt", "cli/x").returncode == 0
    ls = _ctl(daemon, "ls", room_id, "cli", "-R").stdout.decode()
    assert "x/in.txt" in ls and "big.bin" in ls and "x/y/" in ls
    assert _ctl(daemon, "rm", room_id, "cli/x/in.txt").returncode == 0
    r = _ctl(daemon, "read", room_id, "cli/x/in.txt")
    assert r.returncode == 1 and b"FILE_NOT_FOUND" in r.stderr
    r = _ctl(daemon, "rm", room_id, "cli/x")
    assert r.returncode == 1 and b"IS_DIRECTORY" in r.stderr
    git = _ctl(daemon, "git", room_id, "--upload-pack=x")
    assert git.returncode in (1, 2)


def test_sandboxctl_cp_round_trip(daemon: Any, room_id: str, tmp_path: Any) -> None:
    import hashlib

    tree = tmp_path / "proj"
    (tree / "sub" / "deep").mkdir(parents=True)
    big = os.urandom(6 * MiB)
    (tree / "sub" / "deep" / "big.bin").write_bytes(big)
    (tree / "ünï cödé.txt").write_text("hi\n")
    (tree / "link").symlink_to("sub/deep/big.bin")
    (tree / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (tree / "run.sh").chmod(0o755)
    r = _ctl(daemon, "cp", str(tree), f"{room_id}:/workspace/dst")
    assert r.returncode == 0, r.stderr
    with daemon.client() as c:
        sb = c.sandbox(room_id)
        res = sb.exec("cd /workspace/dst/proj && sha256sum sub/deep/big.bin && readlink link "
                      "&& ./run.sh && cat 'ünï cödé.txt'")
        assert res.stdout.split()[0] == hashlib.sha256(big).hexdigest()
        assert res.stdout.splitlines()[1:] == ["sub/deep/big.bin", "ran", "hi"]
        sb.exec("echo made-in-room > /workspace/dst/proj/new.txt")
    back = tmp_path / "back"
    r = _ctl(daemon, "cp", f"{room_id}:/workspace/dst/proj", str(back))
    assert r.returncode == 0, r.stderr
    assert (back / "proj" / "sub" / "deep" / "big.bin").read_bytes() == big
    assert (back / "proj" / "new.txt").read_text() == "made-in-room\n"
    assert os.readlink(back / "proj" / "link") == "sub/deep/big.bin"
    assert os.stat(back / "proj" / "run.sh").st_mode & 0o111
    r = _ctl(daemon, "cp", f"{room_id}:/workspace/nope", str(back))
    assert r.returncode == 1 and b"FILE_NOT_FOUND" in r.stderr
    # the temporary archives are gone
    with daemon.client() as c:
        assert not [f for f in c.sandbox(room_id).list_files("/tmp", include_hidden=True)
                    if f.name.startswith(".sandboxd-cp-")]


def test_example_code_execution_flow(daemon: Any, room_id: str) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "code_execution_flow.py"
    r = subprocess.run([sys.executable, str(example), "--socket", daemon.socket, "--room",
                        room_id], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"success": True, "output": "Hello from the sandbox!\n",
                                    "error": "45\n", "exitCode": 0}
    r = subprocess.run([sys.executable, str(example), "--socket", daemon.socket, "--room",
                        room_id, "raise SystemExit(3)"], capture_output=True, text=True,
                       timeout=120)
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["exitCode"] == 3 and not out["success"]
    with daemon.client() as c:
        assert [f.name for f in c.sandbox(room_id).list_files()] == []  # files deleted


def test_list_files_with_names_that_are_not_utf8(client: Any, room_id: str) -> None:
    """Issue 10, L2: one such name made listFiles fail for its directory and every recursive
    listing above it. It is listed, lossily in ``name`` and exactly in ``nameBase64``."""
    import base64

    sb = client.sandbox(room_id)
    r = sb.exec("mkdir -p /workspace/l2/sub && cd /workspace/l2 && touch ok.txt "
                "\"$(printf 'bad\\377name')\" && mkdir \"$(printf 'd\\376')\" && "
                "touch \"$(printf 'd\\376')/inner\"")
    assert r.exit_code == 0, r
    flat = call(client, "listFiles", room_id, path="/workspace/l2")
    byname = {f["name"]: f for f in flat["files"]}
    assert "ok.txt" in byname and "nameBase64" not in byname["ok.txt"]
    bad = [f for f in flat["files"] if "nameBase64" in f]
    assert sorted(base64.b64decode(f["nameBase64"]) for f in bad) == [b"bad\xffname", b"d\xfe"]
    assert all("\ufffd" in f["name"] for f in bad)
    deep = call(client, "listFiles", room_id, path="/workspace", recursive=True)
    inner = [f for f in deep["files"] if f["name"] == "inner"]
    assert inner and base64.b64decode(inner[0]["relativePathBase64"]) == b"l2/d\xfe/inner"
