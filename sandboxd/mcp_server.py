"""sandboxctl mcp: sandboxd as a Model Context Protocol server, for AI agents (docs/mcp.md).

Theory of operation. ``sandboxctl mcp`` is one process, a *client* of the daemon like any other
(one :class:`sandboxd.client.AsyncClient` connection; the daemon sees the uid that runs it through
SO_PEERCRED). It speaks MCP on one of two transports, with the official SDK (``mcp`` 2.x, the
optional extra ``sandboxd[mcp]``), and turns each tool call into one or a few daemon calls:

    agent --MCP (stdio, or Streamable HTTP + bearer token)--> sandboxctl mcp --JSON-RPC--> sandboxd

- Every tool's arguments are checked against its JSON Schema here (``jsonschema``) before anything
  is sent: the SDK's low-level server does not, and a model must hear which argument was wrong.
- A failing program is a result (its verdict in ``status``); an error of the daemon (a missing
  room, a limit it cannot enforce) is an MCP tool error (``isError``) whose text starts with the
  daemon's stable error code.
- Outputs are clipped to ``clip_bytes`` per stream, with a marker saying how much was cut and how
  to read the rest: for exec, shell and run_code the whole stream is written to a file in the
  room (read it with read_file's offset and limit); for process_output, the next offset.
- run_code without ``room`` runs in a fresh room that is destroyed afterwards, unless an output
  was clipped: then the room is kept (its id is in the marker) so the file can be read.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jsonschema
import mcp_types as types
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server

from . import errors
from .client import AsyncClient

DEFAULT_CLIP_BYTES = 16 * 1024
#: where exec, shell and run_code leave a clipped stream in full, inside the room
OUTPUT_DIR = "/tmp/sandboxd-mcp"
#: writeFile pieces when the whole output goes back to the room (a request has a size cap)
_WRITE_PIECE = 1 << 20

Args = dict[str, Any]


class ToolError(Exception):
    """A tool call refused before or without the daemon: a bad argument, an unknown tool."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --- JSON Schemas of the arguments ---------------------------------------------------------------

_ROOM = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[A-Za-z0-9_.-]+$",
         "description": "Room (sandbox) id: 1-63 characters of letters, digits, '_', '.', '-'. "
                        "Make one with create_room first; it keeps its files and processes "
                        "until destroy_room."}
_PATH = {"type": "string", "minLength": 1,
         "description": "Path inside the room; relative paths are under /workspace."}
_ENV = {"type": "object", "additionalProperties": {"type": ["string", "null"]},
        "description": "Environment variables to set (null unsets one)."}
_TIMEOUT = {"type": "number", "exclusiveMinimum": 0, "maximum": 86400,
            "description": "Wall-clock limit in seconds; the whole process tree is killed "
                           "when it is reached (verdict TO)."}
_PROCESS_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,63}$",
               "description": "The background process's id (start_process returns it)."}
_RUN_LIMITS = {
    "type": "object", "additionalProperties": False,
    "description": "Limits of this one run; the verdict says which one ended it.",
    "properties": {
        "cpuTimeMs": {"type": "integer", "minimum": 1, "description": "CPU time (TO)."},
        "wallTimeMs": {"type": "integer", "minimum": 1, "description": "Wall time (TO)."},
        "memoryBytes": {"type": "integer", "minimum": 1048576,
                        "description": "Memory, at least 1 MiB (ML)."},
        "pids": {"type": "integer", "minimum": 1, "description": "Processes and threads."},
        "outputBytes": {"type": "integer", "minimum": 0,
                        "description": "stdout+stderr the daemon keeps (OL)."},
        "fileSizeBytes": {"type": "integer", "minimum": 0, "description": "Largest file."},
    },
}
_ROOM_LIMITS = {
    "type": "object", "additionalProperties": False,
    "description": "Limits of the whole room (all its runs together).",
    "properties": {
        "memoryBytes": {"type": "integer", "minimum": 1048576},
        "cpus": {"type": "number", "exclusiveMinimum": 0},
        "pids": {"type": "integer", "minimum": 1},
        "diskBytes": {"type": "integer", "minimum": 1048576,
                      "description": "Size of the room's writable layer."},
    },
}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


_VERDICTS = ("status is the verdict: OK, RE (non-zero exit), SG (killed by a signal), TO (time "
             "limit), ML (memory limit), OL (output limit), XX (the sandbox failed)")

SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "run_code": (
        "Compile (if needed) and run a program in a sandbox, like a contest judge. Returns "
        f"{_VERDICTS}, or CE with the compiler's output in `compile`; also exitCode, stdout, "
        "stderr, cpuTimeMs, wallTimeMs, memoryPeakBytes. Runs in a fresh room that is "
        "destroyed afterwards, unless `room` (an existing room) is given. See list_languages "
        "for the languages.",
        _obj(["language", "code"],
             language={"type": "string", "minLength": 1,
                       "description": "Language id or alias: python, c, cpp, node, ..."},
             code={"type": "string", "description": "The whole source file."},
             stdin={"type": "string", "description": "Standard input of the program."},
             files={"type": "object", "additionalProperties": {"type": "string"},
                    "description": "Extra files beside the source: path -> text content."},
             limits=_RUN_LIMITS,
             room={**_ROOM, "description": "Run in this room (its files stay) instead of a "
                                           "fresh one."})),
    "list_languages": (
        "The languages run_code accepts, their aliases and toolchain versions, and whether "
        "this host has each toolchain.", _obj([])),
    "exec": (
        "Run a program (argv form, no shell) in a room and wait for it. Returns " + _VERDICTS
        + ", exitCode, stdout, stderr and the figures. A non-zero exit is a result, not an "
        "error.",
        _obj(["room", "command"], room=_ROOM,
             command={"type": "string", "minLength": 1,
                      "description": "The program, e.g. python3 or /usr/bin/ls."},
             args={"type": "array", "items": {"type": "string"},
                   "description": "Its arguments."},
             cwd={"type": "string", "description": "Working directory (default /workspace)."},
             env=_ENV, timeout=_TIMEOUT)),
    "shell": (
        "Run a shell command line (/bin/sh -c) in a room and wait for it: pipes, redirections "
        "and && work. Returns the same as exec.",
        _obj(["room", "command"], room=_ROOM,
             command={"type": "string", "minLength": 1, "description": "The command line."},
             timeout=_TIMEOUT)),
    "write_file": (
        "Create or replace a file in a room (parent directories are created).",
        _obj(["room", "path", "content"], room=_ROOM, path=_PATH,
             content={"type": "string", "description": "The file's content."},
             encoding={"enum": ["utf-8", "base64"],
                       "description": "How `content` is encoded (default utf-8 text)."})),
    "read_file": (
        "Read a file in a room: `limit` bytes from byte `offset` (default: from the start, up "
        "to the output clip size). Text comes back as text, binary data as base64. When more "
        "remains, the answer says which offset reads the next part.",
        _obj(["room", "path"], room=_ROOM, path=_PATH,
             offset={"type": "integer", "minimum": 0, "description": "First byte to read."},
             limit={"type": "integer", "minimum": 1, "description": "Bytes to read at most."})),
    "list_files": (
        "List a directory in a room: name, type, size, mode of each entry.",
        _obj(["room", "path"], room=_ROOM, path=_PATH,
             recursive={"type": "boolean", "description": "Descend into subdirectories."})),
    "delete_file": (
        "Delete a file in a room.", _obj(["room", "path"], room=_ROOM, path=_PATH)),
    "create_room": (
        "Create a room (a sandbox: its own processes, files, and no network unless `network` "
        "allows some) with optional limits; a room otherwise is created with the default "
        "limits and no network on first use. Returns its id.",
        _obj([], room={**_ROOM, "description": "The id to give it (default: a new one)."},
             limits=_ROOM_LIMITS,
             network={"type": "object", "additionalProperties": False,
                      "description": "Outbound network access for the room; without it the "
                                     "room has none. Only what `allow` lists is reachable.",
                      "properties": {
                          "allow": {"type": "array", "maxItems": 256, "items": {
                              "type": "string",
                              "description": "NAME[:PORT] (an exact host name, or *.domain "
                                             "for any name below it), IP[:PORT] or "
                                             "CIDR[:PORT]; e.g. pypi.org:443, "
                                             "*.pythonhosted.org:443"}},
                          "hosts": {"type": "object", "additionalProperties": {"type": "string"},
                                    "description": "Host names pinned to IP addresses."},
                          "bandwidthBytesPerSec": {"type": "integer", "minimum": 1024}}})),
    "list_rooms": ("Your rooms and their status.", _obj([])),
    "destroy_room": (
        "Destroy a room: kill its processes and discard its files.", _obj(["room"], room=_ROOM)),
    "start_process": (
        "Start a background process (a server, a watcher) in a room; it keeps running after "
        "the call. Read its output with process_output, stop it with kill_process.",
        _obj(["room", "command"], room=_ROOM,
             command={"type": "string", "minLength": 1, "description": "The program."},
             args={"type": "array", "items": {"type": "string"},
                   "description": "Its arguments (without them `command` is a shell line)."},
             processId={**_PROCESS_ID, "description": "An id to give it (default: a new one)."},
             cwd={"type": "string", "description": "Working directory."}, env=_ENV)),
    "process_output": (
        "A background process's status and its output from byte `offset` of stdout (and "
        "`stderrOffset` of stderr). Pass back the offsets the answer gives to read only what "
        "is new.",
        _obj(["room", "processId"], room=_ROOM, processId=_PROCESS_ID,
             offset={"type": "integer", "minimum": 0, "description": "stdout byte offset."},
             stderrOffset={"type": "integer", "minimum": 0,
                           "description": "stderr byte offset."})),
    "kill_process": (
        "Stop a background process and its children (SIGTERM, then SIGKILL after 2 s).",
        _obj(["room", "processId"], room=_ROOM, processId=_PROCESS_ID,
             signal={"type": ["string", "integer"],
                     "description": "The signal, e.g. SIGINT or 9 (default SIGTERM)."})),
    "expose_port": (
        "Make a TCP port that a process in the room listens on reachable from this machine; "
        "returns the http://127.0.0.1:PORT URL.",
        _obj(["room", "port"], room=_ROOM,
             port={"type": "integer", "minimum": 1, "maximum": 65535},
             name={"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,63}$"})),
    "create_context": (
        "Start a persistent interpreter (Python with ipykernel, JavaScript or TypeScript on "
        "Node) in a room: variables, imports and functions defined by one run_in_context call "
        "are there for the next, as in a notebook. Returns its contextId.",
        _obj(["room"], room=_ROOM,
             language={"type": "string", "enum": ["python", "javascript", "typescript"],
                       "description": "The interpreter (default python)."},
             cwd={"type": "string", "description": "Working directory (default /workspace)."})),
    "run_in_context": (
        "Run a cell of code in a context made by create_context. Returns its printed output, "
        "the value of its last expression, rich results (images come back as images; HTML, "
        "JSON and Markdown as text) and, if the code raised, the error with its traceback "
        "(a normal result, not a tool error). The context keeps its state afterwards, also "
        "after a timeout.",
        _obj(["room", "contextId", "code"], room=_ROOM,
             contextId={"type": "string", "minLength": 1},
             code={"type": "string", "maxLength": 1 << 20},
             timeout={"type": "number", "exclusiveMinimum": 0, "maximum": 3600,
                      "description": "Seconds before the cell is interrupted (default 60)."})),
    "backup_room": (
        "Save a directory of a room (default /workspace) as a backup; returns its backupId.",
        _obj(["room"], room=_ROOM,
             dir={"type": "string", "description": "Directory to save (default /workspace)."},
             name={"type": "string", "description": "A name for the backup."})),
    "restore_room": (
        "Replace a directory's contents (default /workspace) with a backup, in the same room "
        "or another.",
        _obj(["room", "backupId"], room=_ROOM,
             backupId={"type": "string", "minLength": 1},
             dir={"type": "string", "description": "Directory to restore (default /workspace)."})),
}

TOOL_NAMES = tuple(SCHEMAS)
#: the tools whose room must exist already (create_room makes one; destroy_room is idempotent)
NEED_ROOM = frozenset(TOOL_NAMES) - {"create_room", "destroy_room"}

for _name, (_, _schema) in SCHEMAS.items():
    jsonschema.Draft202012Validator.check_schema(_schema)
_VALIDATORS = {name: jsonschema.Draft202012Validator(schema)
               for name, (_, schema) in SCHEMAS.items()}


def validate(name: str, arguments: Args | None) -> Args:
    """The arguments, checked against the tool's schema; ToolError naming the first bad one."""
    if name not in _VALIDATORS:
        raise ToolError("UNKNOWN_TOOL", f"no tool {name!r}; the tools are "
                                        f"{', '.join(TOOL_NAMES)}")
    args = dict(arguments or {})
    error = jsonschema.exceptions.best_match(_VALIDATORS[name].iter_errors(args))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(arguments)"
        raise ToolError("INVALID_ARGUMENT", f"invalid argument {where}: {error.message}")
    return args


# --- output clipping -----------------------------------------------------------------------------


def clip_text(text: str, limit: int) -> tuple[str, int, int]:
    """``text`` cut to at most ``limit`` UTF-8 bytes at a character boundary: (shown, shown
    bytes, total bytes)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text, len(data), len(data)
    shown = data[:limit].decode("utf-8", "ignore")  # drops a character cut in half
    return shown, len(shown.encode("utf-8", "surrogatepass")), len(data)


def _marker(stream: str, shown: int, total: int, how: str) -> str:
    return (f"\n[sandboxd: {stream} clipped: {shown} of {total} bytes shown, "
            f"{total - shown} cut; {how}]")


# --- the tools -----------------------------------------------------------------------------------


@dataclass
class Tools:
    """The tool implementations over one daemon connection."""

    client: AsyncClient
    clip_bytes: int = DEFAULT_CLIP_BYTES

    async def call(self, name: str, arguments: Args | None) -> types.CallToolResult:
        """One tool call -> its MCP result; daemon errors and refused arguments -> isError."""
        try:
            args = validate(name, arguments)
            if "room" in args and name in NEED_ROOM:
                await self._need_room(args["room"])
            handler: Callable[[Args], Awaitable[Any]] = getattr(self, "t_" + name)
            out = await handler(args)
        except ToolError as err:
            return _error(err.code, err.message)
        except errors.SandboxError as err:
            return _error(err.code, err.message, err.context)
        if isinstance(out, types.CallToolResult):
            return out  # (mixed content: run_in_context's images)
        text = out if isinstance(out, str) else json.dumps(out, indent=1, ensure_ascii=False)
        return types.CallToolResult(content=[types.TextContent(text=text)])

    async def _need_room(self, room: str) -> None:
        """The daemon creates a room on first use of its id; a model that misspells one would
        get an empty room and wonder where its files went. Here a room must exist first."""
        rooms = (await self._rpc("listSandboxes", {}))["sandboxes"]
        me = os.geteuid()
        if any(r.get("sandboxId") == room and r.get("owner", me) == me for r in rooms):
            return
        mine = sorted(r["sandboxId"] for r in rooms if r.get("owner", me) == me)
        raise ToolError("SANDBOX_NOT_FOUND",
                        f"room {room!r} does not exist: create it with create_room (your "
                        f"rooms: {', '.join(mine) or 'none'})")

    async def _rpc(self, method: str, params: Args, timeout: float | None = None) -> Any:
        return await self.client.call(method, {k: v for k, v in params.items() if v is not None},
                                      timeout=timeout)

    # -- clipped run outputs

    async def _spill(self, room: str, tag: str, fields: dict[str, Any],
                     streams: tuple[str, ...], prefix: str = "") -> bool:
        """Clip ``fields``' streams in place; the whole of each clipped one goes to a file in
        ``room``. True when a file was left there."""
        clipped = False
        for stream in streams:
            text = fields.get(stream)
            if not isinstance(text, str):
                continue
            shown, nshown, total = clip_text(text, self.clip_bytes)
            if nshown == total:
                continue
            path = f"{OUTPUT_DIR}/{tag}.{prefix}{stream}"
            try:
                await self._write_all(room, path, text)
            except errors.SandboxError as err:
                # The run's result still comes back (it happened); only the rest is lost.
                fields[stream] = shown + _marker(
                    prefix + stream, nshown, total,
                    f"the rest could not be kept in the room: {err.code}: {err.message}")
                fields[stream + "Clipped"] = {"shownBytes": nshown, "totalBytes": total}
                continue
            fields[stream] = shown + _marker(
                prefix + stream, nshown, total,
                f"all of it is in room {room!r} at {path}: read_file with room {room!r}, path "
                f"{path!r}, offset {nshown}")
            fields[stream + "Clipped"] = {"shownBytes": nshown, "totalBytes": total,
                                          "room": room, "path": path}
            clipped = True
        return clipped

    async def _write_all(self, room: str, path: str, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        for at in range(0, max(len(data), 1), _WRITE_PIECE):
            piece = base64.b64encode(data[at:at + _WRITE_PIECE]).decode()
            await self._rpc("writeFile", {"sandboxId": room, "path": path, "content": piece,
                                          "encoding": "base64", "append": at > 0})

    async def _run_result(self, room: str, raw: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        out = {k: v for k, v in raw.items() if k not in ("timestamp", "success")}
        tag = secrets.token_hex(4)
        clipped = await self._spill(room, tag, out, ("stdout", "stderr"))
        if isinstance(out.get("compile"), dict):
            comp = dict(out["compile"])
            clipped |= await self._spill(room, tag, comp, ("stdout", "stderr"), "compile.")
            out["compile"] = comp
        return out, clipped

    # -- code

    async def t_run_code(self, a: Args) -> Any:
        room = a.get("room")
        fresh = room is None
        if room is None:
            room = "mcp-run-" + secrets.token_hex(6)
        keep = not fresh
        try:
            raw = await self._rpc("runCode", {
                "sandboxId": room, "language": a["language"], "code": a["code"],
                "stdin": a.get("stdin"), "files": a.get("files"), "limits": a.get("limits")})
            out, clipped = await self._run_result(room, raw)
            keep |= clipped
        finally:
            if not keep:
                await self._rpc("destroy", {"sandboxId": room})
        out["room"] = room if keep else None
        if fresh and keep:
            out["note"] = (f"the fresh room {room!r} was kept so the clipped output can be "
                           "read; destroy_room it when done")
        return out

    async def t_list_languages(self, a: Args) -> Any:
        return (await self._rpc("listLanguages", {}))["languages"]

    # -- exec

    async def _exec(self, room: str, params: Args, timeout: float | None) -> Any:
        raw = await self._rpc("exec", {
            "sandboxId": room, **params,
            "timeout": max(1, round(timeout * 1000)) if timeout is not None else None},
            # the daemon's own time limit ends the run; this is only a deadline for its answer
            timeout=(timeout + 60) if timeout is not None else None)
        out, _ = await self._run_result(room, raw)
        return out

    async def t_exec(self, a: Args) -> Any:
        return await self._exec(a["room"], {"command": a["command"], "args": a.get("args", []),
                                            "cwd": a.get("cwd"), "env": a.get("env")},
                                a.get("timeout"))

    async def t_shell(self, a: Args) -> Any:
        return await self._exec(a["room"], {"command": a["command"]}, a.get("timeout"))

    # -- files

    async def t_write_file(self, a: Args) -> Any:
        raw = await self._rpc("writeFile", {"sandboxId": a["room"], "path": a["path"],
                                            "content": a["content"],
                                            "encoding": a.get("encoding")})
        return {"path": raw.get("path"), "bytesWritten": raw.get("bytesWritten")}

    async def t_read_file(self, a: Args) -> Any:
        room, path = a["room"], a["path"]
        offset = a.get("offset", 0)
        limit = a.get("limit", self.clip_bytes)
        try:
            raw = await self._rpc("readFile", {"sandboxId": room, "path": path})
            binary = raw.get("encoding") == "base64"
            content = raw.get("content", "")
            whole = base64.b64decode(content) if binary else content.encode("utf-8",
                                                                            "surrogatepass")
            size, piece = len(whole), whole[offset:offset + limit]
        except errors.SandboxError as err:
            if err.code != "FILE_TOO_LARGE":
                raise
            # Over readFile's cap (a spilled 64 MiB output is): stream it, keep only the part
            # asked for.
            window = _Window(offset, limit)
            got = await self.client.sandbox(room).read_file(path, stream=window)
            raw, binary, size, piece = got.raw, bool(got.is_binary), window.seen, window.buf
        if binary:
            shown, nshown = base64.b64encode(bytes(piece)).decode(), len(piece)
        else:
            # Cut at a character boundary: the next offset is where the text shown ends.
            shown = bytes(piece).decode("utf-8", "ignore")
            nshown = len(shown.encode("utf-8", "surrogatepass"))
        end = offset + nshown
        out: dict[str, Any] = {"path": raw.get("path"), "size": size, "offset": offset,
                               "bytesShown": nshown,
                               "encoding": "base64" if binary else "utf-8", "content": shown}
        if end < size:
            out["more"] = (f"{size - end} more bytes: read_file with offset {end} "
                           "for the next part")
        return out

    async def t_list_files(self, a: Args) -> Any:
        raw = await self._rpc("listFiles", {"sandboxId": a["room"], "path": a["path"],
                                            "recursive": a.get("recursive")})
        files = [{k: f.get(k) for k in ("relativePath", "type", "size", "mode")}
                 for f in raw.get("files", [])]
        return {"path": raw.get("path"), "count": raw.get("count"),
                "truncated": raw.get("truncated"), "files": files}

    async def t_delete_file(self, a: Args) -> Any:
        raw = await self._rpc("deleteFile", {"sandboxId": a["room"], "path": a["path"]})
        return {"path": raw.get("path"), "deleted": True}

    # -- rooms

    async def t_create_room(self, a: Args) -> Any:
        room = a.get("room") or "mcp-" + secrets.token_hex(6)
        options = {k: a[k] for k in ("limits", "network") if k in a}
        raw = await self._rpc("getSandbox", {"sandboxId": room, "options": options or None})
        return {"room": raw.get("sandboxId"), "status": raw.get("status"),
                "options": raw.get("options")}

    async def t_list_rooms(self, a: Args) -> Any:
        return (await self._rpc("listSandboxes", {}))["sandboxes"]

    async def t_destroy_room(self, a: Args) -> Any:
        raw = await self._rpc("destroy", {"sandboxId": a["room"]})
        return {"room": raw.get("sandboxId"), "destroyed": raw.get("destroyed")}

    # -- background processes, ports

    async def t_start_process(self, a: Args) -> Any:
        return await self._rpc("startProcess", {
            "sandboxId": a["room"], "command": a["command"], "args": a.get("args"),
            "processId": a.get("processId"), "cwd": a.get("cwd"), "env": a.get("env")})

    async def t_process_output(self, a: Args) -> Any:
        room, pid = a["room"], a["processId"]
        rec = await self._rpc("getProcess", {"sandboxId": room, "processId": pid})
        logs = await self._rpc("getProcessLogs", {
            "sandboxId": room, "processId": pid, "stdoutOffset": a.get("offset", 0),
            "stderrOffset": a.get("stderrOffset", 0)})
        out: dict[str, Any] = {"process": rec, "truncated": logs.get("truncated")}
        for stream, arg, key in (("stdout", "offset", "stdoutOffset"),
                                 ("stderr", "stderrOffset", "stderrOffset")):
            text = logs.get(stream, "")
            shown, nshown, total = clip_text(text, self.clip_bytes)
            # The daemon's offset is where the text it sent ends (it starts later than asked
            # when the ring had dropped bytes): the next read starts where what is shown ends.
            nxt = int(logs.get(key, a.get(arg, 0) + total)) - total + nshown
            if nshown < total:
                shown += _marker(stream, nshown, total,
                                 f"call process_output with {arg} {nxt} for the rest")
            out[stream] = shown
            out["next" + arg[0].upper() + arg[1:]] = nxt
        return out

    async def t_kill_process(self, a: Args) -> Any:
        return await self._rpc("killProcess", {"sandboxId": a["room"],
                                               "processId": a["processId"],
                                               "signal": a.get("signal")})

    async def t_expose_port(self, a: Args) -> Any:
        return await self._rpc("exposePort", {"sandboxId": a["room"], "port": a["port"],
                                              "name": a.get("name")})

    # -- code contexts

    async def t_create_context(self, a: Args) -> Any:
        return await self._rpc("createCodeContext", {"sandboxId": a["room"],
                                                     "language": a.get("language", "python"),
                                                     "cwd": a.get("cwd")})

    async def t_run_in_context(self, a: Args) -> Any:
        timeout = a.get("timeout")
        res = await self._rpc("runInContext", {
            "sandboxId": a["room"], "contextId": a["contextId"], "code": a["code"],
            "timeout": max(1, int(timeout * 1000)) if timeout is not None else None},
            timeout=(timeout or 60) + 60)
        content: list[types.TextContent | types.ImageContent] = []
        logs = res.get("logs") or {}
        for stream in ("stdout", "stderr"):
            text = "".join(logs.get(stream) or [])
            if text:
                shown, nshown, total = clip_text(text, self.clip_bytes)
                if nshown < total:
                    shown += _marker(stream, nshown, total, "print less, or write it to a "
                                     "file and read_file it with an offset")
                content.append(types.TextContent(text=f"[{stream}]\n{shown}"))
        for bundle in res.get("results") or []:
            content += _bundle_content(bundle, self.clip_bytes)
        err = res.get("error")
        if err:
            tb = "\n".join(err.get("traceback") or [])
            shown, nshown, total = clip_text(tb, self.clip_bytes)
            content.append(types.TextContent(
                text=f"[error] {err.get('name')}: {err.get('value')}\n{shown}"))
        content.append(types.TextContent(text=json.dumps(
            {"executionCount": res.get("executionCount"), "error": bool(err)})))
        return types.CallToolResult(content=list(content))

    # -- backups

    async def t_backup_room(self, a: Args) -> Any:
        return await self._rpc("createBackup", {"sandboxId": a["room"], "dir": a.get("dir"),
                                                "name": a.get("name")})

    async def t_restore_room(self, a: Args) -> Any:
        return await self._rpc("restoreBackup", {"sandboxId": a["room"],
                                                 "backupId": a["backupId"], "dir": a.get("dir")})


#: MIME types of a context's result shown as text, in order of preference
_TEXT_MIMES = ("text/markdown", "application/json", "text/html", "image/svg+xml", "text/latex",
               "text/plain")


def _bundle_content(bundle: dict[str, Any],
                    limit: int) -> list[types.TextContent | types.ImageContent]:
    """A MIME bundle as MCP content: its images as ImageContent; its richest text form, and
    its plain text when that is another one (a model reads a repr better than HTML)."""
    out: list[types.TextContent | types.ImageContent] = [
        types.ImageContent(data=bundle[m], mime_type=m) for m in ("image/png", "image/jpeg")
        if isinstance(bundle.get(m), str)]
    present = [m for m in _TEXT_MIMES if bundle.get(m) is not None]
    for mime in dict.fromkeys(present[:1] + [m for m in present if m == "text/plain"]):
        value = bundle[mime]
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        shown, nshown, total = clip_text(text, limit)
        if nshown < total:
            shown += _marker(mime, nshown, total, "display less of it")
        out.append(types.TextContent(text=shown if mime == "text/plain"
                                     else f"[{mime}]\n{shown}"))
    return out


class _Window:
    """A read_file ``stream`` sink keeping bytes [offset, offset + limit) of the stream."""

    def __init__(self, offset: int, limit: int) -> None:
        self.offset, self.limit = offset, limit
        self.seen = 0
        self.buf = bytearray()

    def __call__(self, chunk: bytes) -> None:
        lo = max(self.offset - self.seen, 0)
        hi = min(self.offset + self.limit - self.seen, len(chunk))
        if lo < hi:
            self.buf += chunk[lo:hi]
        self.seen += len(chunk)


def _error(code: str, message: str, context: dict[str, Any] | None = None) -> types.CallToolResult:
    extra = {k: v for k, v in (context or {}).items() if k != "code"}
    text = f"{code}: {message}" + (f" {json.dumps(extra, default=str)}" if extra else "")
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=True)


def tool_list() -> list[types.Tool]:
    return [types.Tool(name=name, description=desc, input_schema=schema)
            for name, (desc, schema) in SCHEMAS.items()]


def build_server(tools: Tools) -> Server[Any]:
    async def list_tools(ctx: ServerRequestContext[Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tool_list())

    async def call_tool(ctx: ServerRequestContext[Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        return await tools.call(params.name, params.arguments)

    from . import __version__

    return Server("sandboxd", version=__version__,
                  instructions="Run untrusted code in local rootless sandboxes (rooms) and get "
                               "judge-grade verdicts. Start with run_code.",
                  get_tool_input_schema=lambda name: SCHEMAS[name][1] if name in SCHEMAS
                  else None,
                  on_list_tools=list_tools, on_call_tool=call_tool)


# --- transports ----------------------------------------------------------------------------------


async def serve_stdio(socket_path: str | None, clip_bytes: int) -> None:
    async with AsyncClient(socket_path) as client:
        server = build_server(Tools(client, clip_bytes))
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class BearerAuth:
    """ASGI wrapper: every HTTP request must carry ``Authorization: Bearer <token>`` (compared
    in constant time), else 401 before the MCP app sees it."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = b"Bearer " + token.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            got = b""
            for key, value in scope.get("headers", []):
                if key.lower() == b"authorization":
                    got = value
            if not hmac.compare_digest(got, self.expected):
                body = b'{"error": "a valid bearer token is required"}'
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def serve_http(socket_path: str | None, clip_bytes: int, host: str, port: int,
                     token: str) -> None:
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(128)  # before the URL is printed: a client may connect at once
    bound = sock.getsockname()[1]
    async with AsyncClient(socket_path) as client:
        server = build_server(Tools(client, clip_bytes))
        # The SDK turns on its DNS-rebinding protection (Host and Origin checked) for these
        # three spellings of loopback only.
        app = server.streamable_http_app(host=host.strip("[]"), streamable_http_path="/mcp")
        config = uvicorn.Config(BearerAuth(app, token), log_level="warning", lifespan="on")
        shown = f"[{host.strip('[]')}]" if family == socket.AF_INET6 else host
        print(f"sandboxctl mcp: serving MCP (Streamable HTTP) at http://{shown}:{bound}/mcp",
              file=sys.stderr, flush=True)
        await uvicorn.Server(config).serve(sockets=[sock])
