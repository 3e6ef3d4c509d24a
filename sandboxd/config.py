"""Daemon configuration and room options: frozen, validated types. Every default lives here.

The daemon reads an optional TOML file (``--config``); command-line flags override it. Room options
arrive over the wire (``getSandbox options``) and are validated by msgspec against these structs.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec

from .errors import InvalidSandboxId, ValidationError

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


class RoomLimits(msgspec.Struct, frozen=True, kw_only=True, rename="camel",
                 forbid_unknown_fields=True):
    """Limits of a whole room (its cgroup and its writable layer)."""

    memory_bytes: Annotated[int, msgspec.Meta(ge=16 * MiB)] = 512 * MiB
    cpus: Annotated[float, msgspec.Meta(gt=0, le=1024)] = 1.0
    pids: Annotated[int, msgspec.Meta(ge=8, le=1 << 22)] = 256
    disk_bytes: Annotated[int, msgspec.Meta(ge=1 * MiB)] = 1 * GiB


class RoomOptions(msgspec.Struct, frozen=True, kw_only=True, rename="camel",
                  forbid_unknown_fields=True):
    limits: RoomLimits = RoomLimits()
    env: dict[str, str] = {}


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
    max_connections: int = 256
    max_connections_per_uid: int = 32  # root and the daemon's own uid are exempt
    # A connection whose unread notifications and replies stay above this many bytes is paused
    # (its runs stop being read, so they block on their pipes) ...
    max_pending_bytes: int = 4 * MiB
    # ... and dropped (its runs killed) when that backlog has not shrunk for this long.
    stream_stall_timeout_s: float = 30.0
    max_request_bytes: int = 48 * MiB
    cgroup_backend: str = "auto"  # auto | v2 | v1 | disabled
    seccomp: bool = True  # False only by explicit choice: rooms then run without a filter
    cgroup_parent: str | None = None  # override the delegated cgroup path (per backend)
    # A streamed readFile of a larger file is FILE_TOO_LARGE: a 100 GB sparse file costs a room
    # nothing and a client's disk everything (issue 10, M3).
    max_stream_read_bytes: int = 1024 * MiB


def default_socket() -> str:
    if env := os.environ.get("SANDBOXD_SOCKET"):
        return env
    if os.geteuid() == 0:
        return "/run/sandboxd/sandboxd.sock"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/sandboxd-{os.geteuid()}"
    return os.path.join(runtime, "sandboxd", "sandboxd.sock")


SYSTEM_SOCKET = "/run/sandboxd/sandboxd.sock"


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
    if cfg.rootfs != "host":
        if not os.path.isdir(cfg.rootfs):
            raise ValidationError(f"rootfs {cfg.rootfs} is not a directory", rootfs=cfg.rootfs)
        # Resolved once: .ci/rootfs.sh and rebuilds swap a symlink; rooms of this daemon keep
        # the tree they started with.
        cfg = msgspec.structs.replace(cfg, rootfs=os.path.realpath(cfg.rootfs))
    return cfg
