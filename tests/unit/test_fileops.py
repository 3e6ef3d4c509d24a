"""The room init's file operations (``jail/fileops.py``) called directly on a temporary directory.

They are dirfd/openat2-based and resolve absolute paths, so outside a room they work on the
host's tree as they do on the room's: each test works under ``tmp_path``. What a room adds (its
root, pseudo filesystems mounted inside it) is the integration and security tiers'."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import msgspec
import pytest
from conftest import skip_unless_ci

from sandboxd.jail import fileops, messages


def _errno(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno is not None
    return info.value.errno


def _write(path: Path, data: bytes, *, append: bool = False, size: int | None = None
           ) -> messages.Written:
    """Write through a FileWriter as the init does: the pipe filled, then stepped to the end."""
    r, w = os.pipe()
    writer = fileops.FileWriter(messages.Write(path=str(path), size=len(data) if size is None
                                               else size, append=append), [r])
    try:
        os.write(w, data)
        os.close(w)
        w = -1
        result = writer.step()
        assert result is not None
        return result
    finally:
        writer.close()
        if w >= 0:
            os.close(w)


# --- paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "want"), [
    ("a", "/workspace/a"), ("/a/../b", "/b"), ("/", "/"), ("//x", "/x"),
    ("a/./b/", "/workspace/a/b"), ("../../..", "/"),
])
def test_resolve(given: str, want: str) -> None:
    assert fileops.resolve(given) == want


def test_split() -> None:
    assert fileops.split("/") == ("/", "")
    assert fileops.split("/a") == ("/", "a")
    assert fileops.split("/a/b") == ("/a", "b")


# --- content -------------------------------------------------------------------------------------


def test_write_creates_parents_and_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "new" / "dir" / "f.txt"
    assert _write(target, b"one") == messages.Written(path=str(target), bytes_written=3)
    assert target.read_bytes() == b"one" and stat.S_IMODE(target.stat().st_mode) == 0o644
    target.chmod(0o600)
    _write(target, b"second")
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the old file's mode carries over
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.txt"]  # no temporary left


def test_append_in_place_and_cut_back_when_it_does_not_complete(tmp_path: Path) -> None:
    target = tmp_path / "log"
    target.write_bytes(b"old")
    inode = target.stat().st_ino
    _write(target, b"+new", append=True)
    assert target.read_bytes() == b"old+new" and target.stat().st_ino == inode
    with pytest.raises(OSError) as info:
        _write(target, b"+par", append=True, size=10)  # the daemon gave up mid-way
    assert info.value.errno == errno.ECANCELED
    assert target.read_bytes() == b"old+new"  # old, never old + a piece of the new


def test_a_write_that_sends_more_than_announced_fails_and_leaves_the_old(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"keep")
    with pytest.raises(OSError) as info:
        _write(target, b"too much", size=3)
    assert info.value.errno == errno.EINVAL
    assert target.read_bytes() == b"keep"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_write_follows_a_symlink_to_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.write_bytes(b"x")
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "abs").symlink_to(real)
    _write(tmp_path / "link", b"via relative")
    assert (tmp_path / "link").is_symlink() and real.read_bytes() == b"via relative"
    result = _write(tmp_path / "abs", b"via absolute")
    assert result.path == str(real) and real.read_bytes() == b"via absolute"
    (tmp_path / "loop").symlink_to("loop")
    assert _errno(_write, tmp_path / "loop", b"x") == errno.ELOOP


def test_write_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert _errno(_write, tmp_path / "fifo", b"x") == errno.EPERM
    (tmp_path / "d").mkdir()
    assert _errno(_write, tmp_path / "d", b"x") == errno.EISDIR
    assert _errno(_write, Path("/"), b"x") == errno.EISDIR


def test_a_writer_needs_exactly_one_pipe(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        fileops.FileWriter(messages.Write(path=str(tmp_path / "f"), size=1), [])
    assert info.value.errno == errno.EINVAL


def test_a_writer_waits_for_the_daemon_to_pour(tmp_path: Path) -> None:
    r, w = os.pipe()
    writer = fileops.FileWriter(messages.Write(path=str(tmp_path / "f"), size=4), [r])
    try:
        assert writer.step() is None  # nothing poured yet: the init keeps serving meanwhile
        os.write(w, b"ab")
        assert writer.step() is None
        os.write(w, b"cd")
        os.close(w)
        assert writer.step() == messages.Written(path=str(tmp_path / "f"), bytes_written=4)
    finally:
        writer.close()
    assert (tmp_path / "f").read_bytes() == b"abcd"


def test_open_read(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"12345")
    reply, fd = fileops.open_read(messages.OpenRead(path=str(f)))
    try:
        assert (reply.path, reply.size, stat.S_ISREG(reply.mode)) == (str(f), 5, True)
        assert os.read(fd, 10) == b"12345"
        assert os.get_blocking(fd) is False and not os.get_inheritable(fd)
    finally:
        os.close(fd)
    assert _errno(fileops.open_read, messages.OpenRead(path=str(tmp_path))) == errno.EISDIR
    assert _errno(fileops.open_read, messages.OpenRead(path=str(tmp_path / "no"))) \
        == errno.ENOENT


def test_kernel_interfaces_are_refused() -> None:
    # /proc/self/environ would be the init's (the daemon's) environment inside a room.
    assert _errno(fileops.open_read, messages.OpenRead(path="/proc/self/environ")) \
        == errno.EACCES
    assert _errno(fileops.delete, messages.Delete(path="/proc/self/environ")) == errno.EACCES


# --- metadata ------------------------------------------------------------------------------------


def test_exists(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    os.mkfifo(tmp_path / "p")
    for name, kind in (("f", "file"), ("", "directory"), ("p", "other")):
        assert fileops.exists(messages.Exists(path=str(tmp_path / name))) == messages.Existence(
            path=str(tmp_path / name) if name else str(tmp_path), exists=True, type=kind)
    for missing in ("nope", "f/below-a-file"):
        reply = fileops.exists(messages.Exists(path=str(tmp_path / missing)))
        assert (reply.exists, reply.type) == (False, None)


def test_delete(tmp_path: Path) -> None:
    (tmp_path / "target").write_bytes(b"t")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert fileops.delete(messages.Delete(path=str(tmp_path / "link"))) == messages.PathReply(
        path=str(tmp_path / "link"))
    assert (tmp_path / "target").exists()  # the link went, never its target
    (tmp_path / "d").mkdir()
    assert _errno(fileops.delete, messages.Delete(path=str(tmp_path / "d"))) == errno.EISDIR
    assert _errno(fileops.delete, messages.Delete(path="/")) == errno.EISDIR
    assert _errno(fileops.delete, messages.Delete(path=str(tmp_path / "gone"))) == errno.ENOENT


def test_rename_and_move_into(tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"a")
    dst_dir = tmp_path / "dir"
    dst_dir.mkdir()
    reply = fileops.rename(messages.Rename(src=str(src), dst=str(tmp_path / "b")))
    assert reply == messages.Renamed(path=str(src), new_path=str(tmp_path / "b"))
    reply = fileops.rename(messages.Rename(src=str(tmp_path / "b"), dst=str(dst_dir), into=True))
    assert reply.new_path == str(dst_dir / "b") and (dst_dir / "b").read_bytes() == b"a"
    # without ``into`` a directory destination is replaced only if it could be: here it is not
    (tmp_path / "c").write_bytes(b"c")
    assert _errno(fileops.rename, messages.Rename(src=str(tmp_path / "c"), dst=str(dst_dir))) \
        in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    with pytest.raises(OSError) as info:
        fileops.rename(messages.Rename(src=str(tmp_path / "missing"), dst=str(tmp_path / "x")))
    assert (info.value.errno, info.value.filename) == (errno.ENOENT, str(tmp_path / "missing"))
    assert _errno(fileops.rename, messages.Rename(src="/", dst=str(tmp_path / "x"))) \
        == errno.EBUSY
    assert _errno(fileops.rename, messages.Rename(src=str(tmp_path / "c"), dst="/")) \
        == errno.EBUSY


def test_mkdir(tmp_path: Path) -> None:
    d = tmp_path / "x"
    assert fileops.mkdir(messages.Mkdir(path=str(d))) == messages.PathReply(path=str(d))
    assert _errno(fileops.mkdir, messages.Mkdir(path=str(d))) == errno.EEXIST
    deep = tmp_path / "p" / "q" / "r"
    assert _errno(fileops.mkdir, messages.Mkdir(path=str(deep))) == errno.ENOENT
    fileops.mkdir(messages.Mkdir(path=str(deep), recursive=True))
    fileops.mkdir(messages.Mkdir(path=str(deep), recursive=True))  # mkdir -p: no error again
    assert deep.is_dir()
    (tmp_path / "file").write_bytes(b"")
    assert _errno(fileops.mkdir, messages.Mkdir(path=str(tmp_path / "file"),
                                                recursive=True)) == errno.EEXIST
    assert _errno(fileops.mkdir, messages.Mkdir(path="/")) == errno.EEXIST


def _rows(fd: int) -> list[list[object]]:
    try:
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
        rows: list[list[object]] = msgspec.msgpack.decode(data)
        return rows
    finally:
        os.close(fd)


def test_list_dir(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "inner").write_bytes(b"12")
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / ".hidden").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "b")
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"\xff"))  # not UTF-8
    reply, fd = fileops.list_dir(messages.ListDir(path=str(tmp_path)))
    rows = _rows(fd)
    assert (reply.count, reply.truncated) == (4, False)
    assert [(r[0], r[2]) for r in rows] == [("a", "file"), ("b", "directory"),
                                            ("link", "symlink"), (b"\xff", "directory")]
    assert rows[0][3] == 1 and rows[0][5] == "rw-r--r--"
    reply, fd = fileops.list_dir(messages.ListDir(path=str(tmp_path), recursive=True,
                                                  hidden=True))
    rels = [r[1] for r in _rows(fd)]
    # recursive, but never through the symlink
    assert rels == [".hidden", "a", "b", "b/inner", "link", b"\xff"]
    reply, fd = fileops.list_dir(messages.ListDir(path=str(tmp_path), recursive=True, limit=2))
    assert (reply.count, reply.truncated, len(_rows(fd))) == (2, True, 2)
    assert _errno(fileops.list_dir, messages.ListDir(path=str(tmp_path / "a"))) \
        == errno.ENOTDIR


def test_list_dir_stops_at_its_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileops, "LIST_MAX_DEPTH", 2)
    (tmp_path / "1" / "2" / "3" / "4").mkdir(parents=True)
    reply, fd = fileops.list_dir(messages.ListDir(path=str(tmp_path), recursive=True))
    assert [r[1] for r in _rows(fd)] == ["1", "1/2", "1/2/3"] and reply.truncated


# --- the code-run cache --------------------------------------------------------------------------


@pytest.fixture
def code_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    base = tmp_path / "code"
    base.mkdir()
    monkeypatch.setattr(fileops, "CODE_BASE", str(base))
    return base


def test_code_dir_prepare_and_state(code_base: Path) -> None:
    state = fileops.code_dir(messages.Code(action="state", name="py-1"))
    assert state == messages.CodeState(path=f"{code_base}/py-1", sealed=False)
    (code_base / "py-1" / "sub").mkdir(parents=True)
    (code_base / "py-1" / "sub" / "old").write_bytes(b"")
    (code_base / "py-1" / "sub").chmod(0o500)  # what a payload made read-only goes too
    fileops.code_dir(messages.Code(action="prepare", name="py-1", shared=True))
    assert list((code_base / "py-1").iterdir()) == []
    assert stat.S_IMODE((code_base / "py-1").stat().st_mode) == 0o777
    fileops.code_dir(messages.Code(action="prepare", name="py-1"))
    assert stat.S_IMODE((code_base / "py-1").stat().st_mode) == 0o755
    assert fileops.code_dir(messages.Code(action="state", name="py-1")).sealed is False
    for bad in ("", "a/b", ".hidden"):
        assert _errno(fileops.code_dir, messages.Code(action="state", name=bad)) == errno.EINVAL


def test_code_dir_seal(code_base: Path) -> None:
    if os.geteuid() != 0 or not fileops.seal_uid_mapped():
        skip_unless_ci("sealing chowns to SEAL_UID: needs root and that id mapped")
    fileops.code_dir(messages.Code(action="prepare", name="c-1"))
    (code_base / "c-1" / "bin").write_bytes(b"x")
    (code_base / "c-1" / "bin").chmod(0o775)
    os.chown(code_base, fileops.SEAL_UID, fileops.SEAL_UID)
    fileops.code_dir(messages.Code(action="seal", name="c-1"))
    st = (code_base / "c-1" / "bin").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (fileops.SEAL_UID, 0o555)
    assert fileops.code_dir(messages.Code(action="state", name="c-1")).sealed is True
    fileops.code_dir(messages.Code(action="prepare", name="c-1"))  # a sealed one goes too
    assert list((code_base / "c-1").iterdir()) == []


def test_seal_uid_mapped_reads_the_map(tmp_path: Path) -> None:
    m = tmp_path / "uid_map"
    m.write_text("         0     100000       4096\n")
    assert fileops.seal_uid_mapped(str(m)) is True
    m.write_text("         0       1000          1\n")
    assert fileops.seal_uid_mapped(str(m)) is False
    assert fileops.seal_uid_mapped(str(tmp_path / "none")) is False
