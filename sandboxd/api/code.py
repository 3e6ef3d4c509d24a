"""runCode, runExampleCode, listLanguages: the code-run service (see coderun/service.py)."""

from __future__ import annotations

from typing import Any

from ..coderun.service import (
    CodeRunService,
    ListLanguagesParams,
    RunCodeParams,
    RunExamplesParams,
)
from . import Context, method


def service(ctx: Context) -> CodeRunService:
    svc: CodeRunService | None = getattr(ctx.daemon, "coderun", None)
    if svc is None:
        svc = CodeRunService(ctx.daemon.config.rootfs)
        ctx.daemon.coderun = svc  # type: ignore[attr-defined]
    return svc


@method("runCode", RunCodeParams)
async def run_code(ctx: Context, p: RunCodeParams) -> dict[str, Any]:
    return await service(ctx).run_code(ctx, p)


@method("runExampleCode", RunExamplesParams)
async def run_example_code(ctx: Context, p: RunExamplesParams) -> dict[str, Any]:
    return await service(ctx).run_examples(ctx, p.sandbox_id)


@method("listLanguages", ListLanguagesParams)
async def list_languages(ctx: Context, p: ListLanguagesParams) -> dict[str, Any]:
    return service(ctx).list_languages()
