"""Escape attempts through the file API. Every one must fail.

Secrets are planted on the host where a daemon that opened room paths with its own credentials
would find them (Judge0 CVE-2024-28185/28189): a root-only file, a file in the daemon's state
directory (readable by the daemon's uid), a world-readable file in the host's /tmp, the daemon's
socket, /etc/shadow. The room then plants symlinks, ``..`` chains, /proc magic links and racing
swaps that point at them, and we assert — on every answer and on the host afterwards — that no
secret ever comes back and no host file changed. Where the path also exists inside the room we
put a decoy there, to show that the room's file (and only it) is what the API reaches.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sandboxd import errors

pytestmark = pytest.mark.security

DECOY = "decoy-inside-the-room\n"


class Planted:
    def __init__(self, daemon: Any) -> None:
        self.token = "SECRET-" + secrets.token_hex(16)
        base = f"/root/sbx-secret-{secrets.token_hex(4)}"
        self.root_only = base
        self.state_file = os.path.join(daemon.state_dir, "secret.txt")
        self.host_tmp = f"/tmp/sbx-secret-{secrets.token_hex(4)}"
        self.victim = os.path.join(daemon.state_dir, "victim.txt")
        self.socket = daemon.socket
        for path, mode, owner in ((self.root_only, 0o600, 0),
                                  (self.state_file, 0o600, daemon.user.pw_uid),
                                  (self.host_tmp, 0o644, 0),
                                  (self.victim, 0o600, daemon.user.pw_uid)):
            with open(path, "w") as f:
                f.write(self.token + "\n")
            os.chmod(path, mode)
            os.chown(path, owner, owner)
        with open("/etc/shadow") as f:
            self.shadow_root = next(line for line in f if line.startswith("root:")).strip()
        self.paths = [self.root_only, self.state_file, self.host_tmp, self.victim,
                      self.socket, "/etc/shadow"]

    def cleanup(self) -> None:
        for path in (self.root_only, self.state_file, self.host_tmp, self.victim):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def assert_host_intact(self) -> None:
        for path in (self.root_only, self.state_file, self.host_tmp, self.victim):
            with open(path) as f:
                assert f.read() == self.token + "\n", f"host file {path} was changed"
        assert os.path.exists(self.socket)

    def assert_absent(self, value: Any) -> None:
        text = repr(value)
        assert self.token not in text
        assert base64.b64encode(self.token.encode()).decode()[:20] not in text
        assert self.shadow_root not in text, "host /etc/shadow content leaked"


@pytest.fixture
def planted(daemon: Any) -> Iterator[Planted]:
    p = Planted(daemon)
    yield p
    p.assert_host_intact()
    p.cleanup()


def call(client: Any, method: str, room: str, **params: Any) -> Any:
    return client.call(method, {"sandboxId": room, **params})


def attempt(planted: Planted, client: Any, method: str, room: str, **params: Any) -> Any:
    """Call; an error is fine, a result must carry no secret. Returns the result or error."""
    try:
        out = call(client, method, room, **params)
    except errors.SandboxError as err:
        planted.assert_absent(err.to_wire())
        return err
    planted.assert_absent(out)
    return out


def sh(client: Any, room: str, line: str) -> Any:
    return client.sandbox(room).exec(line)


# --- planted links -------------------------------------------------------------------------------


def test_symlinks_to_host_paths_reach_only_the_room(client: Any, room_id: str,
                                                    planted: Planted) -> None:
    lines = [f"ln -s '{p}' /workspace/l{i}" for i, p in enumerate(planted.paths)]
    sh(client, room_id, "; ".join(lines))
    for i, _path in enumerate(planted.paths):
        for method, extra in (("readFile", {}), ("readFile", {"encoding": "base64"}),
                              ("readFile", {"stream": True}), ("exists", {}),
                              ("listFiles", {})):
            res = attempt(planted, client, method, room_id, path=f"l{i}", **extra)
            if method == "readFile":
                assert isinstance(res, errors.FileNotFound), (i, res)
            if method == "exists":
                assert res["exists"] is False
    # Decoys at the same paths inside the room: that (and only that) is what we read.
    sh(client, room_id, "; ".join(f"mkdir -p \"$(dirname '{p}')\"; rm -f '{p}'; "
                                  f"printf '{DECOY.strip()}\\n' > '{p}'"
                                  for p in planted.paths))
    for i in range(len(planted.paths)):
        res = attempt(planted, client, "readFile", room_id, path=f"l{i}")
        assert res["content"] == DECOY


def test_writes_and_deletes_through_links_stay_in_the_room(client: Any, room_id: str,
                                                            planted: Planted) -> None:
    # The victim's directory exists in the room too, so the write through the link succeeds —
    # at the room's version of that path.
    sh(client, room_id, f"mkdir -p '{os.path.dirname(planted.victim)}'; "
                        f"ln -s '{planted.victim}' /workspace/w; "
                        f"ln -s '{os.path.dirname(planted.victim)}' /workspace/wd; "
                        f"ln -s '{planted.root_only}' /workspace/d")
    assert attempt(planted, client, "writeFile", room_id, path="w",
                   content="overwritten")["success"]
    # The write happened — in the room, at the room's version of that path.
    assert sh(client, room_id, f"cat '{planted.victim}'").stdout == "overwritten"
    attempt(planted, client, "writeFile", room_id, path="wd/new.txt", content="created")
    attempt(planted, client, "deleteFile", room_id, path="d")
    attempt(planted, client, "deleteFile", room_id, path="wd/victim.txt")
    attempt(planted, client, "renameFile", room_id, oldPath="wd/secret.txt", newPath="stolen")
    attempt(planted, client, "mkdir", room_id, path="wd/madedir", recursive=True)
    planted.assert_host_intact()
    assert not os.path.exists(os.path.join(os.path.dirname(planted.victim), "new.txt"))
    assert not os.path.exists(os.path.join(os.path.dirname(planted.victim), "madedir"))


def test_dotdot_chains_and_absolute_host_paths(client: Any, room_id: str,
                                               planted: Planted) -> None:
    for target in planted.paths:
        for path in (target, "../../../../../../.." + target, "/workspace/../../.." + target,
                     "a/b/../../../../../" + target.lstrip("/"), "//" + target,
                     "/./" + target + "/."):
            res = attempt(planted, client, "readFile", room_id, path=path)
            assert isinstance(res, errors.SandboxError)
            attempt(planted, client, "exists", room_id, path=path)
    res = attempt(planted, client, "listFiles", room_id, path="../../../..")
    names = {f["name"] for f in res["files"]}
    assert "workspace" in names  # the room's root, not the host's
    assert not names & {"boot", "srv", "media", "lost+found"}  # host-only top-level dirs


def test_proc_root_and_cwd_magic_links(client: Any, daemon: Any, room_id: str,
                                       planted: Planted) -> None:
    # A payload that stays alive while we probe its /proc entries.
    def hold() -> None:
        with daemon.client() as c:
            c.sandbox(room_id).exec("sleep 30", timeout=30)

    holder = threading.Thread(target=hold)
    holder.start()
    pid = ""
    for _ in range(100):
        pid = sh(client, room_id, "pgrep -xo sleep || true").stdout.strip()
        if pid:
            break
        time.sleep(0.05)
    assert pid
    for prefix in ("/proc/self/root", "/proc/1/root", "/proc/1/cwd", f"/proc/{pid}/root",
                   f"/proc/{pid}/cwd", "/proc/thread-self/root"):
        for target in planted.paths:
            res = attempt(planted, client, "readFile", room_id, path=prefix + target)
            assert isinstance(res, errors.SandboxError)
            attempt(planted, client, "writeFile", room_id, path=prefix + target, content="x")
            attempt(planted, client, "deleteFile", room_id, path=prefix + target)
            attempt(planted, client, "exists", room_id, path=prefix + target)
        res = attempt(planted, client, "listFiles", room_id, path=prefix)
        if not isinstance(res, errors.SandboxError):
            assert "workspace" in {f["name"] for f in res["files"]}
    # Links *to* magic links, and fd magic links.
    sh(client, room_id, "ln -s /proc/1/root/etc /workspace/viaproc; "
                        "exec 7</workspace; ln -s /proc/self/fd/7 /workspace/viafd")
    for path in ("viaproc/shadow", "viafd", "/proc/1/fd/0", "/proc/self/fd/3",
                 "/proc/self/environ", "/proc/1/environ", "/proc/1/mem", "/proc/1/cmdline"):
        res = attempt(planted, client, "readFile", room_id, path=path)
        assert isinstance(res, errors.SandboxError), (path, res)
    # The init's environment is the daemon's: never readable through the API.
    res = attempt(planted, client, "readFile", room_id, path="/proc/1/environ")
    assert isinstance(res, errors.PermissionDenied)
    sh(client, room_id, "pkill -x sleep; true")
    holder.join(30)


def test_hard_links_to_host_files_cannot_be_made(client: Any, room_id: str,
                                                 planted: Planted) -> None:
    # The writable layer is the room's own tmpfs and /usr is a read-only bind: a hard link to a
    # host file needs the host file on the same, writable filesystem — it never is.
    r = sh(client, room_id, "ln /usr/bin/env /workspace/hl 2>&1; echo rc=$?")
    assert "rc=0" not in r.stdout
    r = sh(client, room_id, f"ln '{planted.root_only}' /workspace/hl2 2>&1; echo rc=$?")
    assert "rc=0" not in r.stdout
    for path in ("hl", "hl2"):
        assert isinstance(attempt(planted, client, "readFile", room_id, path=path),
                          errors.FileNotFound)
    # A hard link within the room works and reads the room's file.
    sh(client, room_id, "echo mine > /workspace/orig; ln /workspace/orig /workspace/hl3")
    assert attempt(planted, client, "readFile", room_id, path="hl3")["content"] == "mine\n"


def test_links_swapped_during_reads_never_reach_the_host(daemon: Any, room_id: str,
                                                         planted: Planted) -> None:
    """A room process flips /workspace/swap between a regular file, symlinks to every secret,
    a FIFO and a directory while we read it as fast as we can."""
    from sandboxd.client import Client

    targets = " ".join(f"'{p}'" for p in planted.paths)
    racer = (
        f"cd /workspace; echo {DECOY.strip()} > real; mkfifo fifo; mkdir dir; "
        f"end=$(($(date +%s) + 6)); while [ $(date +%s) -lt $end ]; do "
        f"for t in {targets} /proc/1/environ /proc/1/root/etc/passwd fifo dir; do "
        f"ln -sfn real s.tmp && mv -fT s.tmp swap; ln -sfn \"$t\" s.tmp && mv -fT s.tmp swap; "
        f"done; done")
    with Client(daemon.socket, timeout=60) as setup:
        setup.call("getSandbox", {"sandboxId": room_id})
    done = threading.Event()

    def race() -> None:
        with Client(daemon.socket, timeout=60) as c:
            c.sandbox(room_id).exec(racer, timeout=10)
        done.set()

    th = threading.Thread(target=race)
    th.start()
    outcomes: dict[str, int] = {}
    slowest = 0.0
    try:
        with Client(daemon.socket, timeout=30) as c:
            for _ in range(600):  # until the racer runs (it makes dir before it loops)
                if done.is_set() or c.sandbox(room_id).exists("/workspace/dir"):
                    break
                time.sleep(0.05)
            while not done.is_set():
                for method, extra in (("readFile", {}), ("readFile", {"stream": True}),
                                      ("writeFile", {"content": "w"}), ("listFiles", {})):
                    t0 = time.monotonic()
                    res = attempt(planted, c, method, room_id, path="swap", **extra)
                    slowest = max(slowest, time.monotonic() - t0)
                    key = f"{method}:{type(res).__name__ if isinstance(res, Exception) else 'ok'}"
                    outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        th.join(30)
    print(f"swap race outcomes: {outcomes}; slowest call {slowest * 1000:.0f} ms")
    assert slowest < 5, "a FIFO or a swap made a file call hang"
    assert sum(outcomes.values()) > 50, outcomes
    assert outcomes.get("readFile:ok", 0) > 0, outcomes  # the race really was raced
    planted.assert_host_intact()


def test_rooms_cannot_reach_each_other(client: Any, room_id: str, planted: Planted) -> None:
    other = room_id[:50] + "-b"
    call(client, "writeFile", other, path="/workspace/private.txt", content=planted.token)
    try:
        sh(client, room_id, "ln -s /workspace/private.txt /workspace/p")
        for path in ("/workspace/private.txt", "p", "/proc/1/root/workspace/private.txt"):
            res = attempt(planted, client, "readFile", room_id, path=path)
            assert isinstance(res, errors.SandboxError)
    finally:
        call(client, "destroy", other)


def test_the_daemon_state_dir_and_socket_are_not_in_the_room(client: Any, room_id: str,
                                                              planted: Planted,
                                                              daemon: Any) -> None:
    for path in (daemon.state_dir, os.path.dirname(daemon.socket),
                 os.path.join(daemon.state_dir, "rooms")):
        res = attempt(planted, client, "listFiles", room_id, path=path)
        assert isinstance(res, errors.FileNotFound), (path, res)
    r = sh(client, room_id, f"ls -la '{daemon.state_dir}' '{daemon.socket}' 2>&1; "
                            f"cat /proc/1/environ 2>&1 | head -c 100")
    planted.assert_absent(r.stdout)


HOSTILE_TAR = r'''
import io, tarfile
def add(tf, name, data=b"x", **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    ti.size = len(data) if ti.type == tarfile.REGTYPE else 0
    tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
with tarfile.open("/workspace/out/evil.tar", "w", format=tarfile.GNU_FORMAT) as tf:
    add(tf, "../escape-dotdot.txt", b"TOKEN")
    add(tf, "/tmp/escape-absolute.txt", b"TOKEN")
    add(tf, "sub/../../escape-inner.txt", b"TOKEN")
    add(tf, "ln", type=tarfile.SYMTYPE, linkname="OUTSIDE")
    add(tf, "ln/through-symlink.txt", b"TOKEN")
    add(tf, "hard", type=tarfile.LNKTYPE, linkname="/etc/passwd")
    add(tf, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
    add(tf, "fifo", type=tarfile.FIFOTYPE)
    add(tf, "suid", b"#!/bin/sh\n", mode=0o6755)
    add(tf, "ok.txt", b"fine")
'''


def test_archives_from_a_room_are_extracted_defensively(client: Any, room_id: str,
                                                        planted: Planted,
                                                        tmp_path: Any) -> None:
    """``sandboxctl cp ROOM:... DIR`` extracts what the room hands out: a hostile tar (the room
    can swap the temporary archive) must not write outside DIR, through a symlink, make devices
    or keep setuid bits."""
    from sandboxd.client import safe_extract

    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    script = HOSTILE_TAR.replace("OUTSIDE", str(outside)).replace("TOKEN", planted.token)
    sb = client.sandbox(room_id)
    r = sb.exec("mkdir -p /workspace/out && python3 -", stdin=script)
    assert r.exit_code == 0, r.stderr
    import tempfile

    with tempfile.TemporaryFile() as spool:
        sb.read_file("out/evil.tar", stream=spool)
        spool.seek(0)
        counts = safe_extract(spool, str(dest))
    assert (dest / "ok.txt").read_text() == "fine"
    assert counts["skipped"] >= 6
    assert os.stat(dest / "suid").st_mode & 0o7000 == 0
    assert not (dest / "dev").exists() and not (dest / "fifo").exists()
    assert not (dest / "hard").exists()
    assert list(outside.iterdir()) == []  # nothing written through the symlink
    for p in (tmp_path / "escape-dotdot.txt", tmp_path / "escape-inner.txt",
              "/tmp/escape-absolute.txt"):
        assert not os.path.exists(p)
    # and the whole copy path refuses the same archive's tricks
    back = tmp_path / "back"
    sb.copy_from("out", str(back))
    assert list(outside.iterdir()) == [] and (back / "out" / "evil.tar").exists()


def test_copy_out_recreates_no_symlink_that_leaves_the_destination(client: Any, room_id: str,
                                                                    tmp_path: Any) -> None:
    """Issue 10, L5: ``cp ROOM:dir DEST`` recreated symlinks pointing anywhere on the host; a
    later ``cat DEST/dir/passwd`` or an editor saving through it touched host files the room
    chose. Links inside the copied tree stay; links that leave it are skipped (tar's ``data``
    filter rule)."""
    sb = client.sandbox(room_id)
    r = sb.exec("mkdir -p /workspace/tree/sub && echo in > /workspace/tree/sub/f && cd "
                "/workspace/tree && ln -s /etc/passwd abs && ln -s ../../../../../etc up && "
                "ln -s sub/f ok && ln -s ../tree/sub/f ok2 && ln -s .. sub/parent && "
                "ln -s ../../.. sub/out; true")
    assert r.exit_code == 0, r
    dest = tmp_path / "dest"
    sb.copy_from("tree", str(dest))
    tree = dest / "tree"
    assert os.readlink(tree / "ok") == "sub/f" and (tree / "ok").read_text() == "in\n"
    assert os.readlink(tree / "sub" / "parent") == ".."
    assert (tree / "ok2").read_text() == "in\n"  # ../tree/sub/f: still inside DEST
    for name in ("abs", "up", "sub/out"):
        assert not os.path.lexists(tree / name), name


def test_sparse_file_cannot_flood_a_streamed_read(client: Any, room_id: str) -> None:
    """Issue 10, M3: a 100 GB sparse file costs the room nothing; streaming it wrote 830 MB to
    the host in 5 s. Streamed reads stop at the daemon's max_stream_read_bytes (1 GiB)."""
    sb = client.sandbox(room_id)
    assert sb.exec("truncate -s 100G /workspace/sparse && echo ok").stdout == "ok\n"
    got: list[int] = []
    with pytest.raises(errors.FileTooLarge) as err:
        sb.read_file("/workspace/sparse", stream=lambda chunk: got.append(len(chunk)))
    assert err.value.context["limit"] == 1 << 30
    assert err.value.context["allocatedBytes"] < 1 << 20  # it really is (nearly) all holes
    assert sum(got) == 0
