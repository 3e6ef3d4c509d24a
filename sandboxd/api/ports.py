"""waitForPort, exposePort, unexposePort, getExposedPorts: thin layers over ``sandboxd.ports``
(docs/ports.md)."""

from __future__ import annotations

from .. import ports, protocol
from ..context import Context


async def wait_for_port(ctx: Context, p: protocol.WaitForPortParams) -> protocol.WaitForPortResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    status = await ports.wait_for_port(room, p.port, mode=p.mode, path=p.path,
                                       timeout_ms=p.timeout, process_id=p.process_id,
                                       ended=ports.process_ended)
    return protocol.WaitForPortResult(ready=True, port=p.port,
                                      status=protocol.UNSET if status is None else status)


async def expose_port(ctx: Context, p: protocol.ExposePortParams) -> protocol.ExposedPort:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    exposure = ports.expose(room, p.port, ctx.config, name=p.name, unix_socket=p.unix_socket,
                            owner_uid=ctx.uid)
    return exposure.describe()


async def unexpose_port(ctx: Context,
                        p: protocol.UnexposePortParams) -> protocol.UnexposePortResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    return protocol.UnexposePortResult(port=p.port, unexposed=await ports.unexpose(room, p.port))


async def get_exposed_ports(ctx: Context,
                            p: protocol.GetExposedPortsParams) -> protocol.GetExposedPortsResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    return protocol.GetExposedPortsResult(ports=ports.exposed(room))
