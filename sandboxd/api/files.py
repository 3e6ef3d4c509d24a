"""files: writeFile, readFile, deleteFile, renameFile, moveFile, mkdir, listFiles, exists.

Theory of operation. The daemon runs with host credentials and therefore never opens, stats or
lists a room path itself (Judge0 CVE-2024-28185/28189 were host-side file handling of paths a
sandbox planted). Each method sends the path to the room init (``jail/fileops.py``), which
resolves it inside the room's mount namespace and either does the operation or hands back an
open fd (SCM_RIGHTS):

  readFile   init opens (regular files only) -> daemon reads the fd in a worker thread, at most
             MAX_READ_BYTES + 1 bytes (a file that grows while read still hits the cap); with
             ``stream`` it sends ``file.chunk`` notifications of CHUNK bytes, up to the size the
             file had when opened, paced by the client (``Connection.send`` drains)
  writeFile  init opens O_WRONLY|O_CREAT|O_TRUNC (parents created) -> daemon writes the content;
             ENOSPC/EDQUOT/EFBIG are NO_SPACE and the file is truncated so a failed write does not
             leave the room full
  the rest   metadata only: the init does it and replies; listings come back in a memfd

Every fd received is checked again here (fstat: a regular file, nothing else) before use, so a
directory or O_PATH fd can never be used as a ``dir_fd`` with host credentials, and a FIFO can
never block a worker thread. OS errors — the init's (as errno data) and our own writes' — become
wire errors in one place: :func:`file_error`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import fcntl
import mimetypes
import os
import re
import stat
import time
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from .. import errors, protocol
from ..jail import JailError, channel
from ..rooms import Room, iso
from . import Context, method

MAX_READ_BYTES = 32 * 1024 * 1024
CHUNK = 64 * 1024
MAX_LISTING_BYTES = 64 * 1024 * 1024
INIT_TIMEOUT_S = 30.0
PIPE_BYTES = 1024 * 1024  # the writeFile pipe (fs.pipe-max-size's default)
WRITE_BYTES_PER_S = 16 * 1024 * 1024  # the slowest rate a write's deadline allows for
HEADROOM_BYTES = 8 * 1024 * 1024  # kept free of a room's memory limit by writeFile
LIST_TIMEOUT_S = 120.0

Encoding = Literal["utf-8", "utf8", "base64"]

# errno -> error class: the single translation of OS errors for the file API.
_ERRNO_CLASS: dict[int, type[errors.FileError]] = {
    errno.ENOENT: errors.FileNotFound,
    errno.EISDIR: errors.IsDirectory,
    errno.ENOTDIR: errors.NotDirectory,
    errno.EEXIST: errors.FileExists,
    errno.ENOTEMPTY: errors.FileExists,
    errno.EACCES: errors.PermissionDenied,
    errno.EPERM: errors.PermissionDenied,
    errno.ELOOP: errors.PermissionDenied,  # a magic link (or a symlink loop) on the way
    errno.EBUSY: errors.PermissionDenied,
    errno.ENOSPC: errors.NoSpace,
    errno.EDQUOT: errors.NoSpace,
    errno.EFBIG: errors.NoSpace,
    errno.EROFS: errors.ReadOnly,
}
_ERRNO_VALIDATION = {errno.EINVAL, errno.ENAMETOOLONG, errno.EXDEV}


def file_error(num: int, message: str, path: str, **context: Any) -> errors.SandboxError:
    """The wire error for an OS error ``num`` on ``path`` (the user's path, as they sent it)."""
    if num in _ERRNO_VALIDATION:
        return errors.ValidationError(f"{path}: {message}", path=path, errno=num, **context)
    cls = _ERRNO_CLASS.get(num, errors.FileError)
    return cls(f"{path}: {message}", path=path, **context)


# --- params --------------------------------------------------------------------------------------


class WriteFileParams(protocol._Params, frozen=True):
    sandbox_id: str
    path: str
    content: str
    encoding: Encoding | None = None
    append: bool = False  # add to the end instead of replacing (chunked uploads, `cp`)


class ReadFileParams(protocol._Params, frozen=True):
    sandbox_id: str
    path: str
    encoding: Encoding | None = None
    stream: bool = False


class PathParams(protocol._Params, frozen=True):
    sandbox_id: str
    path: str


class RenameFileParams(protocol._Params, frozen=True):
    sandbox_id: str
    old_path: str
    new_path: str


class MoveFileParams(protocol._Params, frozen=True):
    sandbox_id: str
    source_path: str
    destination_path: str


class MkdirParams(protocol._Params, frozen=True):
    sandbox_id: str
    path: str
    recursive: bool = False


class ListFilesParams(protocol._Params, frozen=True):
    sandbox_id: str
    path: str = "/workspace"
    recursive: bool = False
    include_hidden: bool = False


# --- helpers -------------------------------------------------------------------------------------


def check_path(path: str, field: str = "path") -> str:
    """VALIDATION_FAILED for an empty path, a NUL byte, or more than MAX_PATH characters."""
    if not path:
        raise errors.ValidationError(f"{field} is empty", field=field, path=path)
    if "\x00" in path:
        raise errors.ValidationError(f"{field} contains a NUL byte", field=field, path=path)
    if len(path) > protocol.MAX_PATH:
        raise errors.ValidationError(f"{field} is longer than {protocol.MAX_PATH} characters",
                                     field=field, path=path[:256] + "...")
    return path


def now() -> str:
    return iso(time.time())


async def _room(ctx: Context, sandbox_id: str) -> Room:
    return await ctx.daemon.rooms.get_or_create(ctx.uid, sandbox_id)


async def init_op(room: Room, msg: dict[str, Any], path: str, nfds: int = 0,
                  timeout: float = INIT_TIMEOUT_S, fds: Sequence[int] = ()
                  ) -> tuple[dict[str, Any], list[int]]:
    """One request to the room init (passing ``fds``, which stay the caller's); its error reply
    raised as a wire error naming ``path``. Returns exactly ``nfds`` fds (closing any other the
    init sent)."""
    try:
        reply, fds = await room.handle.request(msg, list(fds), timeout=timeout)
    except JailError as err:
        raise errors.SandboxUnavailable(f"sandbox {room.id} is gone: {err}",
                                        sandboxId=room.id) from err
    except TimeoutError as err:
        raise errors.InternalError(f"sandbox {room.id}: the room init did not answer "
                                   f"{msg.get('op')} within {timeout} s",
                                   sandboxId=room.id) from err
    finally:
        room.touch()
    err_data = reply.get("error")
    if err_data is not None or len(fds) != nfds:
        for fd in fds:
            os.close(fd)
        if isinstance(err_data, dict):
            num = int(err_data.get("errno") or errno.EIO)
            raise file_error(num, _message(err_data, num), path)
        if reply.get(channel.TRUNCATED):
            raise errors.InternalError(f"sandbox {room.id}: no fd for the reply to "
                                       f"{msg.get('op')}", sandboxId=room.id) from OSError(
                errno.EMFILE, "the daemon is out of file descriptors")
        raise errors.InternalError(f"sandbox {room.id}: malformed reply to {msg.get('op')}",
                                   sandboxId=room.id)
    return reply, fds


def _message(err_data: dict[str, Any], num: int) -> str:
    """The init's explanation without Python's "[Errno N] ... : 'path'" decoration."""
    text = str(err_data.get("message") or "")
    text = re.sub(r"^\[Errno \d+\] ", "", text)
    filename = err_data.get("filename")
    if filename is not None:
        text = text.removesuffix(f": {str(filename)!r}")
    return text or os.strerror(num)


def _regular(fd: int, path: str) -> os.stat_result:
    # Second fence: the init already refused anything else, but a fd that is not a regular file
    # must never be read, written or used as a dir_fd with our credentials.
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise errors.PermissionDenied(f"{path}: not a regular file", path=path)
    return st


def _read_capped(fd: int, cap: int) -> bytes:
    """Up to cap + 1 bytes from offset 0 (one more than allowed tells "too large")."""
    out = bytearray()
    while len(out) <= cap:
        chunk = os.pread(fd, min(1 << 20, cap + 1 - len(out)), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _write_all(fd: int, data: bytes, keep: int) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        try:
            os.ftruncate(fd, keep)  # give the space back: a full room stays usable
        except OSError:
            pass
        raise


def _decode_content(content: str, encoding: str | None, path: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as err:
            raise errors.ValidationError(f"{path}: content is not valid base64: {err}",
                                         path=path, field="content") from err
    return content.encode("utf-8", "surrogatepass")


def _mime(path: str, binary: bool) -> str:
    guess, _ = mimetypes.guess_type(path, strict=False)
    if guess:
        return guess
    return "application/octet-stream" if binary else "text/plain"


# --- methods -------------------------------------------------------------------------------------


@method("writeFile", WriteFileParams)
async def write_file(ctx: Context, p: WriteFileParams) -> dict[str, Any]:
    path = check_path(p.path)
    data = _decode_content(p.content, p.encoding, path)
    room = await _room(ctx, p.sandbox_id)
    _check_headroom(room, len(data), path)
    # The room init writes (fileops.FileWriter): the pages are the room's, and the target is
    # replaced only once every byte arrived. We pour the content into a pipe; a cancelled
    # request closes it early and the init throws the partial copy away.
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        reply_task = asyncio.ensure_future(init_op(
            room, {"op": "f_write", "path": path, "append": p.append, "size": len(data)},
            path, fds=[r], timeout=INIT_TIMEOUT_S + len(data) / WRITE_BYTES_PER_S))
        pour = asyncio.ensure_future(_pour(w, data))
        try:
            # The reply first means the init gave up (an error, or the room died): stop pouring.
            await asyncio.wait({reply_task, pour}, return_when=asyncio.FIRST_COMPLETED)
            if not pour.done():
                pour.cancel()
            with contextlib.suppress(BrokenPipeError, asyncio.CancelledError):
                await pour
            os.close(w)  # EOF: the init commits if every byte arrived
            w = -1
            reply, _ = await reply_task
        finally:
            for task in (pour, reply_task):
                task.cancel()
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    return {"success": True, "path": reply.get("path", path), "bytesWritten": len(data),
            "timestamp": now()}


async def _pour(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the non-blocking pipe ``fd``, waiting for room as needed."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view[:PIPE_BYTES]):]
            continue
        except BlockingIOError:
            pass
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, _set_once, ready)
        try:
            await ready
        finally:
            loop.remove_writer(fd)


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _check_headroom(room: Room, size: int, path: str) -> None:
    """A room's files are RAM (tmpfs) charged to its memory limit: a write that cannot fit is
    refused up front, before it would make the kernel's OOM killer pick a victim in the room."""
    if not size or "memory" not in room.cgroup.enforced:
        return
    current = room.cgroup.stats().memory_current_bytes
    if current is None:
        return
    free = room.options.limits.memory_bytes - current
    if size > free - HEADROOM_BYTES:
        raise file_error(errno.ENOSPC, f"{size} bytes do not fit in the sandbox's memory "
                         f"limit ({max(free, 0)} bytes free; its files are held in memory)",
                         path, memoryBytes=room.options.limits.memory_bytes)


@method("readFile", ReadFileParams)
async def read_file(ctx: Context, p: ReadFileParams) -> dict[str, Any]:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, (fd,) = await init_op(room, {"op": "f_open_read", "path": path}, path, nfds=1)
    loop = asyncio.get_running_loop()
    try:
        st = _regular(fd, path)
        if p.stream:
            cap = ctx.daemon.config.max_stream_read_bytes
            if st.st_size > cap:
                raise errors.FileTooLarge(
                    f"{path}: {st.st_size} bytes is over the daemon's {cap}-byte limit for "
                    f"streamed reads", path=path, size=st.st_size, limit=cap,
                    allocatedBytes=st.st_blocks * 512)
            return await _stream(ctx, fd, st.st_size, path, reply, p.encoding)
        if st.st_size > MAX_READ_BYTES:
            raise errors.FileTooLarge(f"{path}: {st.st_size} bytes is over the "
                                      f"{MAX_READ_BYTES}-byte limit (use stream)", path=path,
                                      size=st.st_size, limit=MAX_READ_BYTES)
        data = await loop.run_in_executor(None, _read_capped, fd, MAX_READ_BYTES)
    finally:
        os.close(fd)
    if len(data) > MAX_READ_BYTES:  # it grew after the fstat
        raise errors.FileTooLarge(f"{path}: over the {MAX_READ_BYTES}-byte limit (use stream)",
                                  path=path, limit=MAX_READ_BYTES)
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    binary = text is None
    if p.encoding == "base64" or (p.encoding is None and binary):
        content, encoding = base64.b64encode(data).decode("ascii"), "base64"
    else:
        # utf-8 asked for explicitly: the caller wants text, lossy if it is not (isBinary says).
        content = text if text is not None else data.decode("utf-8", "replace")
        encoding = "utf-8"
    return {"success": True, "path": reply.get("path", path), "content": content,
            "encoding": encoding, "isBinary": binary, "size": len(data),
            "mimeType": _mime(path, binary), "timestamp": now()}


async def _stream(ctx: Context, fd: int, size: int, path: str, reply: dict[str, Any],
                  encoding: str | None) -> dict[str, Any]:
    """``file.chunk`` notifications up to the size the file had when opened (a file the room
    keeps appending to must not make an endless stream)."""
    import codecs

    loop = asyncio.get_running_loop()
    enc = "utf-8" if encoding in ("utf-8", "utf8") else "base64"
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offset = 0
    chunks = 0
    while offset < size:
        data = await loop.run_in_executor(None, os.pread, fd, min(CHUNK, size - offset), offset)
        if not data:
            break  # it shrank
        text = base64.b64encode(data).decode("ascii") if enc == "base64" \
            else decoder.decode(data)
        await ctx.notify("file.chunk", {"requestId": ctx.request_id, "data": text,
                                        "encoding": enc, "offset": offset})
        offset += len(data)
        chunks += 1
    if enc == "utf-8":
        tail = decoder.decode(b"", final=True)
        if tail:
            await ctx.notify("file.chunk", {"requestId": ctx.request_id, "data": tail,
                                            "encoding": enc, "offset": offset})
            chunks += 1
    return {"success": True, "path": reply.get("path", path), "content": "", "encoding": enc,
            "stream": True, "chunks": chunks, "size": offset,
            "mimeType": _mime(path, enc == "base64"), "timestamp": now()}


@method("deleteFile", PathParams)
async def delete_file(ctx: Context, p: PathParams) -> dict[str, Any]:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, _ = await init_op(room, {"op": "f_delete", "path": path}, path)
    return {"success": True, "path": reply.get("path", path), "timestamp": now()}


async def _rename(ctx: Context, sandbox_id: str, src: str, dst: str, into: bool,
                  names: tuple[str, str]) -> dict[str, Any]:
    check_path(src, names[0])
    check_path(dst, names[1])
    room = await _room(ctx, sandbox_id)
    msg = {"op": "f_rename", "src": src, "dst": dst, "into": into}
    try:
        reply, _ = await init_op(room, msg, src)
    except errors.FileError as err:
        # The init names the side that failed (source or destination) in its error's filename;
        # we only know "src" here, so say which paths were involved.
        err.context.update({"path": src, "newPath": dst})
        raise
    return {"success": True, "path": reply.get("path", src), "newPath": reply.get("newPath", dst),
            "timestamp": now()}


@method("renameFile", RenameFileParams)
async def rename_file(ctx: Context, p: RenameFileParams) -> dict[str, Any]:
    return await _rename(ctx, p.sandbox_id, p.old_path, p.new_path, False,
                         ("oldPath", "newPath"))


@method("moveFile", MoveFileParams)
async def move_file(ctx: Context, p: MoveFileParams) -> dict[str, Any]:
    return await _rename(ctx, p.sandbox_id, p.source_path, p.destination_path, True,
                         ("sourcePath", "destinationPath"))


@method("mkdir", MkdirParams)
async def mkdir(ctx: Context, p: MkdirParams) -> dict[str, Any]:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, _ = await init_op(room, {"op": "f_mkdir", "path": path, "recursive": p.recursive},
                             path)
    return {"success": True, "path": reply.get("path", path), "recursive": p.recursive,
            "timestamp": now()}


@method("exists", PathParams)
async def exists(ctx: Context, p: PathParams) -> dict[str, Any]:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, _ = await init_op(room, {"op": "f_exists", "path": path}, path)
    return {"success": True, "path": reply.get("path", path), "exists": bool(reply.get("exists")),
            "type": reply.get("type")}


# (names are str, or bytes when not UTF-8: msgspec has no str | bytes union, hence Any)
_Row = tuple[Any, Any, str, int, float, str]
_rows = msgspec.msgpack.Decoder(list[_Row])


def _read_listing(fd: int, path: str) -> list[_Row]:
    st = _regular(fd, path)
    if st.st_size > MAX_LISTING_BYTES:
        raise errors.InternalError(f"{path}: listing of {st.st_size} bytes is too large")
    data = _read_capped(fd, MAX_LISTING_BYTES)
    try:
        return _rows.decode(data)
    except msgspec.DecodeError as err:
        raise errors.InternalError(f"{path}: malformed listing from the room init") from err


def _entry(prefix: str, name: str | bytes, rel: str | bytes, kind: str, size: int,
           mtime: float, mode: str) -> dict[str, Any]:
    """One listing row. A name that is not UTF-8 (the init sends its bytes) is shown with
    U+FFFD in ``name`` and exactly in ``nameBase64`` (likewise ``relativePathBase64``)."""
    out: dict[str, Any] = {"name": _lossy(name), "absolutePath": prefix + _lossy(rel),
                           "relativePath": _lossy(rel), "type": kind, "size": size,
                           "modifiedAt": iso(mtime), "mode": mode}
    if isinstance(name, bytes):
        out["nameBase64"] = base64.b64encode(name).decode("ascii")
    if isinstance(rel, bytes):
        out["relativePathBase64"] = base64.b64encode(rel).decode("ascii")
    return out


def _lossy(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


@method("listFiles", ListFilesParams)
async def list_files(ctx: Context, p: ListFilesParams) -> dict[str, Any]:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, (fd,) = await init_op(room, {"op": "f_list", "path": path, "recursive": p.recursive,
                                        "hidden": p.include_hidden}, path, nfds=1,
                                 timeout=LIST_TIMEOUT_S)
    try:
        rows = await asyncio.get_running_loop().run_in_executor(None, _read_listing, fd, path)
    finally:
        os.close(fd)
    base = str(reply.get("path", path))
    prefix = base.rstrip("/") + "/"
    files = [_entry(prefix, name, rel, kind, size, mtime, mode)
             for name, rel, kind, size, mtime, mode in rows]
    return {"success": True, "path": base, "count": len(files), "files": files,
            "truncated": bool(reply.get("truncated")), "timestamp": now()}
