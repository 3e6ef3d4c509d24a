"""Network egress: setNetworkPolicy, getNetworkLog (``sandboxd.egress``; docs/network.md)."""

from __future__ import annotations

import msgspec

from .. import errors, protocol
from ..context import Context


async def set_network_policy(ctx: Context,
                             p: protocol.SetNetworkPolicyParams) -> protocol.NetworkPolicyResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    hook = ctx.rooms.network
    if hook is None:
        raise errors.LimitUnavailable("this daemon gives sandboxes no network", limit="network")
    await hook.set_policy(room, p.network)
    room.options = msgspec.structs.replace(room.options, network=p.network)
    room.touch()
    return protocol.NetworkPolicyResult(sandbox_id=room.id, network=p.network)


async def get_network_log(ctx: Context,
                          p: protocol.GetNetworkLogParams) -> protocol.NetworkLogResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    eg = room.egress
    if eg is None:
        return protocol.NetworkLogResult(entries=[], stats=protocol.NetworkStats())
    entries = list(eg.log)
    if p.limit is not None:
        entries = entries[-p.limit:]
    return protocol.NetworkLogResult(entries=[e.wire() for e in entries], stats=eg.stats())
