"""stats: live usage of the caller's rooms, from their cgroups (what ``sandboxctl top`` shows).

Result: ``{"backend": "v1", "sandboxes": [{"sandboxId", "status", "activeRuns", "limits",
"usage": {"cpuTimeMs", "memoryPeakBytes", "pidsCurrent", "pidsPeak", "oomKills"}}]}``; with
``sandboxId`` only that room (SANDBOX_NOT_FOUND if the caller cannot see it). ``cpuTimeMs`` is the
room's whole cgroup (init and every run since the room was made), so a client that polls gets CPU
use as the difference of two samples. Figures the backend cannot give are null (the disabled
backend gives none). Reading a room's cgroup files is a handful of small reads: done in a worker
thread so that many rooms never stall the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from .. import protocol
from ..errors import SandboxError
from ..rooms import Room
from . import Context, method


class StatsParams(protocol._Params, frozen=True):
    sandbox_id: str | None = None


def _usage(room: Room) -> dict[str, Any]:
    try:
        st = room.cgroup.stats()
    except SandboxError:
        return {}  # the room is being torn down under us: no figures, not an error
    enforced: frozenset[str] = getattr(room.cgroup, "enforced", frozenset())
    known = room.cgroup.path != ""  # the disabled backend keeps nothing
    return {
        "cpuTimeMs": int(st.cpu_usage_ns / 1e6) if known else None,
        "memoryPeakBytes": st.memory_peak_bytes,
        "memoryCurrentBytes": st.memory_current_bytes,
        "pidsCurrent": st.pids_current if known else None,
        "pidsPeak": st.pids_peak,
        "oomKills": st.oom_kills if "memory" in enforced else None,
    }


def _describe(room: Room) -> dict[str, Any]:
    return {"sandboxId": room.id, "status": room.status, "activeRuns": room.active_runs,
            "limits": msgspec.to_builtins(room.options.limits), "usage": _usage(room)}


@method("stats", StatsParams)
async def stats(ctx: Context, p: StatsParams) -> dict[str, Any]:
    rooms = ctx.daemon.rooms
    if p.sandbox_id is not None:
        chosen = [rooms.get(ctx.uid, p.sandbox_id)]
    else:
        chosen = [r for r in rooms.visible_rooms(ctx.uid) if r.status == "ready"]
    loop = asyncio.get_running_loop()
    described = await loop.run_in_executor(None, lambda: [_describe(r) for r in chosen])
    backend = ctx.daemon.backend.name if ctx.daemon.backend is not None else None
    return {"backend": backend, "sandboxes": described}
