"""A room's files, seen from the daemon: every operation is the room init's (room-level calls
used by ``api/files.py`` and the services, e.g. the code-run cache).

Theory of operation. The daemon runs with host credentials and therefore never opens, stats or
lists a room path itself (Judge0 CVE-2024-28185/28189 were host-side file handling of paths a
sandbox planted). Each method sends the path to the room init (``jail/fileops.py``), which
resolves it inside the room's mount namespace and either does the operation or hands back an
open fd (SCM_RIGHTS); the requests and replies are the structs of ``jail/messages.py``:

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
wire errors in one place: :func:`file_error`; a room whose init fails under a call becomes
one through :func:`errors.room_failure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import re
import stat
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, TypeVar

from . import errors, protocol
from .jail import JailError
from .jail import messages as jm
from .jail.handles import FdsTruncated
from .rooms import iso

if TYPE_CHECKING:
    from .rooms import Room

MAX_READ_BYTES = 32 * 1024 * 1024
CHUNK = 64 * 1024
MAX_LISTING_BYTES = 64 * 1024 * 1024
INIT_TIMEOUT_S = 30.0
PIPE_BYTES = 1024 * 1024  # the writeFile pipe (fs.pipe-max-size's default)
WRITE_BYTES_PER_S = 16 * 1024 * 1024  # the slowest rate a write's deadline allows for
HEADROOM_BYTES = 8 * 1024 * 1024  # kept free of a room's memory limit by writeFile
LIST_TIMEOUT_S = 120.0
CODE_BASE = "/tmp/.sandboxd"  # jail/fileops.CODE_BASE: the code-run cache

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

R = TypeVar("R", bound=jm.Reply)


def file_error(num: int, message: str, path: str, **context: object) -> errors.SandboxError:
    """The wire error for an OS error ``num`` on ``path`` (the user's path, as they sent it)."""
    if num in _ERRNO_VALIDATION:
        return errors.ValidationError(f"{path}: {message}", path=path, errno=num, **context)
    cls = _ERRNO_CLASS.get(num, errors.FileError)
    return cls(f"{path}: {message}", path=path, **context)



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


async def init_op(room: Room, msg: jm.Request[R], path: str, timeout: float = INIT_TIMEOUT_S,
                  fds: Sequence[int] = ()) -> tuple[R, list[int]]:
    """One request to the room init (passing ``fds``, which stay the caller's): its reply, with
    the fds that reply type carries (the channel checked the count), or its ErrorReply raised
    as a wire error naming ``path``. A reply of the wrong shape killed the room: the call is
    SANDBOX_UNAVAILABLE (``errors.room_failure``)."""
    op = type(msg).__struct_config__.tag
    try:
        reply, got = await room.handle.request(msg, list(fds), timeout=timeout)
    except FdsTruncated as err:
        raise errors.InternalError(f"sandbox {room.id}: no fd for the reply to {op}",
                                   sandboxId=room.id) from err
    except (JailError, TimeoutError) as err:
        raise errors.room_failure(err, room.id, f"{op} within {timeout} s") from err
    finally:
        room.touch()
    if isinstance(reply, jm.ErrorReply):
        num = reply.errno or errno.EIO
        raise file_error(num, _message(reply, num), path)
    return reply, got


def _message(err: jm.ErrorReply, num: int) -> str:
    """The init's explanation without Python's "[Errno N] ... : 'path'" decoration."""
    text = re.sub(r"^\[Errno \d+\] ", "", err.message)
    if err.filename is not None:
        text = text.removesuffix(f": {err.filename!r}")
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


async def write(room: Room, path: str, data: bytes, *, append: bool = False) -> str:
    """Write ``data`` to ``path`` in ``room`` (parents made; replaced, or appended to); the
    path the init wrote, resolved. A write that cannot fit in the room's memory is NO_SPACE
    up front."""
    check_path(path)
    _check_headroom(room, len(data), path)
    # The room init writes (fileops.FileWriter): the pages are the room's, and the target is
    # replaced only once every byte arrived. We pour the content into a pipe; a cancelled
    # request closes it early and the init throws the partial copy away.
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        reply_task = asyncio.ensure_future(init_op(
            room, jm.Write(path=path, append=append, size=len(data)),
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
    return reply.path


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


async def code_op(room: Room, action: Literal["state", "prepare", "seal", "remove"], name: str, *,
                  shared: bool = False) -> jm.CodeState:
    """One step on the code-run cache directory ``name`` (jail/fileops.py, "the code-run
    cache"): state, prepare, seal."""
    reply, _ = await init_op(room, jm.Code(action=action, name=name, shared=shared),
                             f"{CODE_BASE}/{name}")
    return reply
