"""The socket: peer credentials, framing, decode -> dispatch -> encode, errors -> wire.

One asyncio task reads each connection line by line; every request becomes its own task, so a
slow ``exec`` never blocks the requests behind it and responses go out in completion order,
matched by id. Writes go through one lock per connection; notifications (``exec.output``) wait
for the client to drain once its buffer passes ``max_pending_bytes``, which pauses the run's pipe
readers and so the run itself: a client that stops reading slows only its own runs, and the
daemon's memory stays bounded (one message past the cap per connection). A client whose backlog
has not shrunk for ``stream_stall_timeout_s`` is dropped: its connection is aborted and its runs
are killed, so a client that never reads cannot hold a room's run slots forever.

Caps on what one client can take (each answered, never silently slowed): ``max_connections`` in
all and ``max_connections_per_uid`` per peer uid (QUOTA_EXCEEDED, then the connection is closed),
``max_request_bytes`` per line (REQUEST_TOO_LARGE, the connection goes on), and the pending-bytes
cap above; per connection (issue 10 H6, M5) ``max_batch_requests`` per batch (REQUEST_TOO_LARGE
before any of it runs), ``max_inflight_requests`` (the socket is not read further until some
finish), ``max_reply_bytes`` per reply (REQUEST_TOO_LARGE for each id), one line of whole-file
reads at a time (HEAVY_METHODS), and ``connection_idle_timeout_s`` for a connection with nothing
in flight. Peers are identified only by SO_PEERCRED, read once at accept.

Dispatch: the method's params are decoded with its struct from ``protocol.METHODS``, its handler
(``api.HANDLERS``) gets a narrow ``context.Context`` (never the daemon) and returns the method's
result struct, which is encoded as the reply. Exceptions are answered here: SandboxError
subclasses carry their code; host exhaustion becomes HOST_RESOURCE_EXHAUSTED
(``errors.host_exhaustion``); anything else is an INTERNAL_ERROR, logged with its traceback, and
the connection goes on.
A line longer than ``max_request_bytes`` is skipped up to its newline and answered with
REQUEST_TOO_LARGE; a line that is not JSON gets a -32700 with id null; neither closes the
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from . import config, errors, protocol
from .api import HANDLERS
from .config import DaemonConfig
from .context import Services
from .errors import host_exhaustion

__all__ = ["HEAVY_METHODS", "Connection", "Server", "host_exhaustion", "peer_credentials"]

log = logging.getLogger("sandboxd.server")

READ_CHUNK = 256 * 1024
#: Methods whose reply holds a whole file (H6: 12 pipelined readFiles of 32 MiB on a connection
#: that never reads took 1.47 GB): one line using them at a time per connection, held until its
#: reply is written, so what waits is the request, not its reply.
HEAVY_METHODS = frozenset({"readFile"})
def _heavy(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(m := obj.get("method"), str) \
        and m in HEAVY_METHODS


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded at connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        self.inflight = 0  # requests being handled (a batch counts its length)
        self.room_for_more = asyncio.Event()
        self.room_for_more.set()
        self.heavy = asyncio.Lock()
        self.buf = bytearray()  # the incomplete line, read so far
        self.scanned = 0  # bytes of buf known to hold no newline
        self.charged = 0  # bytes of buf charged to Server.buffered
        self.skipping: errors.RequestTooLarge | None = None  # skipping a line, to answer this
        self.dropped = False
        # Run once when the connection ends (Context.on_close: terminals, watches).
        self.closers: dict[int, Callable[[], None]] = {}
        self._closer_ids = itertools.count()
        sock = writer.get_extra_info("socket")
        self.pid, self.uid, self.gid = peer_credentials(sock)

    def _pending(self) -> int:
        return int(self.writer.transport.get_write_buffer_size())

    async def send(self, message: Any) -> None:
        data = protocol.encode(message)
        cap = self.server.config.max_reply_bytes
        if len(data) > cap:
            # Answered, not dropped: the client learns why (and can stream instead).
            ids = [m.get("id") for m in (message if isinstance(message, list) else [message])
                   if isinstance(m, dict)]
            log.warning("reply of %d bytes to pid %d over max_reply_bytes", len(data), self.pid)
            err = errors.RequestTooLarge(
                f"reply of {len(data)} bytes is over this daemon's {cap}-byte limit (use "
                "stream, or fewer requests per batch)", limit=cap, reply=True)
            data = b"".join(protocol.encode(protocol.error_response(i, err)) for i in ids
                            if i is not None) or protocol.encode(protocol.error_response(None, err))
            del message
        async with self.lock:
            if self.writer.is_closing():
                if self.dropped:
                    # Tell the caller (a run's output pump) to stop: nobody will read it.
                    raise ConnectionResetError("client dropped: it stopped reading")
                return
            self.writer.write(data)
            if self._pending() > self.server.config.max_pending_bytes:
                await self._drain_or_drop()

    async def _drain_or_drop(self) -> None:
        """Wait while the client reads; drop it once its backlog stops shrinking."""
        stall = self.server.config.stream_stall_timeout_s
        last = self._pending()
        while True:
            try:
                await asyncio.wait_for(self.writer.drain(), stall)
                return
            except ConnectionError:
                return
            except TimeoutError:
                now = self._pending()
                if now < last:
                    last = now
                    continue
            log.warning("dropping client pid %d uid %d: %d bytes unread for %.0f s", self.pid,
                        self.uid, last, stall)
            self.dropped = True
            self.writer.transport.abort()
            raise ConnectionResetError("client dropped: it stopped reading")

    def on_close(self, callback: Callable[[], None]) -> Callable[[], None]:
        key = next(self._closer_ids)
        self.closers[key] = callback

        def forget() -> None:
            self.closers.pop(key, None)
        return forget

    def _run_closers(self) -> None:
        closers, self.closers = list(self.closers.values()), {}
        for cb in closers:
            try:
                cb()
            except Exception:
                log.exception("a connection close hook failed")

    async def notify(self, message: protocol.Notification) -> None:
        await self.send(protocol.notification(message.method, message))

    async def serve(self) -> None:
        try:
            while True:
                line = await self._read_line()
                if line is None:
                    break
                if not line.strip():
                    continue
                self._count(1)
                task = asyncio.ensure_future(self._handle_line(line))
                self.tasks.add(task)
                task.add_done_callback(self._done)
                # Stop reading (the client's writes then block in the kernel) while too many
                # requests are in flight: their work is bounded before it is even decoded.
                await self.room_for_more.wait()
        finally:
            self.buf.clear()
            self._charge()
            for task in list(self.tasks):
                task.cancel()  # the client is gone: its runs are killed (runs.run cleans up)
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            self._run_closers()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def _read_line(self) -> bytes | None:
        """The next line (with its newline; the last one may lack it), b"" after answering a
        line that could not be kept, None at EOF or when the connection is idle.

        Read in chunks (the StreamReader buffers at most two READ_CHUNKs): an incomplete line is
        kept in ``self.buf`` up to ``max_request_bytes``, and past ``free_line_bytes`` its bytes
        are charged to one daemon-wide budget, ``max_buffered_request_bytes`` (M5: eight
        connections sitting on 40 MB lines without a newline added 320 MB). A line too long,
        or finding the budget spent, is skipped up to its newline and answered
        REQUEST_TOO_LARGE; the connection goes on."""
        cfg = self.server.config
        idle = cfg.connection_idle_timeout_s
        while True:
            nl = self.buf.find(b"\n", self.scanned)
            if nl >= 0:
                line = bytes(self.buf[:nl + 1])
                del self.buf[:nl + 1]
                self.scanned = 0
                self._charge()
                if self.skipping is None:
                    return line
                err, self.skipping = self.skipping, None
                await self.send(protocol.error_response(None, err))
                return b""
            self.scanned = len(self.buf)
            if self.skipping is None:
                if len(self.buf) > cfg.max_request_bytes:
                    self.skipping = errors.RequestTooLarge(
                        f"request larger than {cfg.max_request_bytes} bytes",
                        limit=cfg.max_request_bytes)
                elif not self._charge():
                    self.skipping = errors.RequestTooLarge(
                        "the daemon's buffer for incomplete requests is full "
                        f"({cfg.max_buffered_request_bytes} bytes); retry", limit=len(self.buf),
                        budget=cfg.max_buffered_request_bytes)
            if self.skipping is not None:
                self.buf.clear()
                self.scanned = 0
                self._charge()
            try:
                # Idle = nothing in flight and nothing received for that long: M5. A client
                # waiting for a long exec or a stream has a request in flight; one still
                # sending a line sends bytes.
                chunk = await asyncio.wait_for(self.reader.read(READ_CHUNK),
                                               idle if idle > 0 else None)
            except TimeoutError:
                if self.tasks:
                    continue
                log.info("closing idle connection of pid %d uid %d", self.pid, self.uid)
                return None
            except ConnectionError:
                return None
            if not chunk:
                if self.buf and self.skipping is None:
                    line = bytes(self.buf)  # a last line without its newline still counts
                    self.buf.clear()
                    self._charge()
                    return line
                return None
            self.buf += chunk

    def _charge(self) -> bool:
        """Charge the incomplete line's bytes past ``free_line_bytes`` to the daemon's budget;
        False (nothing changed) when they do not fit."""
        cfg = self.server.config
        need = max(0, len(self.buf) - cfg.free_line_bytes)
        delta = need - self.charged
        if delta > 0 and self.server.buffered + delta > cfg.max_buffered_request_bytes:
            return False
        self.server.buffered += delta
        self.charged = need
        return True

    def _count(self, n: int) -> None:
        self.inflight += n
        if self.inflight >= self.server.config.max_inflight_requests:
            self.room_for_more.clear()
        else:
            self.room_for_more.set()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._count(-1)  # here, not in the task: a task cancelled before it ran runs no finally

    async def _handle_line(self, line: bytes) -> None:
        try:
            obj = protocol.decode(line)
        except errors.ParseError as err:
            await self.send(protocol.error_response(None, err))
            return
        except (UnicodeDecodeError, RecursionError, ValueError) as err:
            # Found by tests/security/test_fuzz_protocol.py: invalid UTF-8 inside a JSON string
            # and nesting deeper than the decoder's recursion limit escaped as bare exceptions,
            # leaving the request unanswered. Both are parse errors.
            await self.send(protocol.error_response(None, errors.ParseError(
                f"invalid JSON: {type(err).__name__}")))
            return
        if isinstance(obj, list):
            if not obj:
                await self.send(protocol.error_response(
                    None, errors.InvalidRequest("empty batch")))
                return
            cap = self.server.config.max_batch_requests
            if len(obj) > cap:
                await self.send(protocol.error_response(None, errors.RequestTooLarge(
                    f"batch of {len(obj)} requests is over this daemon's limit of {cap}",
                    limit=cap, batch=len(obj))))
                return
            heavy = any(_heavy(o) for o in obj)
            self._count(len(obj) - 1)
            try:
                async with self.heavy if heavy else contextlib.nullcontext():
                    replies = await asyncio.gather(*(self._dispatch(o) for o in obj))
                    out = [r for r in replies if r is not None]
                    del replies
                    if out:
                        await self.send(out)
            finally:
                self._count(1 - len(obj))
            return
        heavy = _heavy(obj)
        async with self.heavy if heavy else contextlib.nullcontext():
            reply = await self._dispatch(obj)
            if reply is not None:
                await self.send(reply)

    async def _dispatch(self, obj: Any) -> dict[str, Any] | None:
        req_id = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(req_id, (bool, float, list, dict)):
            req_id = None
        is_notification = isinstance(obj, dict) and "id" not in obj
        try:
            req = protocol.parse_envelope(obj)
            spec = protocol.METHODS.get(req.method)
            if spec is None:
                raise errors.MethodNotFound(f"method not found: {req.method}", method=req.method)
            params = protocol.convert_params(req.method, req.params, spec.params)
            services = self.server.services
            if services is None:
                raise errors.ShuttingDown("the daemon is not serving")
            ctx = services.context(self.uid, self.pid, req.id, self.notify, self.on_close)
            result = await HANDLERS[req.method](ctx, params)
            if not isinstance(result, spec.result):
                raise TypeError(f"{req.method} returned {type(result).__name__}, "
                                f"not {spec.result.__name__}")
            return None if req.is_notification else protocol.response(req.id, result)
        except errors.SandboxError as err:
            if is_notification and not isinstance(err, errors.InvalidRequest):
                return None
            if isinstance(err, errors.InternalError):
                # An InternalError wrapping ENOSPC/EMFILE... would carry host paths in its
                # message: the stable code instead (D12).
                err = host_exhaustion(err) or err
            return protocol.error_response(req_id, err)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            exhausted = host_exhaustion(err)
            if exhausted is not None:
                log.warning("host resource exhausted handling %s: %s", obj.get("method")
                            if isinstance(obj, dict) else "?", err)
                return None if is_notification else protocol.error_response(req_id, exhausted)
            log.exception("internal error handling %r", obj if len(repr(obj)) < 500 else "...")
            if is_notification:
                return None
            return protocol.error_response(req_id, errors.InternalError(
                f"internal error: {type(err).__name__}"))


class Server:
    """The listening socket and its connections. ``services`` are what handlers reach; they are
    set by the daemon once it made them (before :meth:`start`)."""

    def __init__(self, config: DaemonConfig, services: Services | None = None) -> None:
        self.config = config
        self.services = services
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[Connection] = set()
        self.buffered = 0  # bytes of incomplete request lines charged, all connections
        self.path: str | None = None
        self._owns_path = False

    async def start(self, path: str, inherited: socket.socket | None = None,
                    group: str | None = None) -> None:
        # The reader buffers at most two chunks: lines are assembled (and bounded) by
        # Connection._read_line.
        limit = READ_CHUNK
        if inherited is not None:
            # systemd owns a passed socket: Python >= 3.13 would unlink its path on close, and
            # every restart of the service would then leave clients with no socket at all.
            kw: dict[str, Any] = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
            self.server = await asyncio.start_unix_server(self._accept, sock=inherited,
                                                          limit=limit, **kw)
            self.path = path
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o755 if group else 0o700, exist_ok=True)
        # A directory someone else made (/tmp/sandboxd-<uid> when XDG_RUNTIME_DIR is unset) could
        # have their socket swapped in for ours (H9): refuse it.
        reason = config.untrusted_dir(parent)
        if reason is not None:
            raise errors.ValidationError(f"refusing socket directory {parent}: {reason}",
                                         path=parent)
        if os.path.exists(path):
            if _is_live(path):
                raise errors.ValidationError(f"another daemon is listening on {path}", path=path)
            os.unlink(path)
        old = os.umask(0o177 if not group else 0o117)
        try:
            self.server = await asyncio.start_unix_server(self._accept, path=path, limit=limit,
                                                          backlog=128)
        finally:
            os.umask(old)
        if group:
            import grp

            os.chown(path, -1, grp.getgrnam(group).gr_gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        self.path = path
        self._owns_path = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            conn = Connection(self, reader, writer)
        except OSError:
            writer.close()
            return
        cfg = self.config
        refusal = None
        if len(self.connections) >= cfg.max_connections:
            refusal = errors.QuotaExceeded("too many connections", limit=cfg.max_connections)
        elif conn.uid not in (0, os.getuid()) and sum(
                1 for c in self.connections if c.uid == conn.uid) >= cfg.max_connections_per_uid:
            refusal = errors.QuotaExceeded("too many connections for this user",
                                           limit=cfg.max_connections_per_uid)
        if refusal is not None:
            with contextlib.suppress(ConnectionError):
                await conn.send(protocol.error_response(None, refusal))
            writer.close()
            return
        self.connections.add(conn)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def close(self) -> None:
        self.stop_accepting()
        for conn in list(self.connections):
            conn.writer.close()
        if self.connections:
            await asyncio.sleep(0)
        if self._owns_path and self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _is_live(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
