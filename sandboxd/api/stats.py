"""stats: live usage of the caller's rooms, from their cgroups (what ``sandboxctl top`` shows).

Result (``protocol.StatsResult``): ``{"backend": "v1", "sandboxes": [{"sandboxId", "status",
"activeRuns", "limits", "usage": {"cpuTimeMs", "memoryPeakBytes", "pidsCurrent", "pidsPeak",
"oomKills"}}]}``; with ``sandboxId`` only that room (SANDBOX_NOT_FOUND if the caller cannot see
it). ``cpuTimeMs`` is the room's whole cgroup (init and every run since the room was made), so a
client that polls gets CPU use as the difference of two samples. Figures the backend cannot give
are null (the disabled backend gives none). Reading a room's cgroup files is a handful of small
reads: done in a worker thread so that many rooms never stall the event loop.
"""

from __future__ import annotations

import asyncio

import msgspec

from .. import protocol
from ..context import Context
from ..errors import SandboxError
from ..jail.cgroup.interface import RoomCgroup
from ..rooms import Room


def _usage(room: Room) -> protocol.RoomUsage:
    cg: RoomCgroup = room.cgroup
    try:
        st = cg.stats()
    except SandboxError:
        return protocol.RoomUsage()  # the room is being torn down: no figures, not an error
    known = cg.accounting  # the disabled backend keeps nothing
    return protocol.RoomUsage(
        cpu_time_ms=int(st.cpu_usage_ns / 1e6) if known else None,
        memory_peak_bytes=st.memory_peak_bytes, memory_current_bytes=st.memory_current_bytes,
        pids_current=st.pids_current if known else None, pids_peak=st.pids_peak,
        oom_kills=st.oom_kills if "memory" in cg.enforced else None)


def _describe(room: Room) -> protocol.RoomStats:
    return protocol.RoomStats(sandbox_id=room.id, status=room.status,
                              active_runs=room.active_runs,
                              limits=msgspec.to_builtins(room.options.limits),
                              usage=_usage(room),
                              network=room.egress.stats() if room.egress is not None
                              else protocol.UNSET)


async def stats(ctx: Context, p: protocol.StatsParams) -> protocol.StatsResult:
    rooms = ctx.rooms
    if p.sandbox_id is not None:
        chosen = [rooms.get(ctx.uid, p.sandbox_id)]
    else:
        chosen = [r for r in rooms.visible_rooms(ctx.uid) if r.status == "ready"]
    loop = asyncio.get_running_loop()
    described = await loop.run_in_executor(None, lambda: [_describe(r) for r in chosen])
    return protocol.StatsResult(backend=ctx.facts.backend.name, sandboxes=described)
