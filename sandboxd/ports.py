"""A room's ports, seen from the daemon: connect inside the room, wait for a port, expose one.

Theory of operation. A room's network namespace has loopback only, so nothing on the host can
route to a server a payload runs there. The room init lives in that namespace: for every
connection the daemon wants, it sends the init a ``Connect {port}`` (``jail/portops.py``), and
the init answers with a TCP socket already connected to 127.0.0.1:PORT (or ::1) in the room, as
an fd (SCM_RIGHTS). The daemon then owns that socket and reads and writes it on its event loop;
the init never touches a byte of the traffic and is never blocked by it.

  waitForPort  connect (retrying every POLL_S.. up to POLL_MAX_S) until one succeeds; in http
               mode also send ``GET path`` over the passed socket and read the status line
               (200-399 is ready). The given background process ending first is
               PROCESS_EXITED_BEFORE_READY; the deadline passing is PROCESS_READY_TIMEOUT.
  exposePort   a listening socket in the daemon — 127.0.0.1:<ephemeral> (``url``), or a Unix
               socket served only to the caller's uid (``path``) — whose accept loop asks the
               init for one connected socket per accepted client and splices the two:
               one BUFFER_BYTES buffer per direction, the next read only once the previous
               chunk was written (backpressure: a slow reader stalls its writer, nothing piles
               up in the daemon), EOF passed on as shutdown(SHUT_WR) (half-close), an error on
               either side closes both. At most ``max_port_connections`` at once per port;
               past that the daemon stops accepting and the kernel's backlog holds the rest.

Every exposure of a room is in its :class:`RoomPorts`, which closes them all (listeners,
spliced connections, Unix socket files) as soon as the room's init is dead — destroy, daemon
shutdown, an OOM or a crash alike: its watcher is one of the room's tracked futures, which a
teardown awaits after killing the init, so a destroyed room has no listener left when
``destroy`` answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import socket
import struct
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from . import errors, processes, protocol
from .jail import JailError
from .jail import messages as jm
from .jail.handles import FdsTruncated

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .rooms import Room

log = logging.getLogger("sandboxd.ports")

WAIT_TIMEOUT_MS = 30_000  # waitForPort without ``timeout``
POLL_S = 0.02  # first pause between waitForPort's attempts, doubled up to POLL_MAX_S
POLL_MAX_S = 0.25
CONNECT_TIMEOUT_S = 10.0  # one connect inside the room (only a full accept backlog takes long)
HTTP_HEAD_BYTES = 16 * 1024  # what waitForPort reads looking for the status line
BUFFER_BYTES = 256 * 1024  # per direction of a spliced connection
LISTEN_BACKLOG = 128
TOUCH_EVERY_S = 1.0  # traffic on an exposed port is activity (the idle reaper), this often
_STATUS_LINE = re.compile(rb"^HTTP/\d(?:\.\d)? (\d{3})")


class ConnectFailed(Exception):
    """The room init could not connect (nothing listens: ECONNREFUSED; a full backlog:
    ETIMEDOUT); ``errno`` says which. Not a broken room."""

    def __init__(self, num: int, message: str) -> None:
        super().__init__(message)
        self.errno = num


# --- the seam to background processes -----------------------------------------------------------


class ProcessEnded(Protocol):
    """``async (room, process_id) -> the ended process's record, or None while it runs``;
    raises PROCESS_NOT_FOUND for an unknown id."""

    async def __call__(self, room: Room, process_id: str) -> Any | None: ...


#: The one place waitForPort learns whether a process ended (tests inject their own).
process_ended: ProcessEnded = processes.process_ended


def _exit_code(record: Any) -> Any:
    if isinstance(record, dict):
        return record.get("exitCode")
    result = getattr(record, "result", None)  # a processes.ProcessRecord: its run's result
    if result is not None:
        return result.exit_code
    return getattr(record, "exit_code", None)


# --- connecting inside the room -----------------------------------------------------------------


async def connect(room: Room, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A non-blocking TCP socket connected to ``port`` inside ``room`` (the init's, passed as
    an fd). ConnectFailed when nothing accepts; a broken room is its wire error."""
    msg = jm.Connect(port=port, timeout_ms=max(1, int(timeout_s * 1000)))
    try:
        reply, fds = await room.handle.request(msg, timeout=timeout_s + 5.0)
    except FdsTruncated as err:
        raise errors.HostResourceExhausted("the daemon ran out of file descriptors; retry "
                                           "later", errno="EMFILE") from err
    except (JailError, TimeoutError) as err:
        raise errors.room_failure(err, room.id, f"connect to port {port}") from err
    if isinstance(reply, jm.ErrorReply):
        raise ConnectFailed(reply.errno or errno.EIO, reply.message)
    sock = socket.socket(fileno=fds[0])
    # Second fence: whatever the init passed must be a TCP stream socket, nothing we would
    # otherwise read or write with the daemon's credentials (a file, a Unix socket).
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise errors.InternalError(f"sandbox {room.id}: the room init passed a socket that is "
                                   "not TCP", sandboxId=room.id)
    sock.setblocking(False)
    return sock


async def http_status(sock: socket.socket, port: int, path: str) -> int:
    """The status of ``GET path`` over the connected ``sock`` (ValueError if no status line)."""
    loop = asyncio.get_running_loop()
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: sandboxd\r\n"
               "Accept: */*\r\nConnection: close\r\n\r\n").encode()
    await loop.sock_sendall(sock, request)
    head = b""
    while b"\n" not in head and len(head) < HTTP_HEAD_BYTES:
        chunk = await loop.sock_recv(sock, HTTP_HEAD_BYTES - len(head))
        if not chunk:
            break
        head += chunk
    m = _STATUS_LINE.match(head)
    if m is None:
        raise ValueError("no HTTP status line in the answer")
    return int(m.group(1))


async def wait_for_port(room: Room, port: int, *, mode: Literal["tcp", "http"] = "tcp",
                        path: str = "/", timeout_ms: int | None = None,
                        process_id: str | None = None,
                        ended: ProcessEnded | None = None) -> int | None:
    """Return once ``port`` in ``room`` accepts a connection (http mode: answers ``GET path``
    with 200-399; its status is returned). PROCESS_EXITED_BEFORE_READY if ``process_id`` ends
    first, PROCESS_READY_TIMEOUT past ``timeout_ms``."""
    ms = timeout_ms or WAIT_TIMEOUT_MS
    deadline = time.monotonic() + ms / 1e3
    delay = POLL_S
    last = "nothing accepted a connection"
    context: dict[str, Any] = {"sandboxId": room.id, "port": port}
    if process_id is not None:
        context["processId"] = process_id
    while True:
        if process_id is not None:
            record = await (ended or process_ended)(room, process_id)
            if record is not None:
                raise errors.ProcessExitedBeforeReady(
                    f"process {process_id} ended before port {port} was ready",
                    exitCode=_exit_code(record), **context)
        left = deadline - time.monotonic()
        if left <= 0:
            raise errors.ProcessReadyTimeout(
                f"port {port} in sandbox {room.id} was not ready within {ms} ms ({last})",
                timeout=ms, **context)
        try:
            sock = await connect(room, port, min(left, CONNECT_TIMEOUT_S))
        except ConnectFailed as err:
            last = "refused" if err.errno == errno.ECONNREFUSED else os.strerror(err.errno)
        else:
            try:
                if mode == "tcp":
                    return None
                try:
                    status = await asyncio.wait_for(http_status(sock, port, path), left)
                except (OSError, ValueError, TimeoutError) as err:
                    last = f"GET {path}: {err or type(err).__name__}"
                else:
                    if 200 <= status < 400:
                        return status
                    last = f"GET {path} answered {status}"
            finally:
                sock.close()
        room.touch()
        await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        delay = min(delay * 2, POLL_MAX_S)


# --- splicing -----------------------------------------------------------------------------------


async def _pump(src: socket.socket, dst: socket.socket, touch: Callable[[], None]) -> None:
    """``src`` -> ``dst`` until EOF, which is passed on as a half-close."""
    loop = asyncio.get_running_loop()
    buf = bytearray(BUFFER_BYTES)
    view = memoryview(buf)
    while True:
        n = await loop.sock_recv_into(src, buf)
        if not n:
            break
        await loop.sock_sendall(dst, view[:n])  # the next read waits for this write
        touch()
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def splice(a: socket.socket, b: socket.socket,
                 touch: Callable[[], None] = lambda: None) -> None:
    """Copy both ways between two connected non-blocking sockets until both directions saw
    EOF, or either failed (then both stop). The sockets stay the caller's to close."""
    tasks = [asyncio.ensure_future(_pump(a, b, touch)), asyncio.ensure_future(_pump(b, a, touch))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


# --- exposures ----------------------------------------------------------------------------------


class Exposure:
    """One exposed port: a listener in the daemon and the connections it forwards."""

    def __init__(self, room: Room, port: int, name: str, listener: socket.socket,
                 max_connections: int, *, path: str | None = None,
                 allowed_uids: frozenset[int] = frozenset()) -> None:
        self.room = room
        self.port = port
        self.name = name
        self.listener = listener
        self.path = path  # a Unix socket exposure's file
        self.allowed_uids = allowed_uids  # (Unix socket: the peers served)
        self.host_port = 0 if path is not None else int(listener.getsockname()[1])
        self.connections: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_connections)
        self._last_touch = 0.0
        self.closed = False
        self._accepting = asyncio.ensure_future(self._accept_loop())

    def describe(self) -> protocol.ExposedPort:
        if self.path is not None:
            return protocol.ExposedPort(port=self.port, name=self.name, path=self.path)
        return protocol.ExposedPort(port=self.port, name=self.name,
                                    url=f"http://127.0.0.1:{self.host_port}")

    def _touch(self) -> None:
        now = time.monotonic()
        if now - self._last_touch >= TOUCH_EVERY_S:
            self._last_touch = now
            self.room.touch()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                client, _addr = await loop.sock_accept(self.listener)
            except OSError as err:
                self._slots.release()
                # Out of fds (EMFILE) or a connection reset before accept: not the end of the
                # exposure; pause so that a persistent error does not spin.
                log.warning("room %s port %d: accept failed: %s", self.room.key, self.port, err)
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            if self.path is not None and _peer_uid(client) not in self.allowed_uids:
                # Another tenant reached the socket file: it gets EOF, never the room.
                client.close()
                self._slots.release()
                continue
            task = asyncio.ensure_future(self._serve(client))
            self.connections.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.connections.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.warning("room %s port %d: forwarding failed: %s", self.room.key, self.port,
                        task.exception())

    async def _serve(self, client: socket.socket) -> None:
        try:
            self.room.touch()
            try:
                inner = await connect(self.room, self.port)
            except (ConnectFailed, errors.SandboxError) as err:
                log.debug("room %s port %d: %s", self.room.key, self.port, err)
                return  # the client sees its connection closed, as from a refused port
            try:
                await splice(client, inner, self._touch)
            finally:
                inner.close()
        finally:
            client.close()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._accepting.cancel()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(self._accepting, *self.connections, return_exceptions=True)
        self.listener.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class RoomPorts:
    """The exposed ports of one room; closed all at once when its init is dead."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.exposed: dict[int, Exposure] = {}
        self.closed = False
        room.track(self._watch())

    async def _watch(self) -> None:
        await self.room.handle.wait_dead(timeout=None)
        await self.close()

    async def close(self) -> None:
        self.closed = True
        exposures, self.exposed = list(self.exposed.values()), {}
        await asyncio.gather(*(e.close() for e in exposures), return_exceptions=True)


_BY_ROOM: weakref.WeakKeyDictionary[Room, RoomPorts] = weakref.WeakKeyDictionary()


def room_ports(room: Room, create: bool = True) -> RoomPorts | None:
    ports = _BY_ROOM.get(room)
    if ports is None and create:
        ports = _BY_ROOM[room] = RoomPorts(room)
    return ports


def _gone(room: Room) -> errors.SandboxError:
    return errors.room_lost(room.id, f"sandbox {room.id} is being destroyed",
                            reason="destroyed")


def unix_socket_dir(config: DaemonConfig) -> str:
    """Where Unix socket exposures live: ``ports/`` beside the daemon's own socket (which its
    clients can reach already); 0711: its entries can be opened by exact name, not listed."""
    return os.path.join(os.path.dirname(os.path.abspath(config.socket)), "ports")


def expose(room: Room, port: int, config: DaemonConfig, *, name: str | None = None,
           unix_socket: bool = False, owner_uid: int | None = None) -> Exposure:
    """Expose ``port`` of ``room``. Synchronous from the checks to the registration, so that a
    batch of calls cannot all pass the quota before any of them counts."""
    if not room.handle.alive or room.status != "ready":
        raise _gone(room)
    ports = room_ports(room)
    assert ports is not None
    if ports.closed:
        raise _gone(room)
    if port in ports.exposed:
        raise errors.PortAlreadyExposed(f"port {port} of sandbox {room.id} is already exposed",
                                        sandboxId=room.id, **ports.exposed[port].describe().raw)
    limit = config.max_exposed_ports_per_room
    if len(ports.exposed) >= limit:
        raise errors.QuotaExceeded(f"too many exposed ports in sandbox {room.id}", limit=limit,
                                   sandboxId=room.id)
    uid = room.owner if owner_uid is None else owner_uid
    path: str | None = None
    try:
        if unix_socket:
            path, listener = _unix_listener(config, room, port, uid)
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                listener.bind(("127.0.0.1", 0))
                listener.listen(LISTEN_BACKLOG)
            except BaseException:
                listener.close()
                raise
        listener.setblocking(False)
    except OSError as err:
        raise errors.host_exhaustion(err) or errors.InternalError(
            f"could not listen for port {port} of sandbox {room.id}: {err.strerror}",
            sandboxId=room.id) from err
    exposure = Exposure(room, port, name or str(port), listener, config.max_port_connections,
                        path=path, allowed_uids=frozenset({uid, 0}))
    ports.exposed[port] = exposure
    log.info("room %s: port %d exposed on %s", room.key, port,
             path or f"127.0.0.1:{exposure.host_port}")
    return exposure


def _unix_listener(config: DaemonConfig, room: Room, port: int,
                   uid: int) -> tuple[str, socket.socket]:
    base = unix_socket_dir(config)
    os.makedirs(base, mode=0o711, exist_ok=True)
    os.chmod(base, 0o711)
    # Not named after the room: a room key is up to 63 characters and sun_path holds 107.
    path = os.path.join(base, f"{port}-{secrets.token_hex(10)}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        try:
            if os.geteuid() == 0:
                # A root daemon can give the file to the caller: 0600, theirs alone.
                os.chown(path, uid, -1)
                os.chmod(path, 0o600)
            elif uid == os.geteuid():
                os.chmod(path, 0o600)
            else:
                # A rootless daemon cannot chown: the file stays the daemon's, connectable by
                # anyone who can reach it, and every accepted peer is checked (SO_PEERCRED)
                # against the caller's uid before anything reaches the room.
                os.chmod(path, 0o666)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    return path, sock


async def unexpose(room: Room, port: int) -> bool:
    ports = room_ports(room, create=False)
    if ports is None:
        return False
    exposure = ports.exposed.pop(port, None)
    if exposure is None:
        return False
    await exposure.close()
    log.info("room %s: port %d unexposed", room.key, port)
    return True


def exposed(room: Room) -> list[protocol.ExposedPort]:
    ports = room_ports(room, create=False)
    if ports is None:
        return []
    return [e.describe() for _, e in sorted(ports.exposed.items())]
