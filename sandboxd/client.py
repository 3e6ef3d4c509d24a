"""Clients for sandboxd: a blocking :class:`Client` and its asyncio twin :class:`AsyncClient`.

Theory of operation
-------------------
Both speak newline-delimited JSON-RPC 2.0 over the daemon's Unix socket (one message per line,
batches included) and connect lazily on the first call.

* :class:`Client` owns one blocking socket and a lock. A call holds the lock from sending its
  request until its response arrives, so one thread's call never reads another's response; the
  notifications that arrive meanwhile (``exec.output`` ...) belong to that call and go to its
  callback. Threads share a Client safely but their calls are serialised; use AsyncClient (or one
  Client per thread) for concurrency. A callback must not call its own Client (refused: it would
  read the answers the outer call waits for).
* :class:`AsyncClient` owns one connection and a reader task. Any number of calls may be in flight:
  each registers a future (and optionally a notification callback) under its request id; the reader
  resolves futures by response ``id`` and routes notifications by ``params.requestId``.

Failures are :mod:`sandboxd.errors` classes: wire errors are rebuilt with ``errors.from_wire``; a
missing socket, a refused connection, a dropped connection or a client-side timeout raise
``errors.DaemonUnreachable`` naming the socket path.

Adding an RPC is one line on :class:`Sandbox` / :class:`AsyncSandbox` (``self._call("name", ...)``):
keyword arguments are snake_case in Python and camelCase on the wire, ``None`` means "not sent".
This module imports nothing of the daemon (no server, rooms or jail), so ``sandboxctl`` starts fast.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import math
import select
import socket as _socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from . import errors, protocol
from .config import default_client_socket, fallback_socket_dir, untrusted_dir

if TYPE_CHECKING:
    import asyncio  # imported where used: it would double `sandboxctl`'s start-up time

__all__ = [
    "AsyncClient",
    "AsyncProcess",
    "AsyncSandbox",
    "Client",
    "CopyFromResult",
    "CopyToResult",
    "ExecResult",
    "FileContent",
    "FileInfo",
    "OutputCallback",
    "Process",
    "ProgressCallback",
    "RunCodeResult",
    "Sandbox",
    "SandboxInfo",
    "Terminal",
    "Watcher",
]

#: ``on_output(stream, data)``: stream is "stdout" or "stderr", data a decoded chunk of text.
OutputCallback = Callable[[str, str], Any]
#: ``on_notification(method, params)`` for raw calls.
NotificationCallback = Callable[[str, dict[str, Any]], Any]

#: Per-run limits: the struct, or its wire dict (``{"cpuTimeMs": 300}``).
Limits = protocol.RunLimits | Mapping[str, Any] | None

#: A response line may carry a whole file (readFile caps at 32 MiB, base64 adds a third).
MAX_LINE = 256 * 1024 * 1024
_RECV = 256 * 1024

# --- results ---------------------------------------------------------------------------------
# The result types are the wire's own (``protocol``): every method's result is decoded with its
# struct from ``protocol.METHODS`` (unknown fields ignored, and kept in ``.raw``); they read as
# their wire dicts too (``result["exitCode"]``).

ExecResult = protocol.ExecResult
RunCodeResult = protocol.RunCodeResult
SandboxInfo = protocol.SandboxInfo
FileInfo = protocol.FileInfo
R = TypeVar("R", bound=protocol.Result)

#: ``progress(done)`` of the long operations (``copy_to``/``copy_from``): bytes moved so far.
ProgressCallback = Callable[[int], Any]


class CopyToResult(protocol.Result, frozen=True):
    """``Sandbox.copy_to`` (client-side: writeFile in pieces, then ``tar -x`` in the room):
    ``bytes`` of archive uploaded. Reads as a dict too (``r["bytes"]``), as it used to be."""

    source: str
    destination: str
    bytes: int


class CopyFromResult(protocol.Result, frozen=True):
    """``Sandbox.copy_from`` (``tar -c`` in the room, streamed out, extracted defensively):
    what was extracted, and how many unsafe entries were ``skipped``."""

    source: str
    destination: str
    files: int
    directories: int
    symlinks: int
    skipped: int
    bytes: int


class FileContent(protocol.ReadFileResult, frozen=True):
    """The result of ``readFile``: ``data`` is always the file's bytes (decoded from base64 when
    the daemon sent that), ``text`` its UTF-8 reading. After a streamed read into a callback or
    a file object, ``data`` is empty and ``size`` tells how much was delivered."""

    @property
    def data(self) -> bytes:
        got: bytes = self.__dict__.get("_data", b"")
        return got

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _result(method: str, raw: Any, shape: type[R]) -> R:
    """``raw`` (the decoded JSON result) as ``shape``: the method's result struct in METHODS, or
    a subclass of it (FileContent)."""
    if not issubclass(shape, protocol.METHODS[method].result):
        raise TypeError(f"{shape.__name__} is not the result of {method}")
    if not isinstance(raw, dict):
        raise errors.ProtocolError(f"expected an object in the result of {method}, "
                                   f"got {type(raw).__name__}", method=method)
    return protocol.convert_result(method, raw, shape)


#: ``read_file(stream=...)``: True collects the chunks into ``data``; a callable gets each chunk's
#: bytes; an object with ``write`` (a binary file) gets them written.
StreamSink = Any
CHUNK_UPLOAD = 4 * 1024 * 1024


def _write_params(sandbox_id: str, path: str, content: str | bytes, encoding: str | None,
                  append: bool) -> protocol.WriteFileParams:
    if isinstance(content, bytes):
        import base64

        content, encoding = base64.b64encode(content).decode("ascii"), "base64"
    return _build(protocol.WriteFileParams, sandbox_id=sandbox_id, path=path, content=content,
                  encoding=encoding, append=append)


class _Chunks:
    """Routes ``file.chunk`` notifications (decoded to bytes) to a read_file ``stream`` sink."""

    def __init__(self, sink: StreamSink) -> None:
        self.buf = bytearray()
        self.size = 0
        if sink is True:
            self._put: Callable[[bytes], Any] = self.buf.extend
        elif callable(sink):
            self._put = sink
        elif hasattr(sink, "write"):
            self._put = sink.write
        else:
            raise TypeError("stream must be True, a callable or a binary file object")

    def __call__(self, method: str, params: dict[str, Any]) -> None:
        if method != "file.chunk":
            return
        data = params.get("data", "")
        if params.get("encoding") == "base64":
            import base64

            chunk = base64.b64decode(data)
        else:
            chunk = str(data).encode("utf-8")
        self.size += len(chunk)
        self._put(chunk)


def _file_content(result: Any, chunks: _Chunks | None) -> FileContent:
    out = _result("readFile", result, FileContent)
    if chunks is not None:
        data = bytes(chunks.buf)
    elif out.encoding == "base64":
        import base64

        data = base64.b64decode(out.content)
    else:
        data = out.content.encode("utf-8")
    out.__dict__["_data"] = data
    return out


# --- cp: tar archives streamed in chunks ---------------------------------------------------------


class _Uploader:
    """A write-only file object for ``tarfile`` (mode "w|"): every CHUNK_UPLOAD bytes become one
    ``writeFile(append)`` of a temporary archive in the room, so memory stays bounded."""

    def __init__(self, sandbox: Sandbox, path: str,
                 progress: ProgressCallback | None = None) -> None:
        self.sandbox = sandbox
        self.path = path
        self.buf = bytearray()
        self.sent = 0
        self.first = True
        self.progress = progress

    def write(self, data: bytes) -> int:
        self.buf += data
        if len(self.buf) >= CHUNK_UPLOAD:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self.buf or self.first:
            self.sandbox.write_file(self.path, bytes(self.buf), append=not self.first)
            self.sent += len(self.buf)
            self.buf.clear()
            self.first = False
            if self.progress is not None:
                self.progress(self.sent)


class _Counted:
    """A binary sink that reports the bytes written through it so far to ``progress``."""

    def __init__(self, sink: Any, progress: ProgressCallback) -> None:
        self.sink = sink
        self.progress = progress
        self.done = 0

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        self.done += len(data)
        self.progress(self.done)
        return len(data)


def _open_dir_nofollow(parent: int, name: str) -> int:
    import os

    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)
        return os.open(name, flags, dir_fd=parent)


def _link_stays_inside(parts: list[str], target: str) -> bool:
    """Whether a symlink at ``parts`` (relative to the destination) pointing at ``target``
    names something inside the destination: never an absolute target, never one whose ``..``
    climbs above it. Links that leave the destination are not recreated on the host (issue 10,
    L5): a later tool following them would read or write host files the room chose."""
    import posixpath

    if not target or target.startswith("/") or "\0" in target:
        return False
    joined = posixpath.normpath(posixpath.join(*parts[:-1], target) if parts[:-1] else target)
    return joined != ".." and not joined.startswith("../")


def safe_extract(fileobj: Any, dest: str) -> dict[str, int]:
    """Extract a tar stream that came out of a room into host directory ``dest``.

    The archive is the room's work, so it is hostile input (CVE-2007-4559 and its many
    descendants): names are taken relative to ``dest`` only (absolute names and ``..`` refused),
    every directory on the way is opened with O_NOFOLLOW (a symlink in the archive, or already in
    ``dest``, is never written through), files are created O_EXCL|O_NOFOLLOW after removing what
    was there, modes lose setuid/setgid/sticky, and hard links, devices and FIFOs are skipped,
    and so are symlinks that would point outside ``dest`` (absolute, or climbing out with ``..``).
    This Python (3.11.2) has no tarfile extraction filters, hence the hand-written walk.
    """
    import errno
    import os
    import tarfile

    os.makedirs(dest, exist_ok=True)
    root = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    counts = {"files": 0, "directories": 0, "symlinks": 0, "skipped": 0, "bytes": 0}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for m in tf:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if not parts or ".." in parts or m.name.startswith("/"):
                    counts["skipped"] += 1
                    continue
                if not (m.isfile() or m.isdir() or m.issym()):
                    counts["skipped"] += 1
                    continue
                dfd = os.dup(root)
                try:
                    try:
                        for comp in parts[:-1]:
                            nfd = _open_dir_nofollow(dfd, comp)
                            os.close(dfd)
                            dfd = nfd
                    except OSError as err:
                        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                            raise
                        counts["skipped"] += 1  # its directory is a symlink (or a file)
                        continue
                    name = parts[-1]
                    if m.isdir():
                        try:
                            os.close(_open_dir_nofollow(dfd, name))
                        except OSError as err:
                            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                                raise
                            counts["skipped"] += 1  # a symlink or a file took the name
                            continue
                        counts["directories"] += 1
                        continue
                    if m.issym() and not _link_stays_inside(parts, m.linkname):
                        counts["skipped"] += 1  # the `data` filter's rule (PEP 706)
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dfd)
                    if m.issym():
                        os.symlink(m.linkname, name, dir_fd=dfd)
                        counts["symlinks"] += 1
                        continue
                    src = tf.extractfile(m)
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, (m.mode & 0o777) | 0o600, dir_fd=dfd)
                    with os.fdopen(fd, "wb") as out:
                        while src is not None and (block := src.read(1 << 20)):
                            out.write(block)
                            counts["bytes"] += len(block)
                    counts["files"] += 1
                except OSError as err:
                    raise errors.FileError(f"cannot extract {m.name!r} into {dest}: {err}",
                                           path=m.name) from err
                finally:
                    os.close(dfd)
    finally:
        os.close(root)
    return counts


# --- params ------------------------------------------------------------------------------------


P = TypeVar("P", bound=protocol.Params)


def _build(shape: type[P], **given: Any) -> P:
    """A params struct from keyword arguments; ``None`` means "not sent" (the field's default).
    Nested limits may be given as structs or as their wire dicts."""
    fields = {k: v for k, v in given.items() if v is not None}
    for key in ("limits", "compile_limits"):
        if isinstance(fields.get(key), Mapping):
            fields[key] = protocol.convert_params(key, dict(fields[key]), protocol.RunLimits)
    return shape(**fields)


def _room_options(options: Any) -> dict[str, Any] | None:
    """getSandbox's options: a ``config.RoomOptions`` (or any struct) or its wire dict."""
    if isinstance(options, msgspec.Struct):
        out: dict[str, Any] = msgspec.to_builtins(options)
        return out
    return dict(options) if options is not None else None


def _timeout_ms(timeout: float | None) -> int | None:
    if timeout is None:
        return None
    if not timeout > 0 or math.isinf(timeout) or timeout * 1000 > protocol.MAX_MS:
        raise errors.ValidationError("timeout must be a positive number of seconds, at most "
                                     f"{protocol.MAX_MS // 1000}", field="timeout")
    return max(1, math.ceil(timeout * 1000))


def _stdin_text(stdin: str | bytes | None) -> str | None:
    if isinstance(stdin, bytes):
        try:
            return stdin.decode("utf-8")
        except UnicodeDecodeError as err:
            raise errors.ValidationError(f"stdin must be UTF-8 text: {err}",
                                         field="stdin") from err
    return stdin


def _exec_params(sandbox_id: str, command: str, args: Sequence[str] | None, cwd: str | None,
                 env: Mapping[str, str | None] | None, stdin: str | bytes | None,
                 timeout: float | None, stream: bool, limits: Limits, user: str | None,
                 session_id: str | None = None) -> protocol.ExecParams:
    return _build(protocol.ExecParams, sandbox_id=sandbox_id, command=command,
                  args=list(args) if args is not None else None, cwd=cwd,
                  env=dict(env) if env is not None else None, stdin=_stdin_text(stdin),
                  timeout=_timeout_ms(timeout), stream=stream, limits=limits, user=user,
                  session_id=session_id)


def _code_params(sandbox_id: str, language: str, code: str, stdin: str | None,
                 args: Sequence[str] | None, files: Mapping[str, str] | None, limits: Limits,
                 compile_limits: Limits, user: str | None) -> protocol.RunCodeParams:
    return _build(protocol.RunCodeParams, sandbox_id=sandbox_id, language=language, code=code,
                  stdin=stdin, args=list(args) if args is not None else None,
                  files=dict(files) if files is not None else None, limits=limits,
                  compile_limits=compile_limits, user=user)


# --- ports (docs/ports.md) ---------------------------------------------------------------------

#: waitForPort's default timeout on the daemon (ports.WAIT_TIMEOUT_MS), in seconds
WAIT_FOR_PORT_TIMEOUT_S = 30.0


def _wait_port_params(sandbox_id: str, port: int, process_id: str | None, mode: str | None,
                      path: str | None, timeout: float | None) -> protocol.WaitForPortParams:
    return _build(protocol.WaitForPortParams, sandbox_id=sandbox_id, port=port,
                  process_id=process_id, mode=mode, path=path, timeout=_timeout_ms(timeout))


def _expose_params(sandbox_id: str, port: int, name: str | None,
                   unix_socket: bool) -> protocol.ExposePortParams:
    return _build(protocol.ExposePortParams, sandbox_id=sandbox_id, port=port, name=name,
                  unix_socket=unix_socket)


def _output_router(on_output: OutputCallback) -> NotificationCallback:
    def route(method: str, params: dict[str, Any]) -> Any:
        if method == "exec.output":
            return on_output(str(params.get("stream", "stdout")), str(params.get("data", "")))
        return None
    return route


#: ``on_result(bundle)`` for runInContext: a MIME bundle as it is displayed.
ResultCallback = Callable[[dict[str, Any]], Any]


def _context_router(on_output: OutputCallback | None,
                    on_result: ResultCallback | None) -> NotificationCallback:
    def route(method: str, params: dict[str, Any]) -> Any:
        if method == "context.output" and on_output is not None:
            return on_output(str(params.get("stream", "stdout")), str(params.get("text", "")))
        if method == "context.result" and on_result is not None:
            result = params.get("result")
            return on_result(result if isinstance(result, dict) else {})
        return None
    return route


def _cell_params(sandbox_id: str, context_id: str, code: str, timeout: float | None,
                 stream: bool) -> protocol.RunInContextParams:
    return _build(protocol.RunInContextParams, sandbox_id=sandbox_id, context_id=context_id,
                  code=code, timeout=max(1, int(timeout * 1000)) if timeout is not None else None,
                  stream=stream)


def _context_create_params(sandbox_id: str, language: str, cwd: str | None,
                           env: Mapping[str, str | None] | None, memory_bytes: int | None,
                           cpu_time_ms: int | None) -> protocol.CreateCodeContextParams:
    limits = None
    if memory_bytes is not None or cpu_time_ms is not None:
        limits = _build(protocol.ContextLimits, memory_bytes=memory_bytes,
                        cpu_time_ms=cpu_time_ms)
    return _build(protocol.CreateCodeContextParams, sandbox_id=sandbox_id, language=language,
                  cwd=cwd, env=dict(env) if env is not None else None, limits=limits)


#: a cell's call may stay silent for its timeout, the grace period and a kernel start
_CELL_SLACK_S = 75.0


def _call_deadline(client_timeout: float | None, exec_timeout: float | None) -> float | None:
    """A call that runs a command may legitimately stay silent for the command's own timeout."""
    if client_timeout is None:
        return None
    return client_timeout + (exec_timeout or 0)


# --- responses ---------------------------------------------------------------------------------


def _id_key(value: Any) -> Any:
    """Our ids are ints; a server that echoes them as strings still matches."""
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def _outcome(msg: dict[str, Any]) -> Any:
    """The result of a response, or the SandboxError it carries (returned, not raised)."""
    if "error" in msg:
        err = msg["error"]
        if not isinstance(err, dict):
            return errors.ProtocolError(f"malformed error object: {err!r}")
        return errors.from_wire(err)
    if "result" in msg:
        return msg["result"]
    return errors.ProtocolError("response has neither result nor error")


def _is_response(msg: Any) -> bool:
    return isinstance(msg, dict) and "method" not in msg and ("result" in msg or "error" in msg)


def _is_notification(msg: Any) -> bool:
    return isinstance(msg, dict) and isinstance(msg.get("method"), str) and "id" not in msg


def _unreachable(path: str, what: str,
                 err: BaseException | None = None) -> errors.DaemonUnreachable:
    detail = f": {err}" if err is not None and str(err) else ""
    return errors.DaemonUnreachable(f"sandboxd at {path}: {what}{detail}", socket=path)


def _connect_error(path: str, err: OSError) -> errors.DaemonUnreachable:
    if isinstance(err, FileNotFoundError):
        what = "no such socket (is sandboxd running? see `sandboxctl doctor`)"
    elif isinstance(err, ConnectionRefusedError):
        what = "connection refused (stale socket: sandboxd is not running)"
    elif isinstance(err, PermissionError):
        what = "permission denied (the socket belongs to another user)"
    else:
        what = "cannot connect"
    return _unreachable(path, what, err)


def _closed_by_peer(sock: _socket.socket) -> bool:
    """Between calls: did the daemon close this connection (its idle timeout)?"""
    import select

    # poll first: on a socket with a timeout, recv waits for it even with MSG_DONTWAIT.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError, TimeoutError):
        return False
    except OSError:
        return True


def check_socket_path(path: str) -> None:
    """Before connecting (H9): a socket under the /tmp fallback directory is used only if that
    directory and everything above it can be nobody else's (config.untrusted_dir)."""
    import os

    fallback = fallback_socket_dir()
    if os.path.realpath(path).startswith(os.path.realpath(fallback) + "/") \
            or path.startswith(fallback + "/"):
        reason = untrusted_dir(os.path.dirname(path))
        if reason is not None:
            raise _unreachable(path, f"refusing the socket: {reason} (another user may have "
                               "made it; set XDG_RUNTIME_DIR or SANDBOXD_SOCKET)")


def trusted_peer_uids(path: str) -> set[int]:
    """Uids a daemon behind ``path`` may run as: ours, root, the owner of the socket's
    directory (the system service's user owns /run/sandboxd), and $SANDBOXD_DAEMON_UID."""
    import os

    out = {os.geteuid(), 0}
    with contextlib.suppress(OSError):
        out.add(os.stat(os.path.dirname(os.path.realpath(path))).st_uid)
    with contextlib.suppress(KeyError, ValueError):
        out.add(int(os.environ["SANDBOXD_DAEMON_UID"]))
    return out


def check_peer(path: str, sock: _socket.socket) -> int:
    """After connecting: the server's SO_PEERCRED uid must be one we trust (H9: a socket planted
    by another user answered "pong from sandboxd evil"). Returns that uid."""
    import struct

    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    if uid not in trusted_peer_uids(path):
        raise _unreachable(path, f"refusing the server: it runs as uid {uid}, not as you, root "
                           "or the owner of the socket's directory (set SANDBOXD_DAEMON_UID to "
                           "trust it)")
    return int(uid)


# --- the blocking client -----------------------------------------------------------------------


class Client:
    """Blocking client. ``timeout`` (seconds) bounds connecting and each call's wait for an answer
    (an exec's own timeout is added to it); None waits forever."""

    def __init__(self, socket: str | None = None, timeout: float | None = None) -> None:
        self.socket_path = socket or default_client_socket()
        self.timeout = timeout
        self._sock: _socket.socket | None = None
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread inside _exchange
        #: The uid the daemon runs as (SO_PEERCRED), once connected: whom `doctor` diagnoses.
        self.server_uid: int | None = None

    # -- context manager / lifecycle

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None
        self._buf.clear()

    def _connection(self) -> _socket.socket:
        if self._sock is None:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
            sock.settimeout(self.timeout)
            try:
                check_socket_path(self.socket_path)
                sock.connect(self.socket_path)
                self.server_uid = check_peer(self.socket_path, sock)
            except OSError as err:
                sock.close()
                raise _connect_error(self.socket_path, err) from err
            except errors.SandboxError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    # -- framing

    def _send(self, message: Any) -> None:
        if self._sock is not None and not self._buf and _closed_by_peer(self._sock):
            self._drop()  # the daemon closed it while we were idle: start afresh
        sock = self._connection()
        try:
            sock.sendall(protocol.encode(message))
        except OSError as err:
            self._drop()
            raise _unreachable(self.socket_path, "send failed", err) from err

    def _wait_readable(self, timeout: float) -> bool:
        """Whether a message (or its start) is here or arrives within ``timeout`` seconds."""
        if self._buf:
            return True
        ready, _, _ = select.select([self._connection()], [], [], timeout)
        return bool(ready)

    def _read_message(self, deadline: float | None) -> Any:
        """One decoded message (skipping blank lines). Any transport failure drops the
        connection: after a timeout a late answer would otherwise be taken for the next call's."""
        sock = self._connection()
        sock.settimeout(deadline)
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                if not line.strip():
                    continue
                try:
                    return protocol.decode(line)
                except errors.ParseError:
                    self._drop()
                    raise
            if len(self._buf) > MAX_LINE:
                self._drop()
                raise errors.RequestTooLarge(f"a message from sandboxd exceeds {MAX_LINE} bytes")
            try:
                chunk = sock.recv(_RECV)
            except TimeoutError as err:
                self._drop()
                raise _unreachable(self.socket_path, f"no answer within {deadline} s") from err
            except OSError as err:
                self._drop()
                raise _unreachable(self.socket_path, "receive failed", err) from err
            if not chunk:
                self._drop()
                raise _unreachable(self.socket_path, "connection closed by the daemon")
            self._buf += chunk

    def _exchange(self, message: Any, ids: set[Any], on_notification: NotificationCallback | None,
                  deadline: float | None) -> dict[Any, Any]:
        """Send one message, collect an outcome per id (responses may come in any order, alone
        or in arrays), hand notifications to the callback meanwhile."""
        outcomes: dict[Any, Any] = {}
        if self._owner == threading.get_ident():
            # It would read (and lose) the answers the outer call is waiting for.
            raise RuntimeError("a Client cannot be called from one of its own callbacks; "
                               "use another Client")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                self._send(message)
                self._collect(outcomes, ids, on_notification, deadline)
            except BaseException:
                # Answers still unread (a callback raised, ^C, a timeout...) would be taken
                # for the next call's: start that one on a fresh connection.
                self._drop()
                raise
            finally:
                self._owner = None
        return outcomes

    def _collect(self, outcomes: dict[Any, Any], ids: set[Any],
                 on_notification: NotificationCallback | None, deadline: float | None) -> None:
        while len(outcomes) < len(ids):
            msg = self._read_message(deadline)
            for item in msg if isinstance(msg, list) else [msg]:
                if _is_notification(item):
                    if on_notification is not None:
                        on_notification(item["method"], item.get("params") or {})
                elif _is_response(item):
                    rid = _id_key(item.get("id"))
                    if rid in ids:
                        outcomes[rid] = _outcome(item)
                    elif rid is None and "error" in item:
                        # The server could not read an id: it is about what we just sent.
                        raise _outcome(item)

    # -- raw RPC

    def call(self, method: str, params: dict[str, Any] | None = None,
             on_notification: NotificationCallback | None = None, *,
             timeout: float | None = None) -> Any:
        """One request; returns its ``result`` or raises the rebuilt error.
        ``timeout`` overrides the client's for this call."""
        rid = next(self._ids)
        out = self._exchange(protocol.request(rid, method, params if params is not None else {}),
                             {rid}, on_notification, timeout if timeout is not None
                             else self.timeout)[rid]
        if isinstance(out, errors.SandboxError):
            raise out
        return out

    def call_batch(self, calls: Iterable[tuple[str, dict[str, Any] | None]],
                   on_notification: NotificationCallback | None = None) -> list[Any]:
        """One JSON-RPC batch. Returns one entry per call, in order: its result, or the
        SandboxError it failed with (returned, not raised — the others may have succeeded)."""
        reqs = [protocol.request(next(self._ids), m, p if p is not None else {}) for m, p in calls]
        if not reqs:
            return []
        ids = [r["id"] for r in reqs]
        out = self._exchange(reqs, set(ids), on_notification, self.timeout)
        return [out[i] for i in ids]

    # -- typed methods (their params and results are protocol.METHODS')

    def request(self, method: str, params: protocol.Params, shape: type[R],
                on_notification: NotificationCallback | None = None, *,
                timeout: float | None = None) -> R:
        """One typed call: ``params`` (the method's params struct) out, ``shape`` (its result
        struct, or a subclass) back."""
        return _result(method, self.call(method, protocol.params_to_wire(params),
                                         on_notification, timeout=timeout), shape)

    def ping(self, sandbox_id: str | None = None) -> protocol.PingResult:
        return self.request("ping", _build(protocol.PingParams, sandbox_id=sandbox_id),
                            protocol.PingResult)

    def list_sandboxes(self) -> list[SandboxInfo]:
        return self.request("listSandboxes", protocol.ListSandboxesParams(),
                            protocol.ListSandboxesResult).sandboxes

    def list_languages(self) -> list[protocol.LanguageInfo]:
        return self.request("listLanguages", protocol.ListLanguagesParams(),
                            protocol.ListLanguagesResult).languages

    def stats(self, sandbox_id: str | None = None) -> protocol.StatsResult:
        """Live usage of your rooms (all of them, or ``sandbox_id``)."""
        return self.request("stats", _build(protocol.StatsParams, sandbox_id=sandbox_id),
                            protocol.StatsResult)

    def list_backups(self, sandbox_id: str | None = None) -> list[protocol.BackupInfo]:
        """Your backups (of every room, or of ``sandbox_id``), oldest first."""
        return self.request("listBackups", _build(protocol.ListBackupsParams,
                                                  sandbox_id=sandbox_id),
                            protocol.ListBackupsResult).backups

    def delete_backup(self, backup_id: str) -> protocol.DeleteBackupResult:
        return self.request("deleteBackup", protocol.DeleteBackupParams(backup_id=backup_id),
                            protocol.DeleteBackupResult)

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """A handle; nothing is sent until you use it (``exec`` creates the room on demand)."""
        return Sandbox(self, sandbox_id)


class Sandbox:
    """One room, through a :class:`Client`."""

    def __init__(self, client: Client, sandbox_id: str) -> None:
        self.client = client
        self.id = sandbox_id

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r})"

    def get(self, options: Any = None) -> SandboxInfo:
        """Get or create the room; ``options`` is a ``config.RoomOptions`` or its wire dict."""
        return self.client.request("getSandbox", _build(
            protocol.GetSandboxParams, sandbox_id=self.id, options=_room_options(options)),
            SandboxInfo)

    def ping(self) -> protocol.PingResult:
        return self.client.ping(self.id)

    def destroy(self) -> protocol.DestroyResult:
        return self.client.request("destroy", protocol.DestroyParams(sandbox_id=self.id),
                                   protocol.DestroyResult)

    def run_code(self, language: str, code: str, *, stdin: str | None = None,
                 args: Sequence[str] | None = None, files: Mapping[str, str] | None = None,
                 limits: Limits = None, compile_limits: Limits = None,
                 user: str | None = None) -> protocol.RunCodeResult:
        """Compile (cached by source) and run ``code``; ``status`` OK, CE, RE, SG, TO, ML, OL,
        XX; ``compile`` holds the compiler's report."""
        return self.client.request("runCode", _code_params(
            self.id, language, code, stdin, args, files, limits, compile_limits, user),
            protocol.RunCodeResult)

    def run_example_code(self) -> list[protocol.ExampleResult]:
        """A hello world in every language; unavailable toolchains say ``available: False``."""
        return self.client.request("runExampleCode",
                                   protocol.RunExamplesParams(sandbox_id=self.id),
                                   protocol.RunExamplesResult).results

    def exec(self, command: str, args: Sequence[str] | None = None, *, cwd: str | None = None,
             env: Mapping[str, str | None] | None = None, stdin: str | bytes | None = None,
             timeout: float | None = None, on_output: OutputCallback | None = None,
             limits: Limits = None, user: str | None = None,
             session_id: str | None = None) -> ExecResult:
        """Run ``command`` with ``args`` (argv form) or, with ``args`` None, as a shell line.

        ``timeout`` is in seconds (sent as ms). With ``on_output``, output is streamed to it as
        it is produced (``on_output("stdout", "text")``) before this returns. With
        ``session_id`` the line runs in that session's shell (:meth:`create_session`).
        """
        params = _exec_params(self.id, command, args, cwd, env, stdin, timeout,
                              on_output is not None, limits, user, session_id)
        return self.client.request(
            "exec", params, ExecResult,
            _output_router(on_output) if on_output is not None else None,
            timeout=_call_deadline(self.client.timeout, timeout))

    # -- files (paths are resolved inside the room; relative ones against /workspace)

    def write_file(self, path: str, content: str | bytes, *, encoding: str | None = None,
                   append: bool = False) -> protocol.WriteFileResult:
        """Write ``content`` (bytes are sent as base64; a str as UTF-8 unless ``encoding`` says
        it already is base64); missing parent directories are created."""
        return self.client.request("writeFile",
                                   _write_params(self.id, path, content, encoding, append),
                                   protocol.WriteFileResult)

    def read_file(self, path: str, *, encoding: str | None = None,
                  stream: StreamSink = False) -> FileContent:
        """Read a file (up to 32 MiB; FILE_TOO_LARGE beyond). With ``stream`` there is no cap:
        True collects the chunks, a callable or a binary file object receives them."""
        chunks = _Chunks(stream) if stream is not False else None
        params = _build(protocol.ReadFileParams, sandbox_id=self.id, path=path,
                        encoding=encoding, stream=chunks is not None)
        result = self.client.call("readFile", protocol.params_to_wire(params), chunks)
        return _file_content(result, chunks if stream is True else None)

    def delete_file(self, path: str) -> protocol.DeleteFileResult:
        return self.client.request("deleteFile", protocol.PathParams(sandbox_id=self.id,
                                                                     path=path),
                                   protocol.DeleteFileResult)

    def rename_file(self, old_path: str, new_path: str) -> protocol.RenameResult:
        return self.client.request("renameFile", protocol.RenameFileParams(
            sandbox_id=self.id, old_path=old_path, new_path=new_path), protocol.RenameResult)

    def move_file(self, source_path: str, destination_path: str) -> protocol.RenameResult:
        return self.client.request("moveFile", protocol.MoveFileParams(
            sandbox_id=self.id, source_path=source_path, destination_path=destination_path),
            protocol.RenameResult)

    def mkdir(self, path: str, *, recursive: bool = False) -> protocol.MkdirResult:
        return self.client.request("mkdir", protocol.MkdirParams(
            sandbox_id=self.id, path=path, recursive=recursive), protocol.MkdirResult)

    def list_files(self, path: str | None = None, *, recursive: bool = False,
                   include_hidden: bool = False) -> list[FileInfo]:
        return self.client.request("listFiles", _build(
            protocol.ListFilesParams, sandbox_id=self.id, path=path, recursive=recursive,
            include_hidden=include_hidden), protocol.ListFilesResult).files

    def exists(self, path: str) -> bool:
        return self.client.request("exists", protocol.PathParams(sandbox_id=self.id, path=path),
                                   protocol.ExistsResult).exists

    def git_checkout(self, repo_url: str, *, branch: str | None = None,
                     target_dir: str | None = None, depth: int | None = None,
                     timeout: float | None = None) -> protocol.GitCheckoutResult:
        return self.client.request(
            "gitCheckout", _build(protocol.GitCheckoutParams, sandbox_id=self.id,
                                  repo_url=repo_url, branch=branch, target_dir=target_dir,
                                  depth=depth, timeout=_timeout_ms(timeout)),
            protocol.GitCheckoutResult,
            timeout=_call_deadline(self.client.timeout, timeout or 600))

    def copy_to(self, src: str, dest_dir: str, *,
                progress: ProgressCallback | None = None) -> CopyToResult:
        """Copy host file or directory ``src`` into room directory ``dest_dir`` (created).

        A tar stream is uploaded in CHUNK_UPLOAD pieces to a temporary archive in the room and
        extracted there by ``tar`` (so the room's disk briefly holds both). ``progress`` gets
        the archive bytes uploaded so far after each piece."""
        import os
        import secrets
        import tarfile

        tmp = f"/tmp/.sandboxd-cp-{secrets.token_hex(8)}.tar"
        up = _Uploader(self, tmp, progress)
        sink: Any = up  # write-only: tarfile's stream mode needs nothing more
        try:
            with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tf:
                tf.add(src, arcname=os.path.basename(os.path.normpath(src)) or ".")
            up.flush()
            self.mkdir(dest_dir, recursive=True)
            r = self.exec("tar", ["-x", "--no-same-owner", "-f", tmp, "-C", dest_dir])
            if r.exit_code != 0:
                raise errors.FileError(f"extracting into {dest_dir} failed: {r.stderr.strip()}",
                                       path=dest_dir)
        finally:
            with contextlib.suppress(errors.SandboxError):
                self.delete_file(tmp)
        return CopyToResult(source=src, destination=dest_dir, bytes=up.sent)

    def copy_from(self, src: str, dest_dir: str, *,
                  progress: ProgressCallback | None = None) -> CopyFromResult:
        """Copy room file or directory ``src`` into host directory ``dest_dir`` (created).

        ``tar`` archives it in the room; the archive is streamed out through a host temporary
        file (memory stays bounded) and extracted by :func:`safe_extract`. ``progress`` gets
        the archive bytes received so far after each chunk."""
        import posixpath
        import secrets
        import tempfile

        full = posixpath.normpath(src if src.startswith("/") else f"/workspace/{src}")
        parent, name = posixpath.split(full)
        tmp = f"/tmp/.sandboxd-cp-{secrets.token_hex(8)}.tar"
        try:
            r = self.exec("tar", ["-c", "-f", tmp, "-C", parent or "/", "--", name or "."])
            if r.exit_code != 0:
                raise errors.FileNotFound(f"cannot archive {src}: {r.stderr.strip()}", path=src)
            with tempfile.TemporaryFile() as spool:
                self.read_file(tmp, stream=spool if progress is None
                               else _Counted(spool, progress))
                spool.seek(0)
                counts = safe_extract(spool, dest_dir)
        finally:
            with contextlib.suppress(errors.SandboxError):
                self.delete_file(tmp)
        return CopyFromResult(source=src, destination=dest_dir, **counts)

    # -- background processes (docs/processes.md)

    def start_process(self, command: str, args: Sequence[str] | None = None, *,
                      process_id: str | None = None, cwd: str | None = None,
                      env: Mapping[str, str | None] | None = None, limits: Limits = None,
                      user: str | None = None, session_id: str | None = None) -> Process:
        """Start ``command`` (argv form with ``args``, else a shell line) in the background;
        the returned handle reads its logs, follows it, waits for it and kills it. It keeps
        running after this client goes, until it exits, is killed or the room goes."""
        rec = self.client.request("startProcess", _start_params(
            self.id, command, args, process_id, cwd, env, limits, user, session_id),
            protocol.ProcessInfo)
        return Process(self, rec)

    def process(self, process_id: str) -> Process:
        """A handle on an existing process (reconnecting: another client may have started it)."""
        return Process(self, self.get_process(process_id))

    def get_process(self, process_id: str) -> protocol.ProcessInfo:
        return self.client.request("getProcess", protocol.ProcessParams(
            sandbox_id=self.id, process_id=process_id), protocol.ProcessInfo)

    def list_processes(self) -> list[protocol.ProcessInfo]:
        return self.client.request("listProcesses", protocol.ListProcessesParams(
            sandbox_id=self.id), protocol.ListProcessesResult).processes

    def process_logs(self, process_id: str, *, stdout_offset: int | None = None,
                     stderr_offset: int | None = None) -> protocol.ProcessLogs:
        """Buffered output from the offsets (absolute bytes); pass back the offsets you got."""
        return self.client.request("getProcessLogs", _build(
            protocol.ProcessLogsParams, sandbox_id=self.id, process_id=process_id,
            stdout_offset=stdout_offset, stderr_offset=stderr_offset), protocol.ProcessLogs)

    def stream_process_logs(self, process_id: str, on_output: OutputCallback, *,
                            stdout_offset: int | None = None,
                            stderr_offset: int | None = None) -> protocol.ProcessInfo:
        """Replay the buffered output from the offsets, then follow it live into
        ``on_output(stream, text)``; returns the final record once the process ended."""
        return self.client.request("streamProcessLogs", _build(
            protocol.ProcessLogsParams, sandbox_id=self.id, process_id=process_id,
            stdout_offset=stdout_offset, stderr_offset=stderr_offset), protocol.ProcessInfo,
            _process_output_router(on_output))

    def kill_process(self, process_id: str,
                     signal: int | str | None = None) -> protocol.ProcessInfo:
        """``signal`` (default SIGTERM) to the whole tree, SIGKILL 2 s later for what is left."""
        return self.client.request("killProcess", _build(
            protocol.KillProcessParams, sandbox_id=self.id, process_id=process_id,
            signal=signal), protocol.ProcessInfo)

    def kill_all_processes(self) -> int:
        return self.client.request("killAllProcesses", protocol.KillAllProcessesParams(
            sandbox_id=self.id), protocol.KillAllProcessesResult).killed

    def wait_for_log(self, process_id: str, pattern: str, *, regex: bool = False,
                     timeout: float | None = None) -> str:
        """The first line (buffered or new) containing ``pattern``."""
        return self.client.request("waitForLog", _build(
            protocol.WaitForLogParams, sandbox_id=self.id, process_id=process_id,
            pattern=pattern, regex=regex, timeout=_timeout_ms(timeout)),
            protocol.WaitForLogResult,
            timeout=_call_deadline(self.client.timeout, timeout)).line
    # -- ports (docs/ports.md)

    def wait_for_port(self, port: int, *, process_id: str | None = None,
                      mode: str | None = None, path: str | None = None,
                      timeout: float | None = None) -> protocol.WaitForPortResult:
        """Return once ``port`` in the room accepts a TCP connection (``mode="http"``: answers
        ``GET path`` with 200-399); ProcessReadyTimeout after ``timeout`` seconds,
        ProcessExitedBeforeReady if ``process_id`` ends first."""
        return self.client.request(
            "waitForPort", _wait_port_params(self.id, port, process_id, mode, path, timeout),
            protocol.WaitForPortResult,
            timeout=_call_deadline(self.client.timeout, timeout or WAIT_FOR_PORT_TIMEOUT_S))

    def expose_port(self, port: int, *, name: str | None = None,
                    unix_socket: bool = False) -> protocol.ExposedPort:
        """Forward a loopback port of the host (``url``), or with ``unix_socket`` a Unix socket
        served to your uid only (``path``), into ``port`` of the room."""
        return self.client.request("exposePort", _expose_params(self.id, port, name,
                                                                unix_socket),
                                   protocol.ExposedPort)

    def unexpose_port(self, port: int) -> protocol.UnexposePortResult:
        return self.client.request("unexposePort", protocol.UnexposePortParams(
            sandbox_id=self.id, port=port), protocol.UnexposePortResult)

    def get_exposed_ports(self) -> list[protocol.ExposedPort]:
        return self.client.request("getExposedPorts", protocol.GetExposedPortsParams(
            sandbox_id=self.id), protocol.GetExposedPortsResult).ports

    # -- persistence (docs/persistence.md)

    def create_backup(self, dir: str | None = None, *, name: str | None = None,
                      excludes: Sequence[str] | None = None,
                      ttl_seconds: int | None = None) -> protocol.BackupInfo:
        """A consistent archive of ``dir`` (default /workspace), kept by the daemon."""
        return self.client.request("createBackup", _build(
            protocol.CreateBackupParams, sandbox_id=self.id, dir=dir, name=name,
            excludes=list(excludes) if excludes is not None else None,
            ttl_seconds=ttl_seconds), protocol.BackupInfo, timeout=ARCHIVE_TIMEOUT_S)

    def restore_backup(self, backup_id: str, dir: str | None = None
                       ) -> protocol.RestoreBackupResult:
        """Replace ``dir`` (default: the backup's own) with the backup's contents."""
        return self.client.request("restoreBackup", _build(
            protocol.RestoreBackupParams, sandbox_id=self.id, backup_id=backup_id, dir=dir),
            protocol.RestoreBackupResult, timeout=ARCHIVE_TIMEOUT_S)

    def fork(self, new_sandbox_id: str) -> Sandbox:
        """A new room with this one's options and a copy of its writable layer."""
        self.client.request("forkSandbox", protocol.ForkSandboxParams(
            sandbox_id=self.id, new_sandbox_id=new_sandbox_id), protocol.ForkSandboxResult,
            timeout=ARCHIVE_TIMEOUT_S)
        return Sandbox(self.client, new_sandbox_id)

    def export(self, sink: Any, dir: str | None = None, *,
               excludes: Sequence[str] | None = None) -> protocol.ExportSandboxResult:
        """Stream ``dir`` (default /workspace) as a gzip'd tar into ``sink`` (a binary file or
        a callable taking bytes)."""
        params = _build(protocol.ExportSandboxParams, sandbox_id=self.id, dir=dir,
                        excludes=list(excludes) if excludes is not None else None)
        return _result("exportSandbox", self.client.call(
            "exportSandbox", protocol.params_to_wire(params), _archive_writer(sink),
            timeout=ARCHIVE_TIMEOUT_S), protocol.ExportSandboxResult)

    def import_archive(self, data: Any, dir: str | None = None
                       ) -> protocol.ImportSandboxResult:
        """Unpack a gzip'd tar (bytes or a binary file) into ``dir`` (default /workspace),
        replacing its contents; on any failure the directory is unchanged."""
        out: Any = None
        for params in _import_pieces(self.id, data, dir):
            out = self.client.call("importSandbox", params, timeout=ARCHIVE_TIMEOUT_S)
        return _result("importSandbox", out, protocol.ImportSandboxResult)

    # --- terminals (issue 15; docs/interactive.md) ---------------------------------------------
    # terminal.output / terminal.exit arrive after openTerminal's answer: :meth:`terminal` gives
    # a :class:`Terminal` that reads them on a connection of its own; open_terminal and the
    # calls below are the bare methods (the output then goes to nobody on this connection).

    def terminal(self, command: str | None = None, args: list[str] | None = None, *,
                 cols: int = 80, rows: int = 24, cwd: str | None = None,
                 env: dict[str, str | None] | None = None, user: str = "root",
                 session_id: str | None = None) -> Terminal:
        """A terminal in the room (its login shell, or ``command``): write keystrokes, read
        what the program writes, resize, close; on a connection of its own."""
        return Terminal(Client(self.client.socket_path, self.client.timeout), _build(
            protocol.OpenTerminalParams, sandbox_id=self.id, command=command, args=args,
            cols=cols, rows=rows, cwd=cwd, env=env, user=user, session_id=session_id))

    def open_terminal(self, command: str | None = None, args: list[str] | None = None, *,
                      cols: int = 80, rows: int = 24, cwd: str | None = None,
                      env: dict[str, str | None] | None = None, user: str = "root",
                      session_id: str | None = None) -> protocol.OpenTerminalResult:
        return self.client.request("openTerminal", _build(
            protocol.OpenTerminalParams, sandbox_id=self.id, command=command, args=args,
            cols=cols, rows=rows, cwd=cwd, env=env, user=user, session_id=session_id),
            protocol.OpenTerminalResult)

    def write_terminal(self, terminal_id: str, data: bytes) -> int:
        return self.client.request("writeTerminal", protocol.WriteTerminalParams(
            terminal_id=terminal_id, data=base64.b64encode(data).decode()),
            protocol.WriteTerminalResult).written

    def resize_terminal(self, terminal_id: str, cols: int, rows: int) -> protocol.TerminalInfo:
        return self.client.request("resizeTerminal", protocol.ResizeTerminalParams(
            terminal_id=terminal_id, cols=cols, rows=rows), protocol.TerminalInfo)

    def close_terminal(self, terminal_id: str) -> protocol.TerminalInfo:
        return self.client.request("closeTerminal", protocol.TerminalParams(
            terminal_id=terminal_id), protocol.TerminalInfo)

    def attach_terminal(self, terminal_id: str) -> protocol.TerminalInfo:
        return self.client.request("attachTerminal", protocol.TerminalParams(
            terminal_id=terminal_id), protocol.TerminalInfo)

    def list_terminals(self) -> list[protocol.TerminalInfo]:
        return self.client.request("listTerminals", protocol.ListTerminalsParams(
            sandbox_id=self.id), protocol.ListTerminalsResult).terminals

    # --- sessions (issue 15; docs/interactive.md) ----------------------------------------------

    def create_session(self, session_id: str | None = None, *, cwd: str | None = None,
                       env: Mapping[str, str | None] | None = None) -> protocol.SessionInfo:
        """A persistent shell: ``exec(line, session_id=...)`` keeps cwd, variables, functions
        and aliases from one call to the next."""
        return self.client.request("createSession", _build(
            protocol.CreateSessionParams, sandbox_id=self.id, session_id=session_id, cwd=cwd,
            env=dict(env) if env is not None else None), protocol.SessionInfo)

    def delete_session(self, session_id: str) -> protocol.SessionInfo:
        return self.client.request("deleteSession", protocol.SessionParams(
            sandbox_id=self.id, session_id=session_id), protocol.SessionInfo)

    def list_sessions(self) -> list[protocol.SessionInfo]:
        return self.client.request("listSessions", protocol.ListSessionsParams(
            sandbox_id=self.id), protocol.ListSessionsResult).sessions

    # --- code interpreter contexts (issue 16; docs/contexts.md) ---------------------------------

    def create_code_context(self, language: str = "python", *, cwd: str | None = None,
                            env: Mapping[str, str | None] | None = None,
                            memory_bytes: int | None = None,
                            cpu_time_ms: int | None = None) -> protocol.CodeContextInfo:
        """A persistent kernel (python, javascript, typescript): state kept across
        :meth:`run_in_context` calls."""
        return self.client.request("createCodeContext", _context_create_params(
            self.id, language, cwd, env, memory_bytes, cpu_time_ms), protocol.CodeContextInfo,
            timeout=_call_deadline(self.client.timeout, _CELL_SLACK_S))

    def run_in_context(self, context_id: str, code: str, *, timeout: float | None = None,
                       on_output: OutputCallback | None = None,
                       on_result: ResultCallback | None = None) -> protocol.RunInContextResult:
        """Run a cell (``timeout`` in seconds; the daemon's default when None). With
        ``on_output`` / ``on_result`` the cell's logs and results stream as they happen."""
        streaming = on_output is not None or on_result is not None
        return self.client.request(
            "runInContext", _cell_params(self.id, context_id, code, timeout, streaming),
            protocol.RunInContextResult,
            _context_router(on_output, on_result) if streaming else None,
            timeout=_call_deadline(self.client.timeout, (timeout or 0) + _CELL_SLACK_S))

    def list_code_contexts(self) -> list[protocol.CodeContextInfo]:
        return self.client.request("listCodeContexts", protocol.ListCodeContextsParams(
            sandbox_id=self.id), protocol.ListCodeContextsResult).contexts

    def delete_code_context(self, context_id: str) -> protocol.CodeContextInfo:
        return self.client.request("deleteCodeContext", protocol.ContextParams(
            sandbox_id=self.id, context_id=context_id), protocol.CodeContextInfo)

    def restart_code_context(self, context_id: str) -> protocol.CodeContextInfo:
        return self.client.request("restartCodeContext", protocol.ContextParams(
            sandbox_id=self.id, context_id=context_id), protocol.CodeContextInfo,
            timeout=_call_deadline(self.client.timeout, _CELL_SLACK_S))

    def interrupt_code_context(self, context_id: str) -> protocol.CodeContextInfo:
        return self.client.request("interruptCodeContext", protocol.ContextParams(
            sandbox_id=self.id, context_id=context_id), protocol.CodeContextInfo)

    # --- network egress (issue 14; docs/network.md) --------------------------------------------

    def set_network_policy(self, network: Mapping[str, Any] | protocol.NetworkOptions | None
                           ) -> protocol.NetworkPolicyResult:
        """Change the room's egress policy (``{"allow": [...], "hosts": {...},
        "bandwidthBytesPerSec": N}``); None cuts it off and closes its connections."""
        return self.client.request("setNetworkPolicy", _network_params(self.id, network),
                                   protocol.NetworkPolicyResult)

    def get_network_log(self, limit: int | None = None) -> protocol.NetworkLogResult:
        return self.client.request("getNetworkLog", _build(
            protocol.GetNetworkLogParams, sandbox_id=self.id, limit=limit),
            protocol.NetworkLogResult)

    # --- file watch (issue 15; docs/interactive.md) --------------------------------------------

    def watch(self, path: str = "/workspace", *, recursive: bool = True,
              include: list[str] | None = None,
              exclude: list[str] | None = None) -> Watcher:
        """Watch ``path`` in the room; iterate the returned :class:`Watcher` (or call its
        ``events``) for the changes. It has a connection of its own (the events come on it),
        and the watch ends when it is closed."""
        return Watcher(Client(self.client.socket_path, self.client.timeout), _build(
            protocol.WatchParams, sandbox_id=self.id, path=path, recursive=recursive,
            include=include, exclude=exclude))

    def unwatch(self, watch_id: str) -> protocol.UnwatchResult:
        return self.client.request("unwatch", protocol.UnwatchParams(
            sandbox_id=self.id, watch_id=watch_id), protocol.UnwatchResult)


# --- persistence: params and sinks --------------------------------------------------------------

#: Raw bytes per importSandbox call (base64 on the wire: a third more).
IMPORT_CHUNK = 4 * 1024 * 1024
#: exportSandbox / importSandbox / createBackup may take minutes for a large workspace.
ARCHIVE_TIMEOUT_S = 15 * 60

ArchiveSink = Callable[[bytes], Any]


def _archive_writer(sink: Any) -> Callable[[str, dict[str, Any]], None]:
    """``export.chunk`` notifications (base64) to ``sink``: a callable or a binary file."""
    import base64

    write = sink.write if hasattr(sink, "write") else sink

    def on(method: str, params: dict[str, Any]) -> None:
        if method == "export.chunk":
            write(base64.b64decode(params.get("data", "")))

    return on


def _pieces(data: Any) -> Iterable[tuple[bytes, bool]]:
    """(piece, is_last) of ``data`` (bytes, or a binary file read as it goes)."""
    if hasattr(data, "read"):
        nxt = data.read(IMPORT_CHUNK)
        while True:
            cur, nxt = nxt, (data.read(IMPORT_CHUNK) if nxt else b"")
            yield cur, not nxt
            if not nxt:
                return
    buf = bytes(data)
    for i in range(0, max(len(buf), 1), IMPORT_CHUNK):
        yield buf[i:i + IMPORT_CHUNK], i + IMPORT_CHUNK >= len(buf)


def _import_pieces(sandbox_id: str, data: Any, dir: str | None) -> Iterable[dict[str, Any]]:
    """importSandbox params, one per piece of ``data`` (bytes, or a binary file)."""
    import base64

    for n, (piece, last) in enumerate(_pieces(data)):
        yield protocol.params_to_wire(_build(
            protocol.ImportSandboxParams, sandbox_id=sandbox_id, dir=dir,
            data=base64.b64encode(piece).decode(), append=n > 0, final=last))


def _network_params(sandbox_id: str, network: Mapping[str, Any] | protocol.NetworkOptions
                    | None) -> protocol.SetNetworkPolicyParams:
    if network is not None and not isinstance(network, protocol.NetworkOptions):
        try:
            network = msgspec.convert(dict(network), protocol.NetworkOptions)
        except msgspec.ValidationError as err:
            raise errors.InvalidParams(f"invalid network: {err}") from err
    return protocol.SetNetworkPolicyParams(sandbox_id=sandbox_id, network=network)


# --- terminals: the sync client's terminal ---------------------------------------------------

class Terminal:
    """A terminal on a connection of its own (the sync client reads only while a call waits):
    :meth:`write` keystrokes, :meth:`read` / :meth:`read_until` what the program wrote,
    :meth:`resize`, :meth:`wait` for its exit code, :meth:`close` to hang up."""

    def __init__(self, client: Client, params: protocol.OpenTerminalParams) -> None:
        self.client = client
        self._out = bytearray()
        self.exit: dict[str, Any] | None = None  # terminal.exit's params, once it ended
        try:
            res = client.request("openTerminal", params, protocol.OpenTerminalResult,
                                 self._take)
        except BaseException:
            client.close()
            raise
        self.id = res.terminal_id
        self.tty = res.tty
        self.pid = res.pid

    def _take(self, method: str, p: dict[str, Any]) -> None:
        # (the connection is this terminal's alone: every terminal.* notification is ours)
        if method == "terminal.output":
            self._out += base64.b64decode(str(p.get("data", "")))
        elif method == "terminal.exit":
            self.exit = p

    def _pump(self, timeout: float | None) -> bool:
        """Read one message (waiting up to ``timeout``); False when none came."""
        if timeout is not None and not self.client._wait_readable(max(timeout, 0)):
            return False
        msg = self.client._read_message(None)
        for item in msg if isinstance(msg, list) else [msg]:
            if _is_notification(item):
                self._take(str(item.get("method")), item.get("params") or {})
        return True

    def write(self, data: bytes | str) -> int:
        raw = data.encode() if isinstance(data, str) else data
        return self.client.request("writeTerminal", protocol.WriteTerminalParams(
            terminal_id=self.id, data=base64.b64encode(raw).decode()),
            protocol.WriteTerminalResult, self._take).written

    def read(self, timeout: float | None = 0.0) -> bytes:
        """What the program wrote since the last read (waiting up to ``timeout`` s for some)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._out and self.exit is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._pump(left):
                break
        out = bytes(self._out)
        self._out.clear()
        return out

    def read_until(self, pattern: bytes, timeout: float = 30.0) -> bytes:
        """Everything up to and including ``pattern`` (TimeoutError if it does not come)."""
        deadline = time.monotonic() + timeout
        while pattern not in self._out:
            left = deadline - time.monotonic()
            if left <= 0 or (self.exit is not None and not self.client._wait_readable(0)):
                raise TimeoutError(f"{pattern!r} not seen; got {bytes(self._out)[-200:]!r}")
            self._pump(left)
        end = self._out.index(pattern) + len(pattern)
        out = bytes(self._out[:end])
        del self._out[:end]
        return out

    def resize(self, cols: int, rows: int) -> protocol.TerminalInfo:
        return self.client.request("resizeTerminal", protocol.ResizeTerminalParams(
            terminal_id=self.id, cols=cols, rows=rows), protocol.TerminalInfo, self._take)

    def wait(self, timeout: float | None = None) -> int:
        """The program's exit code, once it ended (TimeoutError past ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exit is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"terminal {self.id} still running")
            self._pump(left)
        return int(self.exit.get("exitCode") or 0)

    def close(self) -> None:
        """Hang up (the whole tree started in it is killed) and drop the connection."""
        try:
            if self.exit is None:
                with contextlib.suppress(errors.SandboxError):
                    self.client.request("closeTerminal", protocol.TerminalParams(
                        terminal_id=self.id), protocol.TerminalInfo, self._take)
        finally:
            self.client.close()

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --- file watch: the sync client's watcher ------------------------------------------------------

class Watcher:
    """A watch on a connection of its own (the sync client reads only while a call waits):
    ``result`` is the watch's answer; iterating yields :class:`protocol.WatchEvent` as they
    come; :meth:`events` gathers them for a while; :meth:`close` ends the watch."""

    def __init__(self, client: Client, params: protocol.WatchParams) -> None:
        self.client = client
        self._early: list[protocol.WatchEvent] = []

        def early(method: str, p: dict[str, Any]) -> None:
            if method == "watch.event":
                self._early.append(msgspec.convert(p, protocol.WatchEvent))
        try:
            self.result = client.request("watch", params, protocol.WatchResult, early)
        except BaseException:
            client.close()
            raise
        self.id = self.result.watch_id

    def next(self, timeout: float | None = None) -> protocol.WatchEvent | None:
        """The next event, or None when ``timeout`` (seconds) passes without one."""
        if self._early:
            return self._early.pop(0)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if left is not None and not self.client._wait_readable(left):
                return None
            msg = self.client._read_message(None)
            for item in msg if isinstance(msg, list) else [msg]:
                if _is_notification(item) and item.get("method") == "watch.event":
                    self._early.append(msgspec.convert(item.get("params") or {},
                                                       protocol.WatchEvent))
            if self._early:
                return self._early.pop(0)

    def events(self, duration: float) -> list[protocol.WatchEvent]:
        """Every event of the next ``duration`` seconds."""
        out: list[protocol.WatchEvent] = []
        deadline = time.monotonic() + duration
        while (left := deadline - time.monotonic()) > 0:
            ev = self.next(left)
            if ev is None:
                break
            out.append(ev)
        return out

    def __iter__(self) -> Iterator[protocol.WatchEvent]:
        while True:
            ev = self.next()
            if ev is None:
                return
            yield ev

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# --- the asyncio client ------------------------------------------------------------------------

class _Pending:
    __slots__ = ("future", "on_notification", "subscribe")

    def __init__(self, future: asyncio.Future[Any],
                 on_notification: NotificationCallback | None, subscribe: bool = False) -> None:
        self.future = future
        self.on_notification = on_notification
        #: the call's notifications go on after its answer (watch): keep the callback
        self.subscribe = subscribe


class AsyncClient:
    """asyncio client: many concurrent calls on one connection (see the module docstring).

    ``on_notification`` receives notifications that name no request of ours (server events).
    Callbacks may be plain functions or coroutine functions; they run on the reader task, in
    arrival order, so a slow callback delays the other calls' messages (back-pressure)."""

    def __init__(self, socket: str | None = None, timeout: float | None = None, *,
                 on_notification: NotificationCallback | None = None) -> None:
        self.socket_path = socket or default_client_socket()
        self.timeout = timeout
        self.on_notification = on_notification
        self._ids = itertools.count(1)
        self._pending: dict[Any, _Pending] = {}
        #: callbacks of calls whose notifications outlive their answer, by request id
        self._subscriptions: dict[Any, NotificationCallback] = {}
        self._watches: dict[str, Any] = {}  # watch id -> its request id
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connect_lock: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect now (calls connect lazily anyway)."""
        import asyncio

        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._writer is not None:
                return
            check_socket_path(self.socket_path)
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.socket_path, limit=MAX_LINE), self.timeout)
            except TimeoutError as err:
                raise _unreachable(self.socket_path, "connect timed out") from err
            except OSError as err:
                raise _connect_error(self.socket_path, err) from err
            try:
                check_peer(self.socket_path, writer.get_extra_info("socket"))
            except errors.SandboxError:
                writer.close()
                raise
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_loop(reader, writer),
                                                    name=f"sandboxd-client {self.socket_path}")

    async def close(self) -> None:
        import asyncio

        writer, task = self._writer, self._reader_task
        self._writer = self._reader_task = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all(_unreachable(self.socket_path, "client closed"))

    def _fail_all(self, exc: BaseException) -> None:
        self._subscriptions.clear()  # (their watches ended with the connection)
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(exc)

    async def _read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exc: BaseException = _unreachable(self.socket_path, "connection closed by the daemon")
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError as err:  # line longer than the stream limit
                    exc = errors.RequestTooLarge(f"a message from sandboxd exceeds {MAX_LINE} "
                                                 f"bytes: {err}")
                    break
                except OSError as err:
                    exc = _unreachable(self.socket_path, "receive failed", err)
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    msg = protocol.decode(line)
                except errors.ParseError as err:
                    # The stream can no longer be trusted to be framed: fail everything.
                    exc = err
                    break
                for item in msg if isinstance(msg, list) else [msg]:
                    await self._dispatch(item)
        finally:
            if self._writer is writer:
                self._writer = self._reader_task = None
            writer.close()
            self._fail_all(exc)

    async def _dispatch(self, item: Any) -> None:
        if _is_notification(item):
            params = item.get("params") or {}
            key = _id_key(params.get("requestId")) if isinstance(params, dict) else None
            pending = self._pending.get(key)
            callback = pending.on_notification if pending is not None \
                else self._subscriptions.get(key, self.on_notification)
            if callback is None:
                return
            try:
                await _invoke(callback, item["method"], params)
            except Exception as err:  # noqa: BLE001 - the call that owns the callback gets it
                if pending is not None and not pending.future.done():
                    pending.future.set_exception(err)
            return
        if not _is_response(item):
            return
        rid = _id_key(item.get("id"))
        if rid is None and "error" in item:
            # Unattributable (the server could not read an id). With one call in flight it is
            # that call's; with several we cannot tell, so all of them learn of it.
            exc = _outcome(item)
            self._fail_all(exc)
            return
        p = self._pending.pop(rid, None)
        if p is None or p.future.done():
            return  # a call that was cancelled or timed out
        out = _outcome(item)
        if p.subscribe and p.on_notification is not None and "result" in item:
            # (here, on the reader, before the next message: none of them can slip past)
            self._subscriptions[rid] = p.on_notification
        if isinstance(out, errors.SandboxError):
            p.future.set_exception(out)
        else:
            p.future.set_result(out)

    async def _roundtrip(self, message: Any, ids: list[Any],
                         on_notification: NotificationCallback | None,
                         timeout: float | None, subscribe: bool = False) -> list[Any]:
        import asyncio

        await self.connect()
        loop = asyncio.get_running_loop()
        futures = []
        for rid in ids:
            fut: asyncio.Future[Any] = loop.create_future()
            self._pending[rid] = _Pending(fut, on_notification, subscribe)
            futures.append(fut)
        try:
            writer = self._writer
            if writer is None:
                raise _unreachable(self.socket_path, "connection closed by the daemon")
            try:
                writer.write(protocol.encode(message))
                await writer.drain()
            except OSError as err:
                raise _unreachable(self.socket_path, "send failed", err) from err
            gathered = asyncio.gather(*futures, return_exceptions=True)
            try:
                return await asyncio.wait_for(gathered, timeout)
            except TimeoutError as err:
                raise _unreachable(self.socket_path, f"no answer within {timeout} s") from err
        finally:
            for rid in ids:
                self._pending.pop(rid, None)

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   on_notification: NotificationCallback | None = None, *,
                   timeout: float | None = None) -> Any:
        rid = next(self._ids)
        [out] = await self._roundtrip(
            protocol.request(rid, method, params if params is not None else {}), [rid],
            on_notification, timeout if timeout is not None else self.timeout)
        if isinstance(out, BaseException):
            raise out
        return out

    async def call_batch(self, calls: Iterable[tuple[str, dict[str, Any] | None]],
                         on_notification: NotificationCallback | None = None) -> list[Any]:
        """As :meth:`Client.call_batch`: results or SandboxError instances, in order."""
        reqs = [protocol.request(next(self._ids), m, p if p is not None else {}) for m, p in calls]
        if not reqs:
            return []
        out = await self._roundtrip(reqs, [r["id"] for r in reqs], on_notification,
                                    self.timeout)
        for item in out:
            if isinstance(item, errors.DaemonUnreachable):
                raise item  # the transport failed: no call of the batch has an answer
        return out

    async def subscribe(self, method: str, params: protocol.Params, shape: type[R],
                        on_notification: NotificationCallback) -> tuple[R, Any]:
        """A call whose notifications go on after its answer (``watch``): they keep going to
        ``on_notification`` until :meth:`unsubscribe` with the returned request id."""
        rid = next(self._ids)
        [out] = await self._roundtrip(
            protocol.request(rid, method, protocol.params_to_wire(params)), [rid],
            on_notification, self.timeout, subscribe=True)
        if isinstance(out, BaseException):
            raise out
        return _result(method, out, shape), rid

    def unsubscribe(self, request_id: Any) -> None:
        self._subscriptions.pop(request_id, None)

    async def request(self, method: str, params: protocol.Params, shape: type[R],
                      on_notification: NotificationCallback | None = None, *,
                      timeout: float | None = None) -> R:
        """As :meth:`Client.request`."""
        return _result(method, await self.call(method, protocol.params_to_wire(params),
                                                on_notification, timeout=timeout), shape)

    async def ping(self, sandbox_id: str | None = None) -> protocol.PingResult:
        return await self.request("ping", _build(protocol.PingParams, sandbox_id=sandbox_id),
                                  protocol.PingResult)

    async def list_sandboxes(self) -> list[SandboxInfo]:
        return (await self.request("listSandboxes", protocol.ListSandboxesParams(),
                                   protocol.ListSandboxesResult)).sandboxes

    async def list_languages(self) -> list[protocol.LanguageInfo]:
        return (await self.request("listLanguages", protocol.ListLanguagesParams(),
                                   protocol.ListLanguagesResult)).languages

    async def stats(self, sandbox_id: str | None = None) -> protocol.StatsResult:
        return await self.request("stats", _build(protocol.StatsParams, sandbox_id=sandbox_id),
                                  protocol.StatsResult)

    async def list_backups(self, sandbox_id: str | None = None) -> list[protocol.BackupInfo]:
        return (await self.request("listBackups", _build(protocol.ListBackupsParams,
                                                         sandbox_id=sandbox_id),
                                   protocol.ListBackupsResult)).backups

    async def delete_backup(self, backup_id: str) -> protocol.DeleteBackupResult:
        return await self.request("deleteBackup",
                                  protocol.DeleteBackupParams(backup_id=backup_id),
                                  protocol.DeleteBackupResult)

    def sandbox(self, sandbox_id: str) -> AsyncSandbox:
        return AsyncSandbox(self, sandbox_id)


async def _invoke(callback: Callable[..., Any], *args: Any) -> None:
    result = callback(*args)
    if isinstance(result, Awaitable):
        await result


class AsyncSandbox:
    """One room, through an :class:`AsyncClient`; the same methods as :class:`Sandbox`."""

    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        self.client = client
        self.id = sandbox_id

    def __repr__(self) -> str:
        return f"AsyncSandbox({self.id!r})"

    async def get(self, options: Any = None) -> SandboxInfo:
        return await self.client.request("getSandbox", _build(
            protocol.GetSandboxParams, sandbox_id=self.id, options=_room_options(options)),
            SandboxInfo)

    async def ping(self) -> protocol.PingResult:
        return await self.client.ping(self.id)

    async def destroy(self) -> protocol.DestroyResult:
        return await self.client.request("destroy", protocol.DestroyParams(sandbox_id=self.id),
                                         protocol.DestroyResult)

    async def run_code(self, language: str, code: str, *, stdin: str | None = None,
                       args: Sequence[str] | None = None,
                       files: Mapping[str, str] | None = None, limits: Limits = None,
                       compile_limits: Limits = None,
                       user: str | None = None) -> protocol.RunCodeResult:
        return await self.client.request("runCode", _code_params(
            self.id, language, code, stdin, args, files, limits, compile_limits, user),
            protocol.RunCodeResult)

    async def run_example_code(self) -> list[protocol.ExampleResult]:
        return (await self.client.request("runExampleCode",
                                          protocol.RunExamplesParams(sandbox_id=self.id),
                                          protocol.RunExamplesResult)).results

    async def exec(self, command: str, args: Sequence[str] | None = None, *,
                   cwd: str | None = None, env: Mapping[str, str | None] | None = None,
                   stdin: str | bytes | None = None, timeout: float | None = None,
                   on_output: OutputCallback | None = None, limits: Limits = None,
                   user: str | None = None, session_id: str | None = None) -> ExecResult:
        params = _exec_params(self.id, command, args, cwd, env, stdin, timeout,
                              on_output is not None, limits, user, session_id)
        return await self.client.request(
            "exec", params, ExecResult,
            _output_router(on_output) if on_output is not None else None,
            timeout=_call_deadline(self.client.timeout, timeout))

    # -- files (the same as Sandbox's; cp is Sandbox-only)

    async def write_file(self, path: str, content: str | bytes, *,
                         encoding: str | None = None,
                         append: bool = False) -> protocol.WriteFileResult:
        return await self.client.request(
            "writeFile", _write_params(self.id, path, content, encoding, append),
            protocol.WriteFileResult)

    async def read_file(self, path: str, *, encoding: str | None = None,
                        stream: StreamSink = False) -> FileContent:
        chunks = _Chunks(stream) if stream is not False else None
        params = _build(protocol.ReadFileParams, sandbox_id=self.id, path=path,
                        encoding=encoding, stream=chunks is not None)
        result = await self.client.call("readFile", protocol.params_to_wire(params), chunks)
        return _file_content(result, chunks if stream is True else None)

    async def delete_file(self, path: str) -> protocol.DeleteFileResult:
        return await self.client.request(
            "deleteFile", protocol.PathParams(sandbox_id=self.id, path=path),
            protocol.DeleteFileResult)

    async def rename_file(self, old_path: str, new_path: str) -> protocol.RenameResult:
        return await self.client.request("renameFile", protocol.RenameFileParams(
            sandbox_id=self.id, old_path=old_path, new_path=new_path), protocol.RenameResult)

    async def move_file(self, source_path: str,
                        destination_path: str) -> protocol.RenameResult:
        return await self.client.request("moveFile", protocol.MoveFileParams(
            sandbox_id=self.id, source_path=source_path, destination_path=destination_path),
            protocol.RenameResult)

    async def mkdir(self, path: str, *, recursive: bool = False) -> protocol.MkdirResult:
        return await self.client.request("mkdir", protocol.MkdirParams(
            sandbox_id=self.id, path=path, recursive=recursive), protocol.MkdirResult)

    async def list_files(self, path: str | None = None, *, recursive: bool = False,
                         include_hidden: bool = False) -> list[FileInfo]:
        return (await self.client.request("listFiles", _build(
            protocol.ListFilesParams, sandbox_id=self.id, path=path, recursive=recursive,
            include_hidden=include_hidden), protocol.ListFilesResult)).files

    async def exists(self, path: str) -> bool:
        return (await self.client.request(
            "exists", protocol.PathParams(sandbox_id=self.id, path=path),
            protocol.ExistsResult)).exists

    async def git_checkout(self, repo_url: str, *, branch: str | None = None,
                           target_dir: str | None = None, depth: int | None = None,
                           timeout: float | None = None) -> protocol.GitCheckoutResult:
        return await self.client.request(
            "gitCheckout", _build(protocol.GitCheckoutParams, sandbox_id=self.id,
                                  repo_url=repo_url, branch=branch, target_dir=target_dir,
                                  depth=depth, timeout=_timeout_ms(timeout)),
            protocol.GitCheckoutResult,
            timeout=_call_deadline(self.client.timeout, timeout or 600))


    # -- background processes (the same as Sandbox's)

    async def start_process(self, command: str, args: Sequence[str] | None = None, *,
                            process_id: str | None = None, cwd: str | None = None,
                            env: Mapping[str, str | None] | None = None, limits: Limits = None,
                            user: str | None = None,
                            session_id: str | None = None) -> AsyncProcess:
        rec = await self.client.request("startProcess", _start_params(
            self.id, command, args, process_id, cwd, env, limits, user, session_id),
            protocol.ProcessInfo)
        return AsyncProcess(self, rec)

    async def process(self, process_id: str) -> AsyncProcess:
        return AsyncProcess(self, await self.get_process(process_id))

    async def get_process(self, process_id: str) -> protocol.ProcessInfo:
        return await self.client.request("getProcess", protocol.ProcessParams(
            sandbox_id=self.id, process_id=process_id), protocol.ProcessInfo)

    async def list_processes(self) -> list[protocol.ProcessInfo]:
        return (await self.client.request("listProcesses", protocol.ListProcessesParams(
            sandbox_id=self.id), protocol.ListProcessesResult)).processes

    async def process_logs(self, process_id: str, *, stdout_offset: int | None = None,
                           stderr_offset: int | None = None) -> protocol.ProcessLogs:
        return await self.client.request("getProcessLogs", _build(
            protocol.ProcessLogsParams, sandbox_id=self.id, process_id=process_id,
            stdout_offset=stdout_offset, stderr_offset=stderr_offset), protocol.ProcessLogs)

    async def stream_process_logs(self, process_id: str, on_output: OutputCallback, *,
                                  stdout_offset: int | None = None,
                                  stderr_offset: int | None = None) -> protocol.ProcessInfo:
        """``on_output`` may be a coroutine function."""
        return await self.client.request("streamProcessLogs", _build(
            protocol.ProcessLogsParams, sandbox_id=self.id, process_id=process_id,
            stdout_offset=stdout_offset, stderr_offset=stderr_offset), protocol.ProcessInfo,
            _process_output_router(on_output))

    async def kill_process(self, process_id: str,
                           signal: int | str | None = None) -> protocol.ProcessInfo:
        return await self.client.request("killProcess", _build(
            protocol.KillProcessParams, sandbox_id=self.id, process_id=process_id,
            signal=signal), protocol.ProcessInfo)

    async def kill_all_processes(self) -> int:
        return (await self.client.request("killAllProcesses", protocol.KillAllProcessesParams(
            sandbox_id=self.id), protocol.KillAllProcessesResult)).killed

    async def wait_for_log(self, process_id: str, pattern: str, *, regex: bool = False,
                           timeout: float | None = None) -> str:
        return (await self.client.request("waitForLog", _build(
            protocol.WaitForLogParams, sandbox_id=self.id, process_id=process_id,
            pattern=pattern, regex=regex, timeout=_timeout_ms(timeout)),
            protocol.WaitForLogResult,
            timeout=_call_deadline(self.client.timeout, timeout))).line

    # -- ports (docs/ports.md)

    async def wait_for_port(self, port: int, *, process_id: str | None = None,
                            mode: str | None = None, path: str | None = None,
                            timeout: float | None = None) -> protocol.WaitForPortResult:
        return await self.client.request(
            "waitForPort", _wait_port_params(self.id, port, process_id, mode, path, timeout),
            protocol.WaitForPortResult,
            timeout=_call_deadline(self.client.timeout, timeout or WAIT_FOR_PORT_TIMEOUT_S))

    async def expose_port(self, port: int, *, name: str | None = None,
                          unix_socket: bool = False) -> protocol.ExposedPort:
        return await self.client.request("exposePort", _expose_params(self.id, port, name,
                                                                      unix_socket),
                                         protocol.ExposedPort)

    async def unexpose_port(self, port: int) -> protocol.UnexposePortResult:
        return await self.client.request("unexposePort", protocol.UnexposePortParams(
            sandbox_id=self.id, port=port), protocol.UnexposePortResult)

    async def get_exposed_ports(self) -> list[protocol.ExposedPort]:
        return (await self.client.request("getExposedPorts", protocol.GetExposedPortsParams(
            sandbox_id=self.id), protocol.GetExposedPortsResult)).ports

    # -- persistence (docs/persistence.md)

    async def create_backup(self, dir: str | None = None, *, name: str | None = None,
                            excludes: Sequence[str] | None = None,
                            ttl_seconds: int | None = None) -> protocol.BackupInfo:
        return await self.client.request("createBackup", _build(
            protocol.CreateBackupParams, sandbox_id=self.id, dir=dir, name=name,
            excludes=list(excludes) if excludes is not None else None,
            ttl_seconds=ttl_seconds), protocol.BackupInfo, timeout=ARCHIVE_TIMEOUT_S)

    async def restore_backup(self, backup_id: str, dir: str | None = None
                             ) -> protocol.RestoreBackupResult:
        return await self.client.request("restoreBackup", _build(
            protocol.RestoreBackupParams, sandbox_id=self.id, backup_id=backup_id, dir=dir),
            protocol.RestoreBackupResult, timeout=ARCHIVE_TIMEOUT_S)

    async def fork(self, new_sandbox_id: str) -> AsyncSandbox:
        await self.client.request("forkSandbox", protocol.ForkSandboxParams(
            sandbox_id=self.id, new_sandbox_id=new_sandbox_id), protocol.ForkSandboxResult,
            timeout=ARCHIVE_TIMEOUT_S)
        return AsyncSandbox(self.client, new_sandbox_id)

    async def export(self, sink: Any, dir: str | None = None, *,
                     excludes: Sequence[str] | None = None) -> protocol.ExportSandboxResult:
        params = _build(protocol.ExportSandboxParams, sandbox_id=self.id, dir=dir,
                        excludes=list(excludes) if excludes is not None else None)
        return _result("exportSandbox", await self.client.call(
            "exportSandbox", protocol.params_to_wire(params), _archive_writer(sink),
            timeout=ARCHIVE_TIMEOUT_S), protocol.ExportSandboxResult)

    async def import_archive(self, data: Any, dir: str | None = None
                             ) -> protocol.ImportSandboxResult:
        out: Any = None
        for params in _import_pieces(self.id, data, dir):
            out = await self.client.call("importSandbox", params, timeout=ARCHIVE_TIMEOUT_S)
        return _result("importSandbox", out, protocol.ImportSandboxResult)

    # --- terminals (issue 15; docs/interactive.md) ---------------------------------------------
    # terminal.output / terminal.exit arrive after openTerminal's and attachTerminal's answers:
    # this client does not deliver them yet (drive the wire directly for the output).

    async def open_terminal(self, command: str | None = None, args: list[str] | None = None, *,
                      cols: int = 80, rows: int = 24, cwd: str | None = None,
                      env: dict[str, str | None] | None = None, user: str = "root",
                      session_id: str | None = None) -> protocol.OpenTerminalResult:
        return await self.client.request("openTerminal", _build(
            protocol.OpenTerminalParams, sandbox_id=self.id, command=command, args=args,
            cols=cols, rows=rows, cwd=cwd, env=env, user=user, session_id=session_id),
            protocol.OpenTerminalResult)

    async def write_terminal(self, terminal_id: str, data: bytes) -> int:
        return (await self.client.request("writeTerminal", protocol.WriteTerminalParams(
            terminal_id=terminal_id, data=base64.b64encode(data).decode()),
            protocol.WriteTerminalResult)).written

    async def resize_terminal(self, terminal_id: str, cols: int,
                              rows: int) -> protocol.TerminalInfo:
        return await self.client.request("resizeTerminal", protocol.ResizeTerminalParams(
            terminal_id=terminal_id, cols=cols, rows=rows), protocol.TerminalInfo)

    async def close_terminal(self, terminal_id: str) -> protocol.TerminalInfo:
        return await self.client.request("closeTerminal", protocol.TerminalParams(
            terminal_id=terminal_id), protocol.TerminalInfo)

    async def attach_terminal(self, terminal_id: str) -> protocol.TerminalInfo:
        return await self.client.request("attachTerminal", protocol.TerminalParams(
            terminal_id=terminal_id), protocol.TerminalInfo)

    async def list_terminals(self) -> list[protocol.TerminalInfo]:
        return (await self.client.request("listTerminals", protocol.ListTerminalsParams(
            sandbox_id=self.id), protocol.ListTerminalsResult)).terminals

    async def create_session(self, session_id: str | None = None, *, cwd: str | None = None,
                             env: Mapping[str, str | None] | None = None
                             ) -> protocol.SessionInfo:
        return await self.client.request("createSession", _build(
            protocol.CreateSessionParams, sandbox_id=self.id, session_id=session_id, cwd=cwd,
            env=dict(env) if env is not None else None), protocol.SessionInfo)

    async def delete_session(self, session_id: str) -> protocol.SessionInfo:
        return await self.client.request("deleteSession", protocol.SessionParams(
            sandbox_id=self.id, session_id=session_id), protocol.SessionInfo)

    async def list_sessions(self) -> list[protocol.SessionInfo]:
        return (await self.client.request("listSessions", protocol.ListSessionsParams(
            sandbox_id=self.id), protocol.ListSessionsResult)).sessions

    async def create_code_context(self, language: str = "python", *, cwd: str | None = None,
                                  env: Mapping[str, str | None] | None = None,
                                  memory_bytes: int | None = None,
                                  cpu_time_ms: int | None = None) -> protocol.CodeContextInfo:
        return await self.client.request("createCodeContext", _context_create_params(
            self.id, language, cwd, env, memory_bytes, cpu_time_ms), protocol.CodeContextInfo,
            timeout=_call_deadline(self.client.timeout, _CELL_SLACK_S))

    async def run_in_context(self, context_id: str, code: str, *, timeout: float | None = None,
                             on_output: OutputCallback | None = None,
                             on_result: ResultCallback | None = None
                             ) -> protocol.RunInContextResult:
        streaming = on_output is not None or on_result is not None
        return await self.client.request(
            "runInContext", _cell_params(self.id, context_id, code, timeout, streaming),
            protocol.RunInContextResult,
            _context_router(on_output, on_result) if streaming else None,
            timeout=_call_deadline(self.client.timeout, (timeout or 0) + _CELL_SLACK_S))

    async def list_code_contexts(self) -> list[protocol.CodeContextInfo]:
        return (await self.client.request("listCodeContexts", protocol.ListCodeContextsParams(
            sandbox_id=self.id), protocol.ListCodeContextsResult)).contexts

    async def delete_code_context(self, context_id: str) -> protocol.CodeContextInfo:
        return await self.client.request("deleteCodeContext", protocol.ContextParams(
            sandbox_id=self.id, context_id=context_id), protocol.CodeContextInfo)

    async def restart_code_context(self, context_id: str) -> protocol.CodeContextInfo:
        return await self.client.request("restartCodeContext", protocol.ContextParams(
            sandbox_id=self.id, context_id=context_id), protocol.CodeContextInfo,
            timeout=_call_deadline(self.client.timeout, _CELL_SLACK_S))

    async def interrupt_code_context(self, context_id: str) -> protocol.CodeContextInfo:
        return await self.client.request("interruptCodeContext", protocol.ContextParams(
            sandbox_id=self.id, context_id=context_id), protocol.CodeContextInfo)

    async def set_network_policy(self, network: Mapping[str, Any] | protocol.NetworkOptions
                                 | None) -> protocol.NetworkPolicyResult:
        return await self.client.request("setNetworkPolicy",
                                         _network_params(self.id, network),
                                         protocol.NetworkPolicyResult)

    async def get_network_log(self, limit: int | None = None) -> protocol.NetworkLogResult:
        return await self.client.request("getNetworkLog", _build(
            protocol.GetNetworkLogParams, sandbox_id=self.id, limit=limit),
            protocol.NetworkLogResult)

    async def watch(self, path: str = "/workspace", *,
                    on_event: Callable[[protocol.WatchEvent], Any],
                    recursive: bool = True, include: list[str] | None = None,
                    exclude: list[str] | None = None) -> protocol.WatchResult:
        """Watch ``path``; each change goes to ``on_event`` (a function or a coroutine
        function, on the client's reader) until :meth:`unwatch` or the connection ends."""
        def route(method: str, params: dict[str, Any]) -> Any:
            if method == "watch.event":
                return on_event(msgspec.convert(params, protocol.WatchEvent))
            return None
        res, rid = await self.client.subscribe("watch", _build(
            protocol.WatchParams, sandbox_id=self.id, path=path, recursive=recursive,
            include=include, exclude=exclude), protocol.WatchResult, route)
        self.client._watches[res.watch_id] = rid
        return res

    async def unwatch(self, watch_id: str) -> protocol.UnwatchResult:
        try:
            return await self.client.request("unwatch", protocol.UnwatchParams(
                sandbox_id=self.id, watch_id=watch_id), protocol.UnwatchResult)
        finally:
            self.client.unsubscribe(self.client._watches.pop(watch_id, None))


# --- background processes: params and handles ----------------------------------------------------

#: Ended statuses of a process record (``running`` is the only other one).
PROCESS_ENDED = frozenset({"completed", "failed", "killed", "error"})
#: How often ``wait()`` asks for a record (the wire has no "wait for exit" of its own).
_WAIT_POLL_S = (0.02, 0.25)


def _start_params(sandbox_id: str, command: str, args: Sequence[str] | None,
                  process_id: str | None, cwd: str | None,
                  env: Mapping[str, str | None] | None, limits: Limits,
                  user: str | None, session_id: str | None = None
                  ) -> protocol.StartProcessParams:
    return _build(protocol.StartProcessParams, sandbox_id=sandbox_id, command=command,
                  args=list(args) if args is not None else None, process_id=process_id,
                  cwd=cwd, env=dict(env) if env is not None else None, limits=limits, user=user,
                  session_id=session_id)


def _process_output_router(on_output: OutputCallback) -> NotificationCallback:
    def route(method: str, params: dict[str, Any]) -> Any:
        if method == "process.output":
            return on_output(str(params.get("stream", "stdout")), str(params.get("data", "")))
        return None
    return route


class Process:
    """A background process of a :class:`Sandbox` (``start_process``, ``process``)."""

    def __init__(self, sandbox: Sandbox, record: protocol.ProcessInfo) -> None:
        self.sandbox = sandbox
        self.record = record  # as of the last call that returned one
        self.id = record.process_id
        self.pid = record.pid
        self.command = record.command

    def __repr__(self) -> str:
        return f"Process({self.sandbox.id!r}, {self.id!r})"

    def info(self) -> protocol.ProcessInfo:
        self.record = self.sandbox.get_process(self.id)
        return self.record

    def logs(self, *, stdout_offset: int | None = None,
             stderr_offset: int | None = None) -> protocol.ProcessLogs:
        return self.sandbox.process_logs(self.id, stdout_offset=stdout_offset,
                                         stderr_offset=stderr_offset)

    def stream(self, on_output: OutputCallback, *, stdout_offset: int | None = None,
               stderr_offset: int | None = None) -> protocol.ProcessInfo:
        self.record = self.sandbox.stream_process_logs(
            self.id, on_output, stdout_offset=stdout_offset, stderr_offset=stderr_offset)
        return self.record

    def wait_for_log(self, pattern: str, *, regex: bool = False,
                     timeout: float | None = None) -> str:
        return self.sandbox.wait_for_log(self.id, pattern, regex=regex, timeout=timeout)

    def wait_for_port(self, port: int, *, mode: str | None = None, path: str | None = None,
                      timeout: float | None = None) -> protocol.WaitForPortResult:
        """``waitForPort`` for this process (PROCESS_EXITED_BEFORE_READY if it ends first)."""
        return self.sandbox.wait_for_port(port, process_id=self.id, mode=mode, path=path,
                                          timeout=timeout)

    def wait(self, timeout: float | None = None) -> protocol.ProcessInfo:
        """Until the process ended (its final record); TimeoutError past ``timeout`` s."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _WAIT_POLL_S[0]
        while (rec := self.info()).status not in PROCESS_ENDED:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"process {self.id} still running after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, _WAIT_POLL_S[1])
        return rec

    def kill(self, signal: int | str | None = None) -> protocol.ProcessInfo:
        self.record = self.sandbox.kill_process(self.id, signal)
        return self.record


class AsyncProcess:
    """A background process of an :class:`AsyncSandbox`; the same methods as :class:`Process`."""

    def __init__(self, sandbox: AsyncSandbox, record: protocol.ProcessInfo) -> None:
        self.sandbox = sandbox
        self.record = record
        self.id = record.process_id
        self.pid = record.pid
        self.command = record.command

    def __repr__(self) -> str:
        return f"AsyncProcess({self.sandbox.id!r}, {self.id!r})"

    async def info(self) -> protocol.ProcessInfo:
        self.record = await self.sandbox.get_process(self.id)
        return self.record

    async def logs(self, *, stdout_offset: int | None = None,
                   stderr_offset: int | None = None) -> protocol.ProcessLogs:
        return await self.sandbox.process_logs(self.id, stdout_offset=stdout_offset,
                                               stderr_offset=stderr_offset)

    async def stream(self, on_output: OutputCallback, *, stdout_offset: int | None = None,
                     stderr_offset: int | None = None) -> protocol.ProcessInfo:
        self.record = await self.sandbox.stream_process_logs(
            self.id, on_output, stdout_offset=stdout_offset, stderr_offset=stderr_offset)
        return self.record

    async def wait_for_log(self, pattern: str, *, regex: bool = False,
                           timeout: float | None = None) -> str:
        return await self.sandbox.wait_for_log(self.id, pattern, regex=regex, timeout=timeout)

    async def wait_for_port(self, port: int, *, mode: str | None = None,
                            path: str | None = None,
                            timeout: float | None = None) -> protocol.WaitForPortResult:
        return await self.sandbox.wait_for_port(port, process_id=self.id, mode=mode,
                                                path=path, timeout=timeout)

    async def wait(self, timeout: float | None = None) -> protocol.ProcessInfo:
        import asyncio
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _WAIT_POLL_S[0]
        while (rec := await self.info()).status not in PROCESS_ENDED:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"process {self.id} still running after {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, _WAIT_POLL_S[1])
        return rec

    async def kill(self, signal: int | str | None = None) -> protocol.ProcessInfo:
        self.record = await self.sandbox.kill_process(self.id, signal)
        return self.record
