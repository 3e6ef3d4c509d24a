"""The disabled backend: the shared tree machinery over zero hierarchies.

Rooms and runs are the same :class:`tree.Room` and :class:`tree.Run` as on v1 and v2, over a
:class:`tree.Node` with no directory: nothing is created, written, counted, killed or removed,
so callers never write ``if cgroups_enabled``. Without cgroups the fences are rlimits and the
wall-clock kill of the room's pid-namespace init (PID 1), which takes every process of the room
with it; doctor and ping say so. A room also holds such a cgroup before the backend made its
real one (:func:`unattached`).
"""

from __future__ import annotations

from typing import Any

from ... import limits as limits_table
from ...config import RoomLimits
from .fs import Fs
from .interface import CgroupStats, RoomCgroup, RunCgroupLimits
from .tree import Node, Ops, Room, TreeBackend

__all__ = ["DisabledBackend", "unattached"]


class DisabledOps(Ops):
    """Nothing to touch: every node has no directory."""

    accounting = False
    backend = "disabled"

    def write_room_limits(self, node: Node, limits: RoomLimits, enforce: set[str]) -> None:
        pass  # no controller: ``enforce`` is empty

    def write_run_limits(self, node: Node, limits: RunCgroupLimits) -> None:
        pass  # check_run_limits refused every limit already

    def prepare_room(self, node: Node) -> None:
        pass

    def prepare_run(self, node: Node) -> None:
        pass

    def cpu_usage_ns(self, node: Node) -> int:
        return 0

    def stats(self, node: Node) -> CgroupStats:
        return CgroupStats()

    def oom_kills(self, node: Node) -> int:
        return 0

    def kill(self, node: Node) -> None:
        pass  # the caller's kill of the room's PID 1 takes every process of the room with it

    def populated(self, node: Node) -> bool:
        return False

    def join_fds(self, node: Node) -> list[int]:
        return []


_NOWHERE = Node({})


def unattached(room_id: str) -> RoomCgroup:
    """What a room has before its cgroup is created (and keeps if creation failed): nothing to
    enforce, count, kill or remove, so callers need no ``if cgroup is None``."""
    return Room(DisabledOps(Fs(), frozenset()), _NOWHERE, room_id, frozenset())


class DisabledBackend(TreeBackend):
    name = "disabled"
    controllers: frozenset[str] = frozenset()
    accounting = False

    def __init__(self, reason: str, tried: dict[str, str] | None = None) -> None:
        self.reason = reason
        self.tried = tried or {}
        self.ops = DisabledOps(Fs(), self.controllers)
        self.base = _NOWHERE

    def describe(self) -> dict[str, Any]:
        return {"backend": "disabled", "controllers": [], "reason": self.reason,
                "tried": dict(self.tried),
                "missing": sorted(str(lim.cgroup_name) for lim in limits_table.CGROUP_LIMITS),
                "fences": "rlimits and wall-clock kills only"}
