"""Code interpreter contexts: createCodeContext, runInContext, listCodeContexts,
deleteCodeContext, restartCodeContext, interruptCodeContext (``sandboxd.contexts``)."""

from __future__ import annotations

from typing import Any

from .. import contexts, protocol
from ..context import Context


def _contexts(ctx: Context) -> contexts.Contexts:
    return contexts.Contexts(ctx.rooms, ctx.uid, ctx.facts.check_run_limits)


async def create_code_context(ctx: Context,
                              p: protocol.CreateCodeContextParams) -> protocol.CodeContextInfo:
    made = await _contexts(ctx).create(p.sandbox_id, p.language, p.cwd, p.env, p.limits)
    return made.info()


async def run_in_context(ctx: Context,
                         p: protocol.RunInContextParams) -> protocol.RunInContextResult:
    on_output: contexts.OnOutput | None = None
    on_result: contexts.OnResult | None = None
    if p.stream:
        async def on_output(stream: str, text: str) -> None:
            await ctx.notify(protocol.ContextOutput(request_id=ctx.request_id,
                                                    context_id=p.context_id, stream=stream,
                                                    text=text))

        async def on_result(bundle: dict[str, Any]) -> None:
            await ctx.notify(protocol.ContextResult(request_id=ctx.request_id,
                                                    context_id=p.context_id, result=bundle))

    return await _contexts(ctx).run(p.sandbox_id, p.context_id, p.code, p.timeout, on_output,
                                    on_result)


async def list_code_contexts(ctx: Context, p: protocol.ListCodeContextsParams
                             ) -> protocol.ListCodeContextsResult:
    room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
    return protocol.ListCodeContextsResult(contexts=[c.info() for c in room.contexts.values()])


async def delete_code_context(ctx: Context, p: protocol.ContextParams) -> protocol.CodeContextInfo:
    return (await _contexts(ctx).delete(p.sandbox_id, p.context_id)).info()


async def restart_code_context(ctx: Context,
                               p: protocol.ContextParams) -> protocol.CodeContextInfo:
    return (await _contexts(ctx).restart(p.sandbox_id, p.context_id)).info()


async def interrupt_code_context(ctx: Context,
                                 p: protocol.ContextParams) -> protocol.CodeContextInfo:
    return (await _contexts(ctx).interrupt(p.sandbox_id, p.context_id)).info()
