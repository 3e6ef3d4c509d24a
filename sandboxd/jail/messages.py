"""Every message that crosses the jail's channels, declared once (issue 12).

Theory of operation. Three processes talk over SOCK_SEQPACKET socketpairs (``channel.py``: one
msgpack datagram per message, fds by SCM_RIGHTS):

    daemon ──ToZygote──> zygote            SpawnRoom {spec: RoomSpec}, Ping
           <─FromZygote─                   RoomSpawned {pid} + [init channel, pidfd], Pong,
                                           ErrorReply; event Exited {pid, status}
    daemon ──ToInit────> room init         Spawn, Kill, KillAll, Ping, the file operations and
                                           Connect (a socket inside the room's netns),
                                           Listen (one for the daemon's egress forwarder),
                                           OpenPty (a pty pair of the room's devpts),
                                           NewInotify, AddWatch (file watch)
           <─FromInit───                   one reply type per request, or ErrorReply;
                                           events Ready, Failed, Exit

The zygote forks the room's set-up process, which forks the init: the ``RoomSpec`` reaches the
init through those forks (plus the scratch fd the set-up process mounted), never a channel. The
payload the init starts gets no message at all: argv, env and fds.

Every message is a msgspec Struct tagged by ``op``; unknown fields, a missing field, a wrong type
or an unknown ``op`` fail to decode, and **a message that does not decode is a dead room** (the
init exits on one; the daemon closes the channel and kills the init on one), as is a reply of
the wrong type for its request or with the wrong number of fds. A request declares its reply
type as its generic parameter (``class Kill(Request[KillReply])``); requests carry an ``id``,
replies the ``re`` of their request; events carry neither. Defaults live here, in the structs
(``Kill.sig`` is SIGKILL), never at the reader.

This module is imported by the room init: msgspec and the id map only (no asyncio, logging).
"""

from __future__ import annotations

import typing
from typing import ClassVar, Generic, Literal, TypeVar

import msgspec

from .user import IdMap


class Message(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    """Base of every channel message: ``op`` is the tag (the class's ``tag=``)."""

    #: descriptors that travel with the message (SCM_RIGHTS); any other count is a bad message
    nfds: ClassVar[int] = 0


class Reply(Message, kw_only=True):
    """An answer to the request whose ``id`` is ``re``."""

    re: int = 0


R = TypeVar("R", bound=Reply)
#: (covariant: a Request[Pong] is a request whose reply is a Pong, or anything wider)
R_co = TypeVar("R_co", bound=Reply, covariant=True)


class Request(Message, Generic[R_co], kw_only=True):
    """A request; its generic parameter is the type of its (successful) reply."""

    id: int = 0


class Event(Message, kw_only=True):
    """Something the peer says unasked."""


class ErrorReply(Reply, tag="error", kw_only=True):
    """The one error shape, for every request of both peers: an OSError as data."""

    errno: int
    message: str
    filename: str | None = None


# --- the room spec (daemon -> zygote -> set-up process -> init) --------------------------------


class RoomSpec(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """What a room is made of (``rooms.RoomManager._create`` builds it)."""

    room_id: str  # the room's host-side key (rooms.room_key): process names, logs
    rootfs: str
    scratch: str  # the state directory the room's tmpfs is mounted on
    disk_bytes: int
    hostname: str
    cgroup_procs: list[str]  # cgroup.procs files the set-up process joins before unshare
    cgroup_home_by_dir: bool  # v1: the init keeps the directories (see zygote._setup_process)
    ids: IdMap  # who the room's root is on the host (user.py)
    seccomp_bpf: bytes | None = None


# --- daemon <-> zygote ---------------------------------------------------------------------------


class RoomSpawned(Reply, tag="room_spawned", kw_only=True):
    """The init's host pid; fds: the daemon's end of the init channel, a pidfd of the init."""

    nfds: ClassVar[int] = 2
    pid: int


class Pong(Reply, tag="pong", kw_only=True):
    runs: int = 0  # (the room init's: payloads it has not reaped yet)


class SpawnRoom(Request[RoomSpawned], tag="spawn", kw_only=True):
    spec: RoomSpec


class Ping(Request[Pong], tag="ping", kw_only=True):
    pass


class Exited(Event, tag="exited", kw_only=True):
    """A room init the zygote reaped: its wait status (the daemon holds only a pidfd)."""

    pid: int
    status: int


# --- daemon <-> room init: runs ------------------------------------------------------------------


class SpawnReply(Reply, tag="spawned", kw_only=True):
    pid: int  # in the room's pid namespace (0: it could not start; its Exit follows)


class KillReply(Reply, tag="killed", kw_only=True):
    found: bool  # whether ``run`` was a live run


class KillAllReply(Reply, tag="killedall", kw_only=True):
    pass


class Spawn(Request[SpawnReply], tag="spawn", kw_only=True):
    """Start a payload. fds: [stdin, stdout, stderr, *the run cgroup's ``ncg`` fds]."""

    run: str
    argv: list[str]
    env: dict[str, str] = {}
    cwd: str = "/workspace"
    user: Literal["root", "sandbox"] = "root"
    rlimits: dict[str, int] = {}  # init.RLIMIT_NAMES -> value (soft = hard)
    ncg: int = 0
    pids_limited: bool = False
    #: stdin/stdout/stderr are one pty slave: the payload makes it its controlling terminal
    #: (after its setsid) and owns it as its user (issue 15, terminals)
    tty: bool = False


class Kill(Request[KillReply], tag="kill", kw_only=True):
    """Signal the process group of ``run``."""

    run: str
    sig: int = 9  # SIGKILL


class KillAll(Request[KillAllReply], tag="killall", kw_only=True):
    """SIGKILL every process of the room but the init."""


class Rusage(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    utime: float = 0.0
    stime: float = 0.0
    maxrss_kb: int = 0


class Failure(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A payload step that failed between fork and exec (init._payload's stages)."""

    stage: str
    errno: int = 0


class Exit(Event, tag="exit", kw_only=True):
    """A run's main process was reaped (or could not start: ``failure``)."""

    run: str
    status: int  # the wait status
    rusage: Rusage = Rusage()
    failure: Failure | None = None
    #: CLOCK_MONOTONIC at spawn and at reaping (one clock for the room and the daemon)
    t: tuple[float, float] | None = None


class Ready(Event, tag="ready", kw_only=True):
    pid: int  # the init's pid in the room (1)


class Failed(Event, tag="failed", kw_only=True):
    """The init's set-up failed; it exits."""

    error: str


# --- daemon <-> room init: files (jail/fileops.py) -----------------------------------------------


class Opened(Reply, tag="f_opened", kw_only=True):
    """fds: [an O_RDONLY fd of the regular file]."""

    nfds: ClassVar[int] = 1
    path: str
    size: int
    mtime: float
    mode: int


class Written(Reply, tag="f_written", kw_only=True):
    path: str
    bytes_written: int


class Existence(Reply, tag="f_existence", kw_only=True):
    path: str
    exists: bool
    type: str | None = None  # "file" | "directory" | "symlink" | "other"


class PathReply(Reply, tag="f_done", kw_only=True):
    """The resolved path of a file operation that has nothing else to say."""

    path: str


class Renamed(Reply, tag="f_renamed", kw_only=True):
    path: str
    new_path: str


class Listing(Reply, tag="f_listing", kw_only=True):
    """fds: [a memfd holding the rows, a msgpack array of
    ``[name, relativePath, type, size, mtime, mode]``]."""

    nfds: ClassVar[int] = 1
    path: str
    count: int
    truncated: bool


class CodeState(Reply, tag="f_code_state", kw_only=True):
    path: str
    sealed: bool = False


class OpenRead(Request[Opened], tag="f_open_read", kw_only=True):
    path: str


class Write(Request[Written], tag="f_write", kw_only=True):
    """fds: [the read end of a pipe carrying exactly ``size`` bytes]."""

    path: str
    size: int
    append: bool = False


class Exists(Request[Existence], tag="f_exists", kw_only=True):
    path: str


class Delete(Request[PathReply], tag="f_delete", kw_only=True):
    path: str


class Rename(Request[Renamed], tag="f_rename", kw_only=True):
    src: str
    dst: str
    into: bool = False  # moveFile: an existing directory as ``dst`` receives ``src``


class Mkdir(Request[PathReply], tag="f_mkdir", kw_only=True):
    path: str
    recursive: bool = False


class ListDir(Request[Listing], tag="f_list", kw_only=True):
    path: str
    recursive: bool = False
    hidden: bool = False
    limit: int | None = None  # None: fileops.LIST_MAX_ENTRIES (also the ceiling)


class Code(Request[CodeState], tag="f_code", kw_only=True):
    """A step on the code-run cache directory ``name`` (fileops, "the code-run cache")."""

    action: Literal["state", "prepare", "seal", "remove"]
    name: str
    shared: bool = False  # prepare: writable by the sandbox user too


# --- daemon <-> room init: ports (jail/portops.py) ----------------------------------------------


class Connected(Reply, tag="p_connected", kw_only=True):
    """fds: [a TCP socket connected, inside the room's network namespace, to ``address``]."""

    nfds: ClassVar[int] = 1
    address: str  # "127.0.0.1" or "::1": the first of them that accepted


class Connect(Request[Connected], tag="p_connect", kw_only=True):
    """Connect to ``port`` on the room's loopback (127.0.0.1, then ::1 if that is refused),
    without blocking the init; ECONNREFUSED when neither accepts, ETIMEDOUT past
    ``timeout_ms``."""

    port: int
    timeout_ms: int = 5000


class Listening(Reply, tag="p_listening", kw_only=True):
    """fds: [a socket bound, inside the room's network namespace, to ``address``:``port``
    (listening, for tcp)]."""

    nfds: ClassVar[int] = 1
    address: str
    port: int


class Listen(Request[Listening], tag="p_listen", kw_only=True):
    """A socket of the room's loopback on a free port, for the daemon (egress: the forwarder's
    TCP listener and the room's DNS server)."""

    kind: Literal["tcp", "udp"]
    family: Literal[4, 6] = 4


class NamespaceFds(Reply, tag="p_ns", kw_only=True):
    """fds: [the room's user namespace, its network namespace] (the init's /proc/self/ns)."""

    nfds: ClassVar[int] = 2


class Namespaces(Request[NamespaceFds], tag="p_ns_get", kw_only=True):
    """For ``jail/netns_exec.py``: the daemon configures the room's netfilter through them."""


# --- daemon <-> room init: terminals (jail/ptyops.py) -------------------------------------------


class PtyOpened(Reply, tag="t_opened", kw_only=True):
    """fds: [the master, the slave] of a pty of the room's own devpts, ``name`` the slave's
    path in the room (/dev/pts/N)."""

    nfds: ClassVar[int] = 2
    name: str


class OpenPty(Request[PtyOpened], tag="t_open", kw_only=True):
    """Open a pty pair in the room's devpts, sized ``cols`` x ``rows``."""

    cols: int = 80
    rows: int = 24


# --- daemon <-> room init: file watch (jail/watchops.py) ----------------------------------------


class Inotify(Reply, tag="w_inotify", kw_only=True):
    """fds: [an inotify instance made by the init: counted in the room's user namespace, under
    its inotify ceilings (jail/user.py ROOM_UCOUNTS), not the daemon user's]."""

    nfds: ClassVar[int] = 1


class NewInotify(Request[Inotify], tag="w_new", kw_only=True):
    pass


class Watched(Reply, tag="w_watched", kw_only=True):
    """The directories now watched, as [watch descriptor, absolute path]; ``found``: what the
    directories below ``path`` already held, as [path, is_directory] (a directory made after the
    watch began may have been filled before its own watch was added); ``truncated``: a limit
    (``limit`` directories, the room's inotify ceiling) stopped the walk."""

    path: str
    dirs: list[tuple[int, str]]
    found: list[tuple[str, bool]] = []
    truncated: bool = False


class AddWatch(Request[Watched], tag="w_add", kw_only=True):
    """fds: [the inotify instance]. Watch directory ``path`` and, with ``recursive``, every
    directory below it whose name matches none of ``exclude`` (globs), never through a symlink,
    at most ``limit`` directories; ``report`` asks for ``found``."""

    nfds: ClassVar[int] = 1
    path: str
    recursive: bool = True
    exclude: list[str] = []
    limit: int = 4096
    report: bool = False


# --- the unions each side decodes ----------------------------------------------------------------

ToZygote = SpawnRoom | Ping
FromZygote = RoomSpawned | Pong | ErrorReply | Exited
ToInit = Spawn | Kill | KillAll | Ping | OpenRead | Write | Exists | Delete | Rename | Mkdir \
    | ListDir | Code | Connect | OpenPty | NewInotify | AddWatch | Listen | Namespaces
FromInit = SpawnReply | KillReply | KillAllReply | Pong | Opened | Written | Existence \
    | PathReply | Renamed | Listing | CodeState | Connected | PtyOpened | Inotify | Watched \
    | Listening | NamespaceFds | ErrorReply | Exit | Ready | Failed

to_zygote: msgspec.msgpack.Decoder[ToZygote] = msgspec.msgpack.Decoder(ToZygote)
from_zygote: msgspec.msgpack.Decoder[FromZygote] = msgspec.msgpack.Decoder(FromZygote)
to_init: msgspec.msgpack.Decoder[ToInit] = msgspec.msgpack.Decoder(ToInit)
from_init: msgspec.msgpack.Decoder[FromInit] = msgspec.msgpack.Decoder(FromInit)


def reply_type(request: type[Request[R]]) -> type[R]:
    """The reply type a request class declares (its generic parameter)."""
    for base in getattr(request, "__orig_bases__", ()):
        if typing.get_origin(base) is Request:
            (arg,) = typing.get_args(base)
            out: type[R] = arg
            return out
    raise TypeError(f"{request.__name__} declares no reply type")
