"""runCode, runExampleCode, listLanguages: the code-run service (see coderun/service.py)."""

from __future__ import annotations

from .. import protocol
from ..context import Context
from .exec import output_sender


async def run_code(ctx: Context, p: protocol.RunCodeParams) -> protocol.RunCodeResult:
    return await ctx.coderun.run_code(ctx, p, output_sender(ctx) if p.stream else None)


async def run_example_code(ctx: Context,
                           p: protocol.RunExamplesParams) -> protocol.RunExamplesResult:
    return await ctx.coderun.run_examples(ctx, p.sandbox_id)


async def list_languages(ctx: Context,
                         p: protocol.ListLanguagesParams) -> protocol.ListLanguagesResult:
    return ctx.coderun.list_languages()
