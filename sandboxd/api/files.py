"""files: writeFile, readFile, deleteFile, renameFile, moveFile, mkdir, listFiles, exists.

Thin handlers over :mod:`sandboxd.roomfiles` (where the theory of operation is: the daemon never
opens, stats or lists a room path itself; the room init does and hands back fds). Here: params
to room-level calls, and their replies to result structs; ``readFile`` with ``stream`` sends
``file.chunk`` notifications of CHUNK bytes, paced by the client (``Connection.send`` drains).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import mimetypes
import os
from typing import Any, Literal

import msgspec

from .. import errors, protocol
from ..context import Context
from ..jail import messages as jm
from ..roomfiles import (
    CHUNK,
    LIST_TIMEOUT_S,
    MAX_LISTING_BYTES,
    MAX_READ_BYTES,
    _read_capped,
    _regular,
    check_path,
    init_op,
    now,
    write,
)
from ..rooms import Room, iso


async def _room(ctx: Context, sandbox_id: str) -> Room:
    return await ctx.rooms.get_or_create(ctx.uid, sandbox_id)


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



async def write_file(ctx: Context, p: protocol.WriteFileParams) -> protocol.WriteFileResult:
    path = check_path(p.path)
    data = _decode_content(p.content, p.encoding, path)
    room = await _room(ctx, p.sandbox_id)
    written = await write(room, path, data, append=p.append)
    return protocol.WriteFileResult(success=True, path=written, bytes_written=len(data),
                                    timestamp=now())


async def read_file(ctx: Context, p: protocol.ReadFileParams) -> protocol.ReadFileResult:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, (fd,) = await init_op(room, jm.OpenRead(path=path), path)
    loop = asyncio.get_running_loop()
    try:
        st = _regular(fd, path)
        if p.stream:
            cap = ctx.config.max_stream_read_bytes
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
    return protocol.ReadFileResult(
        success=True, path=reply.path, content=content, encoding=encoding,
        is_binary=binary, size=len(data), mime_type=_mime(path, binary), timestamp=now())


async def _stream(ctx: Context, fd: int, size: int, path: str, reply: jm.Opened,
                  encoding: str | None) -> protocol.ReadFileResult:
    """``file.chunk`` notifications up to the size the file had when opened (a file the room
    keeps appending to must not make an endless stream)."""
    import codecs

    loop = asyncio.get_running_loop()
    enc: Literal["utf-8", "base64"] = "utf-8" if encoding in ("utf-8", "utf8") else "base64"
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offset = 0
    chunks = 0
    while offset < size:
        data = await loop.run_in_executor(None, os.pread, fd, min(CHUNK, size - offset), offset)
        if not data:
            break  # it shrank
        text = base64.b64encode(data).decode("ascii") if enc == "base64" \
            else decoder.decode(data)
        await ctx.notify(protocol.FileChunk(request_id=ctx.request_id, data=text, encoding=enc,
                                            offset=offset))
        offset += len(data)
        chunks += 1
    if enc == "utf-8":
        tail = decoder.decode(b"", final=True)
        if tail:
            await ctx.notify(protocol.FileChunk(request_id=ctx.request_id, data=tail,
                                                encoding=enc, offset=offset))
            chunks += 1
    return protocol.ReadFileResult(
        success=True, path=reply.path, content="", encoding=enc, stream=True,
        chunks=chunks, size=offset, mime_type=_mime(path, enc == "base64"), timestamp=now())


async def delete_file(ctx: Context, p: protocol.PathParams) -> protocol.DeleteFileResult:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, _ = await init_op(room, jm.Delete(path=path), path)
    return protocol.DeleteFileResult(success=True, path=reply.path, timestamp=now())


async def _rename(ctx: Context, sandbox_id: str, src: str, dst: str, into: bool,
                  names: tuple[str, str]) -> protocol.RenameResult:
    check_path(src, names[0])
    check_path(dst, names[1])
    room = await _room(ctx, sandbox_id)
    try:
        reply, _ = await init_op(room, jm.Rename(src=src, dst=dst, into=into), src)
    except errors.FileError as err:
        # The init names the side that failed (source or destination) in its error's filename;
        # we only know "src" here, so say which paths were involved.
        err.context.update({"path": src, "newPath": dst})
        raise
    return protocol.RenameResult(success=True, path=reply.path, new_path=reply.new_path,
                                 timestamp=now())


async def rename_file(ctx: Context, p: protocol.RenameFileParams) -> protocol.RenameResult:
    return await _rename(ctx, p.sandbox_id, p.old_path, p.new_path, False,
                         ("oldPath", "newPath"))


async def move_file(ctx: Context, p: protocol.MoveFileParams) -> protocol.RenameResult:
    return await _rename(ctx, p.sandbox_id, p.source_path, p.destination_path, True,
                         ("sourcePath", "destinationPath"))


async def mkdir(ctx: Context, p: protocol.MkdirParams) -> protocol.MkdirResult:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, _ = await init_op(room, jm.Mkdir(path=path, recursive=p.recursive), path)
    return protocol.MkdirResult(success=True, path=reply.path,
                                recursive=p.recursive, timestamp=now())


async def exists(ctx: Context, p: protocol.PathParams) -> protocol.ExistsResult:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, _ = await init_op(room, jm.Exists(path=path), path)
    return protocol.ExistsResult(success=True, path=reply.path, exists=reply.exists,
                                 type=reply.type)


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
           mtime: float, mode: str) -> protocol.FileInfo:
    """One listing row. A name that is not UTF-8 (the init sends its bytes) is shown with
    U+FFFD in ``name`` and exactly in ``nameBase64`` (likewise ``relativePathBase64``)."""
    return protocol.FileInfo(
        name=_lossy(name), absolute_path=prefix + _lossy(rel), relative_path=_lossy(rel),
        type=kind, size=size, modified_at=iso(mtime), mode=mode,
        name_base64=base64.b64encode(name).decode("ascii") if isinstance(name, bytes)
        else protocol.UNSET,
        relative_path_base64=base64.b64encode(rel).decode("ascii") if isinstance(rel, bytes)
        else protocol.UNSET)


def _lossy(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


async def list_files(ctx: Context, p: protocol.ListFilesParams) -> protocol.ListFilesResult:
    path = check_path(p.path)
    room = await _room(ctx, p.sandbox_id)
    reply, (fd,) = await init_op(
        room, jm.ListDir(path=path, recursive=p.recursive, hidden=p.include_hidden), path,
        timeout=LIST_TIMEOUT_S)
    try:
        rows = await asyncio.get_running_loop().run_in_executor(None, _read_listing, fd, path)
    finally:
        os.close(fd)
    base = reply.path
    prefix = base.rstrip("/") + "/"
    files = [_entry(prefix, name, rel, kind, size, mtime, mode)
             for name, rel, kind, size, mtime, mode in rows]
    return protocol.ListFilesResult(success=True, path=base, count=len(files), files=files,
                                    truncated=reply.truncated, timestamp=now())
