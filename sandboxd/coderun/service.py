"""The code-run service: compile and run a program in one of 13 languages inside a room.

Theory of operation. ``runCode`` resolves the language in the registry (``languages.toml``),
writes the sources into a directory of the room named by a hash of (language, toolchain version,
sources, compile command), and then, in two separate runs each under its own limits:

  compile   only for compiled languages, and only when that directory is not a sealed, complete
            compile yet — a second runCode of the same source skips the compiler entirely
  run       the program, with the caller's stdin, args and limits

A compile that fails (non-zero exit, or killed by a compile limit) is the verdict ``CE`` with the
compiler's report in ``compile``; the run's verdict is the ordinary one (OK RE SG TO ML OL XX).
Both steps go through ``runs.run_in_room``, so they get the same cgroups, deadlines and
reports as ``exec``; the sources are written with ``roomfiles.write`` (room-level calls only:
this service never goes through ``api/``). The directory lives under /tmp/.sandboxd in the room
(the room's disk budget); nothing of it is ever read by the daemon. Room code can neither
change a compiled directory nor plant one (issue 10, M2): see "the code-run cache" in
jail/fileops.py. Without a second mapped id (single-id mode) nothing is reused: every runCode
compiles.

Which toolchains exist comes from the rootfs manifest (``/etc/sandboxd/manifest.json`` in the
tree, written by rootfs/build.sh). On the ``host`` rootfs there is no manifest: a language is
available when its commands are found on the host's /usr.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from .. import errors, protocol, roomfiles, runs
from .registry import Language, Limits, Registry, load_registry

if TYPE_CHECKING:
    from ..context import Context
    from ..rooms import Room

CODE_DIR = "/tmp/.sandboxd"  # jail/fileops.CODE_BASE: a mount point only the init may change
MARKER = ".compiled"
EXAMPLE_CONCURRENCY = 2
HOST_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Toolchain:
    available: bool
    version: str | None


def read_manifest(rootfs: str) -> dict[str, Any] | None:
    if rootfs == "host":
        return None
    for path in (os.path.join(rootfs, "etc", "sandboxd", "manifest.json"),
                 rootfs.rstrip("/") + ".manifest.json"):
        try:
            with open(path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            continue
    return None


class CodeRunService:
    def __init__(self, rootfs: str, registry: Registry | None = None) -> None:
        self.registry = registry or load_registry()
        self.rootfs = rootfs
        self.manifest = read_manifest(rootfs)
        self.toolchains = {lang.id: self._toolchain(lang) for lang in self.registry}
        self._locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = \
            weakref.WeakValueDictionary()

    @staticmethod
    def can_seal(room: Room) -> bool:
        """Sealing needs a second mapped id (jail/fileops.SEAL_UID): not in single-id mode."""
        from ..jail.fileops import SEAL_UID

        return room.ids is not None and bool(room.ids.maps(SEAL_UID))

    def _toolchain(self, lang: Language) -> Toolchain:
        if self.manifest is not None:
            entry = (self.manifest.get("languages") or {}).get(lang.id)
            if isinstance(entry, dict) and entry.get("version"):
                return Toolchain(True, str(entry["version"]))
            return Toolchain(False, None)
        # host view: the room sees the host's /usr read-only
        if self.rootfs == "host":
            cmds = [lang.run[0]] + ([lang.compile[0]] if lang.compile else [])
            ok = all(shutil.which(c, path=lang.env.get("PATH", HOST_PATH)) for c in cmds
                     if not c.startswith("{"))
            return Toolchain(ok, "host" if ok else None)
        return Toolchain(False, None)

    # --- listLanguages ------------------------------------------------------------------------

    def list_languages(self) -> protocol.ListLanguagesResult:
        return protocol.ListLanguagesResult(languages=[
            protocol.LanguageInfo(id=lang.id, name=lang.name, aliases=list(lang.aliases),
                                  extension=lang.extension, compiled=lang.compiled,
                                  version=self.toolchains[lang.id].version,
                                  available=self.toolchains[lang.id].available)
            for lang in self.registry])

    # --- runCode ------------------------------------------------------------------------------

    def _key(self, lang: Language, sources: dict[str, str], compile_argv: list[str] | None) -> str:
        h = hashlib.sha256()
        for part in (lang.id, self.toolchains[lang.id].version or "", json.dumps(compile_argv),
                     json.dumps(sorted(sources.items()))):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:32]

    async def run_code(self, ctx: Context, p: protocol.RunCodeParams,
                       on_output: runs.OutputCallback | None = None) -> protocol.RunCodeResult:
        lang = self.registry.resolve(p.language)
        tool = self.toolchains[lang.id]
        if not tool.available:
            raise errors.UnsupportedLanguage(
                f"{lang.name} is not installed in this sandbox's runtime tree",
                language=lang.id, available=False, supported=list(self.registry.ids))
        lang = lang.for_source(p.code)  # e.g. Java's public class and main() class
        sources = {lang.source_file: p.code, **(p.files or {})}
        for name in sources:
            if not name or name.startswith("/") or ".." in name.split("/") or "\0" in name:
                raise errors.ValidationError(f"invalid file name {name!r} in files",
                                             field="files", name=name)
        key = self._key(lang, sources, lang.compile_argv("."))
        name = f"{lang.id}-{key}"
        workdir = f"{CODE_DIR}/{name}"
        env = lang.env_for(workdir)
        room = await ctx.rooms.get_or_create(ctx.uid, p.sandbox_id)
        lock = self._locks.setdefault((room.id, name), asyncio.Lock())
        compile_report: protocol.CompileReport | None = None
        async with lock:
            # Reused only when sealed (fileops, "the code-run cache"): room code cannot have
            # changed a byte of it since the compile that made it.
            state = await roomfiles.code_op(room, "state", name)
            cached = state.sealed
            if not cached:
                await roomfiles.code_op(room, "prepare", name, shared=p.user == "sandbox")
                for fname, content in sources.items():
                    await roomfiles.write(room, f"{workdir}/{fname}", content.encode())
                compile_argv = lang.compile_argv(workdir)
                if compile_argv is not None:
                    lim = _merge_limits(lang.compile_limits, p.compile_limits,
                                        room.options.limits.memory_bytes,
                                        ctx.facts.enforceable_limits())
                    res = await runs.run_in_room(
                        ctx.rooms, ctx.uid, room.id, compile_argv,
                        check_limits=ctx.facts.check_run_limits, env=env, cwd=workdir,
                        stdin=b"", user=p.user, limits=lim, timeout_ms=None, on_output=None)
                    compile_report = protocol.CompileReport(
                        status=res.status, exit_code=res.exit_code, stdout=res.stdout,
                        stderr=res.stderr, cpu_time_ms=res.cpu_time_ms,
                        wall_time_ms=res.wall_time_ms, memory_peak_bytes=res.memory_peak_bytes,
                        timed_out=res.timed_out, oom_killed=res.oom_killed)
                    if res.status != "OK":
                        return protocol.RunCodeResult(
                            success=False, language=lang.id, status="CE",
                            exit_code=res.exit_code, stdout="", stderr="",
                            compile=compile_report, cached=False, cpu_time_ms=None,
                            wall_time_ms=None, memory_peak_bytes=None)
                await roomfiles.write(room, f"{workdir}/{MARKER}", b"")
                if self.can_seal(room):
                    await roomfiles.code_op(room, "seal", name)
        argv = lang.run_argv(workdir) + list(p.args or [])
        res = await runs.run_in_room(
            ctx.rooms, ctx.uid, room.id, argv, check_limits=ctx.facts.check_run_limits,
            env=env, cwd=workdir, stdin=(p.stdin or "").encode(), user=p.user, limits=p.limits,
            timeout_ms=None, on_output=on_output)
        return protocol.RunCodeResult(
            success=res.status == "OK", language=lang.id, exit_code=res.exit_code,
            stdout=res.stdout, stderr=res.stderr, compile=compile_report, cached=cached,
            status=res.status, signal=res.signal, timed_out=res.timed_out,
            limit_exceeded=res.limit_exceeded, oom_killed=res.oom_killed,
            output_truncated=res.output_truncated, cpu_time_ms=res.cpu_time_ms,
            wall_time_ms=res.wall_time_ms, memory_peak_bytes=res.memory_peak_bytes,
            pids_peak=res.pids_peak, error=res.error or protocol.UNSET)

    # --- runExampleCode -----------------------------------------------------------------------

    async def run_examples(self, ctx: Context, sandbox_id: str) -> protocol.RunExamplesResult:
        sem = asyncio.Semaphore(EXAMPLE_CONCURRENCY)

        async def one(lang: Language) -> protocol.ExampleResult:
            if not self.toolchains[lang.id].available:
                return protocol.ExampleResult(language=lang.id, name=lang.name,
                                              available=False, success=False, status=None)
            async with sem:
                try:
                    res = await self.run_code(ctx, protocol.RunCodeParams(
                        sandbox_id=sandbox_id, language=lang.id, code=lang.example))
                except errors.SandboxError as err:
                    return protocol.ExampleResult(language=lang.id, name=lang.name,
                                                  available=True, success=False, status="XX",
                                                  error=err.message)
            expected = lang.expected_example_output
            fields = {f: getattr(res, f) for f in protocol.RunCodeResult.__struct_fields__}
            fields.update(name=lang.name, available=True, expected=expected,
                          success=res.success and res.stdout == expected)
            return protocol.ExampleResult(**fields)

        results = await asyncio.gather(*(one(lang) for lang in self.registry))
        return protocol.RunExamplesResult(results=list(results))


def _merge_limits(base: Limits | None, given: protocol.RunLimits | None, room_memory: int,
                  enforceable: set[str]) -> protocol.RunLimits:
    """Per-language compile limits from the registry — defaults, so only those this host can
    enforce, and memory capped by the room's own limit (the real ceiling) — overridden field by
    field by the caller, whose limits fail closed as in exec."""
    mem = base.memory_bytes if base is not None else None
    out = protocol.RunLimits(
        memory_bytes=None if mem is None or "memoryBytes" not in enforceable
        else min(mem, room_memory),
        wall_time_ms=base.wall_time_ms if base is not None else None,
        cpu_time_ms=base.cpu_time_ms if base is not None and "cpuTimeMs" in enforceable
        else None)
    if given is None:
        return out
    updates = {f: getattr(given, f) for f in given.__struct_fields__
               if getattr(given, f) is not None}
    return msgspec.structs.replace(out, **updates)
