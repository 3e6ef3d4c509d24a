"""Daemon configuration and room options: frozen, validated types. Every default lives here.

The daemon reads an optional TOML file (``--config``); command-line flags override it. Room options
arrive over the wire (``getSandbox options``) and are validated by msgspec against these structs.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .errors import InvalidSandboxId, ValidationError
from .protocol import NetworkOptions

MiB = 1024 * 1024
GiB = 1024 * MiB

SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def check_sandbox_id(value: object) -> str:
    """1-63 characters of [A-Za-z0-9_-], not starting or ending with '-'."""
    if not isinstance(value, str) or not SANDBOX_ID_RE.fullmatch(value):
        raise InvalidSandboxId(
            "sandboxId must be 1-63 characters of [A-Za-z0-9_-], not starting or ending with '-'",
            sandboxId=value if isinstance(value, str) and len(value) < 200 else None,
        )
    return value


Positive = Annotated[int, msgspec.Meta(ge=1)]
#: Schema bounds (issue 23 D10): every integer a client sends has an upper bound, so that no value
#: can overflow a conversion later (a 4,000-digit timeout reached time arithmetic in runs.run).
#: These are sanity bounds; the admin's ceilings (``room_limits_max``, ``run_limits_max``) are the
#: real ones.
MAX_BYTES = 1 << 50  # 1 PiB
MAX_MS = (1 << 31) - 1  # ~24.8 days
Bytes = Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)]


class RoomLimits(msgspec.Struct, frozen=True, kw_only=True, rename="camel",
                 forbid_unknown_fields=True):
    """Limits of a whole room (its cgroup and its writable layer)."""

    memory_bytes: Annotated[int, msgspec.Meta(ge=16 * MiB, le=MAX_BYTES)] = 512 * MiB
    cpus: Annotated[float, msgspec.Meta(gt=0, le=1024)] = 1.0
    pids: Annotated[int, msgspec.Meta(ge=8, le=1 << 22)] = 256
    disk_bytes: Annotated[int, msgspec.Meta(ge=1 * MiB, le=MAX_BYTES)] = 1 * GiB


def host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 * GiB


def host_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1


class RoomLimitsMax(msgspec.Struct, frozen=True, kw_only=True, rename="camel",
                    forbid_unknown_fields=True):
    """The admin's ceilings on what a client may ask of a room (H3). A field left out (None)
    takes a default computed from the host at start-up (see :func:`load`)."""

    memory_bytes: Annotated[int, msgspec.Meta(ge=16 * MiB, le=MAX_BYTES)] | None = None
    cpus: Annotated[float, msgspec.Meta(gt=0, le=1024)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=8, le=1 << 22)] = 4096
    disk_bytes: Annotated[int, msgspec.Meta(ge=1 * MiB, le=MAX_BYTES)] | None = None


class RunLimitsMax(msgspec.Struct, frozen=True, kw_only=True, rename="camel",
                   forbid_unknown_fields=True):
    """The admin's ceilings on what a client may ask of one run (exec, runCode, gitCheckout).
    ``outputBytes`` also bounds the daemon's memory: it keeps up to that much of each stream."""

    output_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)] = 64 * MiB
    wall_time_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_MS)] = 24 * 3600 * 1000
    cpu_time_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_MS)] = 24 * 3600 * 1000
    file_size_bytes: Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)] | None = None


def check_ceiling(what: str, name: str, value: float | None, ceiling: float | None) -> None:
    """VALIDATION_FAILED naming the limit and the admin's ceiling when ``value`` is above it."""
    if value is not None and ceiling is not None and value > ceiling:
        raise ValidationError(f"{what}.{name} = {value} is above this daemon's maximum {ceiling}",
                              limit=name, max=ceiling, requested=value)


def check_room_limits(limits: RoomLimits, ceilings: RoomLimitsMax) -> None:
    for name, value, top in (("memoryBytes", limits.memory_bytes, ceilings.memory_bytes),
                             ("cpus", limits.cpus, ceilings.cpus),
                             ("pids", limits.pids, ceilings.pids),
                             ("diskBytes", limits.disk_bytes, ceilings.disk_bytes)):
        check_ceiling("limits", name, value, top)


class RoomOptions(msgspec.Struct, frozen=True, kw_only=True, rename="camel",
                  forbid_unknown_fields=True):
    limits: RoomLimits = RoomLimits()
    env: dict[str, str] = {}
    # Idle handling (docs/persistence.md): seconds without activity (default the daemon's
    # idle_timeout_s), and then what happens: destroyed, saved and stopped (woken by the next
    # call on its id), or kept running.
    sleep_after: Annotated[float, msgspec.Meta(gt=0, le=365 * 86400)] | None = None
    on_idle: Literal["destroy", "snapshot", "keep"] = "destroy"
    # Egress (docs/network.md): absent, no network at all (loopback only).
    network: NetworkOptions | None = None


class DaemonConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    socket: str
    state_dir: str
    rootfs: str  # a directory, or "host"
    log_level: str = "info"
    socket_group: str | None = None
    room_defaults: RoomLimits = RoomLimits()
    idle_timeout_s: float = 600.0  # rooms with no activity this long are destroyed; 0 = never
    room_start_timeout_s: float = 10.0
    max_rooms_per_uid: int = 64
    max_runs_per_room: int = 64
    # Across all of one uid's rooms (each run holds pipes, a cgroup and fds in the daemon):
    # without it, 64 rooms x 64 runs per tenant was the only bound (issue 10, H5).
    max_runs_per_uid: int = 256  # root and the daemon's own uid are exempt
    max_connections: int = 256
    max_connections_per_uid: int = 32  # root and the daemon's own uid are exempt
    # A connection whose unread notifications and replies stay above this many bytes is paused
    # (its runs stop being read, so they block on their pipes) ...
    max_pending_bytes: int = 4 * MiB
    # ... and dropped (its runs killed) when that backlog has not shrunk for this long.
    stream_stall_timeout_s: float = 30.0
    max_request_bytes: int = 48 * MiB
    # Admin ceilings on client-chosen limits (docs/security.md, "Admin limits").
    room_limits_max: RoomLimitsMax = RoomLimitsMax()
    run_limits_max: RunLimitsMax = RunLimitsMax()
    # Work one connection may ask for at once (H6): requests in one batch; requests in flight
    # (the socket is not read further until some finish); bytes of one reply (a batch's
    # included).
    max_batch_requests: Annotated[int, msgspec.Meta(ge=1)] = 1000
    max_inflight_requests: Annotated[int, msgspec.Meta(ge=1)] = 1000
    max_reply_bytes: Annotated[int, msgspec.Meta(ge=1 * MiB)] = 512 * MiB
    # Bytes of all connections' incomplete request lines past the first ``free_line_bytes`` of
    # each (M5): a line that finds this spent is answered REQUEST_TOO_LARGE and skipped.
    max_buffered_request_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 * MiB
    free_line_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1 * MiB
    # A connection with no request in flight that sends nothing for this long is closed; 0 =
    # never. Clients reconnect on their next call.
    connection_idle_timeout_s: float = 300.0
    cgroup_backend: str = "auto"  # auto | v2 | v1 | disabled
    seccomp: bool = True  # False only by explicit choice: rooms then run without a filter
    cgroup_parent: str | None = None  # override the delegated cgroup path (per backend)
    # A streamed readFile of a larger file is FILE_TOO_LARGE: a 100 GB sparse file costs a room
    # nothing and a client's disk everything (issue 10, M3).
    max_stream_read_bytes: int = 1024 * MiB
    # Background processes (startProcess; docs/processes.md). Live ones count as runs too
    # (max_runs_per_room, max_runs_per_uid); these bound what they keep in the daemon.
    max_processes_per_room: Annotated[int, msgspec.Meta(ge=0)] = 16  # live ones
    # Each stream's ring (stdout, stderr): the newest bytes kept, the older ones dropped.
    process_log_bytes: Annotated[int, msgspec.Meta(ge=1024, le=MAX_BYTES)] = 1 * MiB
    # What one room's process records may hold in all: a live process reserves two full rings,
    # an ended one what it still holds; the oldest ended records are dropped to make room.
    max_process_log_bytes_per_room: Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)] = 64 * MiB
    max_ended_processes_per_room: Annotated[int, msgspec.Meta(ge=0)] = 64  # oldest dropped
    # The same across all of one uid's rooms (64 rooms x 64 MiB was the only bound otherwise);
    # root and the daemon's own uid are exempt.
    max_process_log_bytes_per_uid: Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)] = 256 * MiB
    # Ports (sandboxd/ports.py): exposed ports per room (each a listener in the daemon) and
    # forwarded connections open at once per exposed port (each two sockets and a buffer).
    max_exposed_ports_per_room: Annotated[int, msgspec.Meta(ge=0)] = 16
    max_port_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    # Persistence (sandboxd/persistence.py): the compressed size of one backup, export or
    # import; the bytes of one uid's backups (root and the daemon's uid are exempt); the longest
    # ttlSeconds a backup may ask for (0: any).
    max_backup_bytes: Annotated[int, msgspec.Meta(ge=1 * MiB)] = 1024 * MiB
    max_backup_bytes_per_uid: Annotated[int, msgspec.Meta(ge=0)] = 4096 * MiB
    max_backup_ttl_s: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Terminals (openTerminal; docs/interactive.md): open ones per room (each a pty of the
    # room's devpts, a run, a 256 KiB replay ring in the daemon), and how long one whose
    # connection went away waits for an attachTerminal before it is closed.
    max_terminals_per_room: Annotated[int, msgspec.Meta(ge=0)] = 8
    terminal_grace_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    # Sessions (createSession; docs/interactive.md): persistent shells per room (each a state
    # file under the room's /tmp/.sandboxd and a lock in the daemon).
    max_sessions_per_room: Annotated[int, msgspec.Meta(ge=0)] = 32
    #: code contexts (createCodeContext): how many per room, a cell's default timeout, and how
    #: long an interrupted cell may take to stop before its kernel is restarted
    max_contexts_per_room: Annotated[int, msgspec.Meta(ge=0)] = 8
    context_cell_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_MS)] = 60_000
    context_grace_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_MS)] = 3_000
    # Egress (docs/network.md): whether rooms may ask for a network at all; open forwarded
    # connections per room; entries kept in a room's network log.
    egress: bool = True
    max_egress_connections_per_room: Annotated[int, msgspec.Meta(ge=1)] = 256
    network_log_entries: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1000
    # File watch (watch; docs/interactive.md): watches per room (each an inotify instance of the
    # room's, also under the room's inotify ceilings), directories per watch, and the events a
    # watch holds for a client that reads slowly before it drops (and counts) the rest.
    max_watches_per_room: Annotated[int, msgspec.Meta(ge=0)] = 8
    max_watch_dirs: Annotated[int, msgspec.Meta(ge=1)] = 8192
    watch_queue_events: Annotated[int, msgspec.Meta(ge=16)] = 4096


def _resolve_ceilings(cfg: DaemonConfig) -> DaemonConfig:
    """Fill the host-dependent ceilings, and refuse defaults above them (an admin mistake that
    would make every room fail)."""
    ram = host_memory_bytes()
    d = cfg.room_defaults
    top = cfg.room_limits_max
    top = msgspec.structs.replace(
        top,
        memory_bytes=top.memory_bytes or max(ram // 2, d.memory_bytes),
        cpus=top.cpus or float(max(host_cpus(), d.cpus)),
        disk_bytes=top.disk_bytes or max(ram // 2, d.disk_bytes))
    try:
        check_room_limits(d, top)
    except ValidationError as err:
        raise ValidationError(f"invalid config: room_defaults: {err}") from err
    return msgspec.structs.replace(cfg, room_limits_max=top)


def default_socket() -> str:
    if env := os.environ.get("SANDBOXD_SOCKET"):
        return env
    if os.geteuid() == 0:
        return "/run/sandboxd/sandboxd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or fallback_socket_dir()
    return os.path.join(runtime, "sandboxd", "sandboxd.sock")


SYSTEM_SOCKET = "/run/sandboxd/sandboxd.sock"


def fallback_socket_dir() -> str:
    """The directory used when XDG_RUNTIME_DIR is unset: in /tmp, where anyone can make it."""
    return f"/tmp/sandboxd-{os.geteuid()}"


def untrusted_dir(path: str, uid: int | None = None) -> str | None:
    """Why directory ``path`` could be another user's (H9), or None when it is safe to keep a
    socket in: every component of its real path is owned by root or ``uid`` (default: ours)
    and writable by no one else unless sticky (like /tmp); the directory itself must be ours
    and private (a sticky dir is no help there: the socket's name is taken in it)."""
    uid = os.geteuid() if uid is None else uid
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(1, len(parts) + 1):
        comp = "/".join(parts[:i]) or "/"
        try:
            st = os.stat(comp)
        except FileNotFoundError:
            return None  # not made yet: whoever makes it decides
        except OSError as err:
            return f"{comp}: {err.strerror}"
        last = comp == real
        if st.st_uid not in (0, uid) or (last and st.st_uid != uid):
            return f"{comp} is owned by uid {st.st_uid}"
        if st.st_mode & 0o022 and (last or not st.st_mode & 0o1000):
            return f"{comp} is writable by other users (mode {st.st_mode & 0o7777:o})"
    return None


def default_client_socket() -> str:
    """Where a client looks: the daemon's default, else the system service's socket (clients
    of a system install are members of the sandboxd group, not the daemon's user)."""
    path = default_socket()
    if "SANDBOXD_SOCKET" not in os.environ and not os.path.exists(path) \
            and os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return path


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/sandboxd"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return os.path.join(state, "sandboxd")


def default_rootfs_dir() -> str:
    if os.geteuid() == 0:
        return "/var/lib/sandboxd/rootfs/default"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return os.path.join(data, "sandboxd", "rootfs", "default")


def default_rootfs() -> str:
    """The tree rootfs/build.sh builds, when it exists; else a read-only view of the host."""
    for candidate in (os.environ.get("SANDBOXD_ROOTFS"), default_rootfs_dir(),
                      "/var/lib/sandboxd/rootfs/default"):
        if candidate and os.path.isdir(os.path.join(candidate, "usr")):
            return candidate
    return "host"


def load(path: str | None, overrides: dict[str, Any]) -> DaemonConfig:
    """Build the config: defaults, then the TOML file, then non-None overrides (flags)."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ValidationError(f"cannot read config {path}: {err}", path=path) from err
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw.setdefault("socket", default_socket())
    raw.setdefault("state_dir", default_state_dir())
    raw.setdefault("rootfs", default_rootfs())
    try:
        cfg = msgspec.convert(raw, DaemonConfig)
    except msgspec.ValidationError as err:
        raise ValidationError(f"invalid config: {err}") from err
    cfg = _resolve_ceilings(cfg)
    if cfg.rootfs != "host":
        if not os.path.isdir(cfg.rootfs):
            raise ValidationError(f"rootfs {cfg.rootfs} is not a directory", rootfs=cfg.rootfs)
        # Resolved once: .ci/rootfs.sh and rebuilds swap a symlink; rooms of this daemon keep
        # the tree they started with.
        cfg = msgspec.structs.replace(cfg, rootfs=os.path.realpath(cfg.rootfs))
    return cfg
