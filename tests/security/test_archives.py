"""Hostile archives through importSandbox and restoreBackup (issue 25, "Safety"). Every one must
fail to write outside the target directory, fill the host, or leave the target half-replaced;
after each we check the target, the rest of the room, a neighbour room and the host.

The archives are built here with Python's tarfile (gzip), as an attacker would hand-craft them:
absolute names, ``..`` names, a symlink and then a file through it, a hard link to a file outside,
device nodes, set-id bits, a decompression bomb, and bytes that are no archive at all.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import secrets
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sandboxd import errors

pytestmark = pytest.mark.security

MiB = 1024 * 1024


def archive(add: Callable[[tarfile.TarFile], None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tf:
        add(tf)
    return buf.getvalue()


def member(name: str, data: bytes = b"pwned\n", **attrs: Any) -> tuple[tarfile.TarInfo, Any]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    for k, v in attrs.items():
        setattr(info, k, v)
    if info.type != tarfile.REGTYPE:
        info.size = 0
        return info, None
    return info, io.BytesIO(data)


def files(*members: tuple[tarfile.TarInfo, Any]) -> bytes:
    def add(tf: tarfile.TarFile) -> None:
        for info, data in members:
            tf.addfile(info, data)
    return archive(add)


SNAPSHOT = ("cd / && find /workspace /tmp /home /root -xdev ! -path '/tmp/.sandboxd*' "
            "-printf '%p %y %m %n %s %l\\n' 2>/dev/null | LC_ALL=C sort")


class Scene:
    """A room with a target dir and files around it, a neighbour room, and host sentinels."""

    def __init__(self, client: Any, room_id: str, state_dir: str) -> None:
        self.sb = client.sandbox(room_id)
        self.neighbour = client.sandbox(room_id[:50] + "-nb")
        self.sb.get({"limits": {"diskBytes": 64 * MiB}})
        assert self.sb.exec(
            "mkdir -p /workspace/target/keep /home/sandbox && echo mine > /workspace/target/keep/f"
            " && echo outside > /workspace/outside.txt && echo secret > /workspace/secret"
            " && echo home > /home/sandbox/h && ln -s /etc /workspace/etclink"
            " && ln -s /tmp /workspace/tmplink").exit_code == 0
        self.neighbour.write_file("/workspace/n", "neighbour")
        self.token = "SENTINEL-" + secrets.token_hex(8)
        self.host_files = [f"/tmp/sbx-arch-{secrets.token_hex(4)}",
                           os.path.join(state_dir, f"sentinel-{secrets.token_hex(4)}")]
        for p in self.host_files:
            with open(p, "w") as f:
                f.write(self.token)
        self.before = self.snapshot()
        self.neighbour_before = self.neighbour.exec(SNAPSHOT).stdout
        self.host_tmp = set(os.listdir("/tmp"))

    def snapshot(self) -> str:
        res = self.sb.exec(SNAPSHOT)
        assert res.exit_code == 0, res.stderr
        return res.stdout

    def import_(self, data: bytes, dir: str = "/workspace/target") -> Any:
        try:
            return self.sb.import_archive(data, dir)
        except errors.SandboxError as err:
            return err

    def assert_unchanged(self, allow: Callable[[str], bool] | None = None) -> None:
        now = self.snapshot()
        if allow is None:
            assert now == self.before
        else:
            # Only lines under the target that ``allow`` accepts may differ.
            diff = set(now.splitlines()) ^ set(self.before.splitlines())
            assert all(allow(line) for line in diff), sorted(diff)
        assert self.neighbour.exec(SNAPSHOT).stdout == self.neighbour_before
        for p in self.host_files:
            with open(p) as f:
                assert f.read() == self.token, f"host file {p} changed"
        new = set(os.listdir("/tmp")) - self.host_tmp
        assert not [n for n in new if "pwn" in n or "evil" in n], new

    def cleanup(self) -> None:
        for p in self.host_files:
            with contextlib.suppress(OSError):
                os.unlink(p)
        for sb in (self.sb, self.neighbour):
            with contextlib.suppress(Exception):
                sb.destroy()


@pytest.fixture
def scene(client: Any, daemon: Any, room_id: str) -> Iterator[Scene]:
    s = Scene(client, room_id, daemon.state_dir)
    yield s
    s.cleanup()


def test_dot_dot_members_are_refused_and_the_target_is_unchanged(scene: Scene) -> None:
    for name in ("../pwn-dotdot", "a/../../pwn-dotdot", "../../../../../tmp/pwn-dotdot"):
        got = scene.import_(files(member("ok.txt"), member(name)))
        assert isinstance(got, errors.InvalidArchive), (name, got)
        scene.assert_unchanged()


def test_absolute_names_land_inside_the_target(scene: Scene) -> None:
    got = scene.import_(files(member("/workspace/outside.txt"), member("/tmp/pwn-abs")))
    assert not isinstance(got, errors.SandboxError), got
    # tar strips the leading "/": both end up below the target, nothing outside changed.
    assert scene.sb.read_file("/workspace/target/workspace/outside.txt").text == "pwned\n"
    assert scene.sb.read_file("/workspace/outside.txt").text == "outside\n"
    assert scene.sb.exists("/tmp/pwn-abs") is False
    scene.assert_unchanged(lambda line: line.startswith("/workspace/target"))


def test_a_symlink_then_a_file_through_it_cannot_write_outside(scene: Scene) -> None:
    for link, through in (("..", "up/outside.txt"), ("/workspace", "up/outside.txt"),
                          ("/tmp", "up/pwn-link")):
        data = files(member("up", type=tarfile.SYMTYPE, linkname=link),
                     member(through))
        got = scene.import_(data)
        assert scene.sb.read_file("/workspace/outside.txt").text == "outside\n", (link, got)
        assert scene.sb.exists("/tmp/pwn-link") is False
        scene.assert_unchanged(lambda line: line.startswith("/workspace/target"))


def test_a_hard_link_to_a_file_outside_is_not_made(scene: Scene) -> None:
    for target in ("../secret", "/workspace/secret", "../../workspace/secret"):
        got = scene.import_(files(member("h", type=tarfile.LNKTYPE, linkname=target)))
        assert isinstance(got, errors.InvalidArchive), (target, got)
        # The outside file has one name still: no link to it was made anywhere.
        assert scene.sb.exec("stat -c %h /workspace/secret").stdout.strip() == "1"
        scene.assert_unchanged()


def test_device_nodes_are_refused_and_set_id_bits_stripped(scene: Scene) -> None:
    for kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        got = scene.import_(files(member("null", type=kind, devmajor=1, devminor=3)))
        assert isinstance(got, errors.InvalidArchive), got
        scene.assert_unchanged()
    got = scene.import_(files(member("suid", b"#!/bin/sh\nid\n", mode=0o6755),
                              member("sgid-dir", type=tarfile.DIRTYPE, mode=0o2775)))
    assert not isinstance(got, errors.SandboxError), got
    modes = scene.sb.exec("stat -c '%n %a' /workspace/target/suid /workspace/target/sgid-dir"
                          ).stdout.split()
    assert modes == ["/workspace/target/suid", "755", "/workspace/target/sgid-dir", "775"]


def test_a_decompression_bomb_is_no_space_and_the_target_is_unchanged(scene: Scene) -> None:
    """300 MiB of zeros (about 300 KiB compressed) into a room whose disk is 64 MiB."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("zeros")
        info.size = 300 * MiB
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    assert len(bomb) < 2 * MiB
    got = scene.import_(bomb)
    assert isinstance(got, errors.NoSpace), got
    scene.assert_unchanged()
    # The room's disk is free again: the staging directory went with the failure.
    used = scene.sb.exec("du -sm /workspace | cut -f1").stdout.strip()
    assert int(used) < 8, used


def test_bytes_that_are_no_archive_and_a_target_that_leads_out(scene: Scene) -> None:
    for junk in (b"", os.urandom(4096), gzip.compress(os.urandom(4096))):
        got = scene.import_(junk)
        assert isinstance(got, errors.InvalidArchive), got
        scene.assert_unchanged()
    ok = files(member("pwn-via-link"))
    for target in ("/workspace/etclink", "/workspace/tmplink", "/workspace/tmplink/x"):
        got = scene.import_(ok, target)
        assert isinstance(got, errors.ValidationError), (target, got)
        assert scene.sb.exists("/tmp/pwn-via-link") is False
        scene.assert_unchanged()


def test_restore_of_another_tenants_backup_id_is_not_found(scene: Scene, client: Any) -> None:
    with pytest.raises(errors.BackupNotFound):
        scene.sb.restore_backup("bk-" + "0" * 16)
    with pytest.raises(errors.BackupNotFound):
        scene.sb.restore_backup("../../rooms/x")
    scene.assert_unchanged()
