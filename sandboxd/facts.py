"""What this daemon's host offers and enforces, decided once at start-up: the ``ping``
capabilities and the run limits a request may ask for.

Built by the daemon after it detected the cgroup backend, planned the id mapping and built the
seccomp filter; handlers see it through their context (``context.Context.facts``), never the
daemon itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import config as configmod
from . import errors, limits, protocol
from .config import DaemonConfig
from .jail.cgroup.interface import CgroupBackend
from .jail.user import IdPlan

NAMESPACES = ["user", "mnt", "pid", "net", "ipc", "uts", "cgroup"]


@dataclass
class HostFacts:
    config: DaemonConfig
    backend: CgroupBackend
    ids: IdPlan
    seccomp: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    #: what the kernel offers of the interfaces newer than Debian 12's (sandboxd.kernel.summary)
    kernel: dict[str, Any] = field(default_factory=dict)
    #: egress on this host (egress.Network.describe): {available, mechanism, reason?}
    egress: dict[str, Any] = field(default_factory=dict)

    def capabilities(self) -> protocol.Capabilities:
        return protocol.Capabilities(
            namespaces=NAMESPACES, cgroup=self.backend.describe(), rootfs=self.config.rootfs,
            id_mapping=self.ids.mode,  # "single" | "subordinate"
            id_slices=dict(self.ids.describe()), seccomp=self.seccomp,
            limits=sorted(self.enforceable_limits()), kernel=self.kernel, egress=self.egress)

    def enforceable_limits(self) -> set[str]:
        """Wire names of the limits this host enforces (rooms and runs), from the limits table."""
        return self.backend.enforceable_wire()

    def check_run_limits(self, lim: protocol.RunLimits, wall_time_ms: int | None = None) -> None:
        """Every run's limits pass here (``runs.run_in_room``): above the admin's ceiling is
        VALIDATION_FAILED naming the limit and the ceiling; a limit this host cannot enforce is
        refused, by name (fail closed). ``wall_time_ms`` is the effective wall limit
        (``limits.wallTimeMs`` or the ``timeout`` param)."""
        top = self.config.run_limits_max
        for name, value, ceiling in (("outputBytes", lim.output_bytes, top.output_bytes),
                                     ("wallTimeMs", wall_time_ms, top.wall_time_ms),
                                     ("cpuTimeMs", lim.cpu_time_ms, top.cpu_time_ms),
                                     ("fileSizeBytes", lim.file_size_bytes,
                                      top.file_size_bytes),
                                     ("pids", lim.pids, self.config.room_limits_max.pids)):
            configmod.check_ceiling("limits", name, value, ceiling)
        asked = [name for name, value in msgspec.to_builtins(lim).items() if value is not None]
        refused = limits.first_unenforceable(asked, self.enforceable_limits(), limits.Scope.RUN)
        if refused is not None:
            raise errors.LimitUnavailable(
                f"limit {refused.wire} cannot be enforced here (cgroup backend "
                f"{self.backend.name})", limit=refused.wire)
