"""The wire: newline-delimited JSON-RPC 2.0 over a Unix stream socket, and every method's schema.

Framing: one message per line of UTF-8 JSON (a request, a notification, or a batch array); the
server may interleave responses and notifications (``exec.output``, ``file.chunk``) in any order;
responses match requests by ``id``. This module is shared by the server and the client and imports
nothing of the daemon.

Every method is declared here once, in :data:`METHODS`: its params struct, its result struct and
the notifications it may send during the call (msgspec structs: camelCase on the wire, snake_case
in Python). Unknown params are refused (-32602, naming the field) so that a misspelt option never
silently does nothing; unknown result fields are ignored by the client, so that a newer daemon
never breaks an older client. Adding a method: docs/architecture.md, "The wire".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

import msgspec

from . import errors

JSONRPC = "2.0"
MAX_PATH = 4096

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


def encode(message: Any) -> bytes:
    """One framed message: compact JSON plus the newline."""
    return _encoder.encode(message) + b"\n"


def decode(line: bytes) -> Any:
    try:
        return _decoder.decode(line)
    except msgspec.DecodeError as err:
        raise errors.ParseError(f"parse error: {err}") from err


def response(req_id: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": req_id, "result": result}


def error_response(req_id: Any, err: errors.SandboxError) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "id": req_id, "error": err.to_wire()}


def notification(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": JSONRPC, "method": method, "params": params}


def request(req_id: Any, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": JSONRPC, "id": req_id, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


class Request(msgspec.Struct, frozen=True):
    """A validated envelope. ``id`` is absent (``is_notification``) for notifications."""

    method: str
    params: dict[str, Any]
    id: Any = None
    is_notification: bool = False


def parse_envelope(obj: Any) -> Request:
    """Validate one JSON-RPC request object; raise InvalidRequest with the reason."""
    if not isinstance(obj, dict):
        raise errors.InvalidRequest("a request must be a JSON object")
    if obj.get("jsonrpc") != JSONRPC:
        raise errors.InvalidRequest('"jsonrpc" must be "2.0"')
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise errors.InvalidRequest('"method" must be a non-empty string')
    has_id = "id" in obj
    req_id = obj.get("id")
    bad_id = not (req_id is None or isinstance(req_id, (str, int))) or isinstance(req_id, bool)
    if has_id and bad_id:
        raise errors.InvalidRequest('"id" must be a string, a number or null')
    params = obj.get("params", {})
    if isinstance(params, list):
        if params:
            raise errors.InvalidParams("params must be an object (by-name parameters)")
        params = {}
    if not isinstance(params, dict):
        raise errors.InvalidRequest('"params" must be an object')
    return Request(method=method, params=params, id=req_id, is_notification=not has_id)


# --- the building blocks -------------------------------------------------------------------------

Unset = msgspec.UnsetType
UNSET = msgspec.UNSET
#: A request id as JSON-RPC allows it (the server echoes it in notifications as ``requestId``).
RequestId = str | int | None


class Params(msgspec.Struct, frozen=True, kw_only=True, rename="camel",
              forbid_unknown_fields=True, omit_defaults=True):
    """A method's params. Unknown fields are refused (-32602 naming the field); a field left at
    its default is not sent by the client (``None`` means "not sent")."""




class Result(msgspec.Struct, frozen=True, kw_only=True, rename="camel", dict=True):
    """A method's result. Fields a daemon leaves out are ``UNSET`` there and absent on the wire.

    Decoding ignores unknown fields (a newer daemon never breaks an older client) and keeps the
    wire object as received in :attr:`raw`. Results read as their wire dicts too
    (``result["exitCode"]``, ``result.get("compile")``, ``"sandbox" in result``), which is how
    callers used them before they were typed.
    """

    @classmethod
    def from_wire(cls, raw: Any) -> Self:
        """A decoded JSON result object as this struct (see :func:`convert_result`)."""
        return convert_result(cls.__name__, raw, cls)

    @property
    def raw(self) -> dict[str, Any]:
        """The wire object this result was decoded from (or would be encoded to)."""
        got: dict[str, Any] | None = self.__dict__.get("_raw")
        if got is None:
            got = msgspec.to_builtins(self)
        return got

    def _attr(self, key: str) -> str | None:
        fields = type(self).__struct_fields__
        names = type(self).__struct_encode_fields__
        for name, wire in zip(fields, names, strict=True):
            if wire == key:
                return name
        return None

    def __getitem__(self, key: str) -> Any:
        name = self._attr(key)
        if name is None:
            return self.raw[key]
        value = getattr(self, name)
        if value is UNSET:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key, UNSET) is not UNSET

    def keys(self) -> list[str]:
        """The wire names of the fields present (so ``{**result}`` and ``dict(result)`` work)."""
        return [k for k in self.raw if k in self]


class Notification(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    """A server -> client message without an id, sent during a call and naming it."""

    method: ClassVar[str]
    request_id: RequestId


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS`: what a request carries, what its answer carries, and the
    notifications a call may send before that answer."""

    params: type[Params]
    result: type[Result]
    notifications: tuple[type[Notification], ...] = ()
    summary: str = ""


Path = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATH)]
# Every integer param has an upper bound (issue 23 D10: a 4,000-digit timeout passed validation
# and overflowed in runs.run). The same bounds as config.MAX_MS / MAX_BYTES (this module imports
# nothing of the daemon); the admin's ceilings (config.RunLimitsMax) are checked after these.
MAX_MS = (1 << 31) - 1
MAX_BYTES = 1 << 50
MAX_COUNT = 1 << 22
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)]
Millis = Annotated[int, msgspec.Meta(ge=1, le=MAX_MS)]
ByteCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_BYTES)]
Encoding = Literal["utf-8", "utf8", "base64"]
User = Literal["root", "sandbox"]


# --- rooms: ping, getSandbox, listSandboxes, destroy ----------------------------------------------


class PingParams(Params, frozen=True):
    sandbox_id: str | None = None


class Capabilities(Result, frozen=True):
    """What this daemon offers (``ping``): its isolation, cgroup backend and enforceable limits."""

    namespaces: list[str]
    cgroup: dict[str, Any] | None
    rootfs: str
    id_mapping: str  # "single" | "subordinate"
    id_slices: dict[str, Any]
    seccomp: dict[str, Any]
    limits: list[str]
    #: kernel release and which probed interfaces it lacks (sandboxd.kernel); {} if not probed
    kernel: dict[str, Any] = {}
    #: whether rooms can have a network here and how: {available, mechanism, reason?}
    egress: dict[str, Any] = {}


class PingSandbox(Result, frozen=True):
    sandbox_id: str
    init: bool
    runs: int


class PingResult(Result, frozen=True):
    message: str
    version: str
    capabilities: Capabilities
    sandbox: PingSandbox | Unset = UNSET  # only when the call named a sandbox


class GetSandboxParams(Params, frozen=True):
    sandbox_id: str
    # Kept raw here: fields a client leaves out take the *daemon's* configured defaults, which
    # only rooms.py knows (see rooms.resolve_options).
    options: dict[str, Any] | None = None


class SandboxInfo(Result, frozen=True, omit_defaults=True):
    """A room as ``getSandbox`` and ``listSandboxes`` describe it; a dead room (listed until its
    owner destroys or re-gets it) has ``status`` "dead", its ``reason`` and ``diedAt``. Fields
    a description does not have are None here and absent on the wire (never sent as null)."""

    sandbox_id: str
    status: str
    created_at: str | None = None
    last_activity_at: str | None = None  # listSandboxes
    options: dict[str, Any] | None = None  # getSandbox
    incarnation: int | None = None
    owner: int | None = None  # listSandboxes, for an admin caller
    reason: str | None = None  # dead rooms
    died_at: str | None = None  # dead rooms


class ListSandboxesParams(Params, frozen=True):
    pass


class ListSandboxesResult(Result, frozen=True):
    sandboxes: list[SandboxInfo]


class DestroyParams(Params, frozen=True):
    sandbox_id: str


class DestroyResult(Result, frozen=True):
    sandbox_id: str
    destroyed: bool


# --- exec ----------------------------------------------------------------------------------------


class RunLimits(Params, frozen=True):
    """Per-run limits (issue "Limits"): each run gets its own child cgroup of the room."""

    cpu_time_ms: Millis | None = None
    wall_time_ms: Millis | None = None
    memory_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=MAX_BYTES)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)] | None = None
    output_bytes: ByteCount | None = None
    file_size_bytes: ByteCount | None = None


#: 1-63 characters of [A-Za-z0-9_.-] (a generated one when createSession names none)
SessionId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,63}$")]


class ExecParams(Params, frozen=True):
    sandbox_id: str
    command: Annotated[str, msgspec.Meta(min_length=1, max_length=1 << 20)]
    args: list[str] | None = None
    cwd: Path | None = None
    # A null value unsets the variable (the default environment's too): Cloudflare's semantics.
    env: dict[str, str | None] | None = None
    stdin: str | None = None
    timeout: Millis | None = None
    stream: bool = False
    limits: RunLimits | None = None
    user: User = "root"
    #: run the line (shell form only) in this session's shell (createSession): its cwd,
    #: variables, functions and aliases, and what the line changes of them kept for the next
    session_id: SessionId | None = None


class ExecOutput(Notification, frozen=True):
    """A chunk of a streamed run's output (``exec`` and ``runCode`` with ``stream``)."""

    method: ClassVar[str] = "exec.output"
    stream: Literal["stdout", "stderr"]
    data: str


class RunReport(Result, frozen=True):
    """The limits report of one run (docs/limits.md). ``status``: OK RE SG TO ML OL XX."""

    status: str | None = None
    exit_code: int = -1
    signal: str | int | None = None  # "SIGKILL" (a daemon once sent the number)
    timed_out: bool = False
    limit_exceeded: str | None = None
    oom_killed: bool = False
    output_truncated: bool = False
    cpu_time_ms: int | None = None
    wall_time_ms: int | None = None
    memory_peak_bytes: int | None = None
    pids_peak: int | None = None
    error: str | Unset = UNSET  # why the sandbox failed (status XX)


class ExecResult(RunReport, frozen=True):
    """The result of ``exec``. A non-zero exit is a result, not an error. ``duration`` is the
    wall time in milliseconds; fields an older daemon does not send keep their defaults."""

    success: bool = False
    stdout: str = ""
    stderr: str = ""
    command: str = ""
    duration: float = 0
    timestamp: str = ""
    #: with sessionId: true when the line exited the session's shell (``exit 3``); the session
    #: is gone (the next call gets SESSION_NOT_FOUND)
    session_ended: bool | Unset = UNSET


# --- background processes (docs/processes.md) ----------------------------------------------------

#: 1-63 characters of [A-Za-z0-9_.-] (a generated one when startProcess names none)
ProcessId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,63}$")]


class StartProcessParams(Params, frozen=True):
    sandbox_id: str
    command: Annotated[str, msgspec.Meta(min_length=1, max_length=1 << 20)]
    args: list[str] | None = None
    process_id: ProcessId | None = None
    cwd: Path | None = None
    env: dict[str, str | None] | None = None  # as exec's: null unsets
    user: User = "root"
    limits: RunLimits | None = None
    #: start from this session's cwd, variables, functions and aliases (createSession)
    session_id: SessionId | None = None


class ProcessInfo(Result, frozen=True):
    """One process record (startProcess, getProcess, listProcesses, killProcess, the answer
    of streamProcessLogs). ``status``: running, completed (exit 0), failed (another exit),
    killed (killProcess, killAllProcesses, a limit, the room going), error (could not start).
    Once it ended: ``endedAt``, ``exitCode``, ``signal`` and exec's report, its verdict as
    ``verdict`` (OK RE SG TO ML OL XX)."""

    process_id: str
    pid: int
    command: str
    status: str
    started_at: str
    ended_at: str | Unset = UNSET
    exit_code: int | Unset = UNSET
    signal: str | Unset | None = UNSET
    verdict: str | Unset = UNSET
    timed_out: bool | Unset = UNSET
    limit_exceeded: str | Unset | None = UNSET
    oom_killed: bool | Unset = UNSET
    output_truncated: bool | Unset = UNSET
    cpu_time_ms: int | Unset | None = UNSET
    wall_time_ms: int | Unset | None = UNSET
    memory_peak_bytes: int | Unset | None = UNSET
    pids_peak: int | Unset | None = UNSET
    error: str | Unset = UNSET


class ProcessParams(Params, frozen=True):
    sandbox_id: str
    process_id: ProcessId


class ListProcessesParams(Params, frozen=True):
    sandbox_id: str


class ListProcessesResult(Result, frozen=True):
    processes: list[ProcessInfo]


class ProcessLogsParams(Params, frozen=True):
    """Offsets are absolute byte positions in each stream (0: its first byte ever)."""

    sandbox_id: str
    process_id: ProcessId
    stdout_offset: NonNegInt | None = None
    stderr_offset: NonNegInt | None = None


class ProcessLogs(Result, frozen=True):
    """What each stream's ring holds from the offsets asked for; pass the offsets back to read
    only what is new. ``truncated``: bytes at or after an asked offset had been dropped."""

    stdout: str
    stderr: str
    stdout_offset: int
    stderr_offset: int
    truncated: bool


class ProcessOutput(Notification, frozen=True):
    """A chunk of a streamed process's output (streamProcessLogs)."""

    method: ClassVar[str] = "process.output"
    process_id: str
    stream: Literal["stdout", "stderr"]
    data: str


class KillProcessParams(Params, frozen=True):
    sandbox_id: str
    process_id: ProcessId
    #: a number or a name ("SIGTERM", "TERM"); default SIGTERM
    signal: Annotated[int, msgspec.Meta(ge=1, le=64)] | str | None = None


class KillAllProcessesParams(Params, frozen=True):
    sandbox_id: str


class KillAllProcessesResult(Result, frozen=True):
    killed: int


class WaitForLogParams(Params, frozen=True):
    sandbox_id: str
    process_id: ProcessId
    pattern: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    regex: bool = False
    timeout: Millis | None = None


class WaitForLogResult(Result, frozen=True):
    line: str


# --- files ---------------------------------------------------------------------------------------


class WriteFileParams(Params, frozen=True):
    sandbox_id: str
    path: str
    content: str
    encoding: Encoding | None = None
    append: bool = False  # add to the end instead of replacing (chunked uploads, `cp`)


class WriteFileResult(Result, frozen=True):
    success: bool
    path: str
    bytes_written: int
    timestamp: str


class ReadFileParams(Params, frozen=True):
    sandbox_id: str
    path: str
    encoding: Encoding | None = None
    stream: bool = False


class FileChunk(Notification, frozen=True):
    """One piece of a streamed ``readFile``, at ``offset`` bytes into the file."""

    method: ClassVar[str] = "file.chunk"
    data: str
    encoding: Literal["utf-8", "base64"]
    offset: int


class ReadFileResult(Result, frozen=True):
    """``content`` is the file (empty after a streamed read, which says ``stream`` and how many
    ``chunks`` it sent); ``isBinary`` tells a file that is not UTF-8 (whole reads only)."""

    success: bool = True
    path: str = ""
    content: str = ""
    encoding: str = ""
    is_binary: bool | Unset = UNSET
    stream: bool | Unset = UNSET
    chunks: int | Unset = UNSET
    size: int = 0
    mime_type: str = ""
    timestamp: str = ""


class PathParams(Params, frozen=True):
    sandbox_id: str
    path: str


class DeleteFileResult(Result, frozen=True):
    success: bool
    path: str
    timestamp: str


class RenameFileParams(Params, frozen=True):
    sandbox_id: str
    old_path: str
    new_path: str


class MoveFileParams(Params, frozen=True):
    sandbox_id: str
    source_path: str
    destination_path: str


class RenameResult(Result, frozen=True):
    success: bool
    path: str
    new_path: str
    timestamp: str


class MkdirParams(Params, frozen=True):
    sandbox_id: str
    path: str
    recursive: bool = False


class MkdirResult(Result, frozen=True):
    success: bool
    path: str
    recursive: bool
    timestamp: str


class ExistsResult(Result, frozen=True):
    success: bool
    path: str
    exists: bool
    type: str | None  # file, directory, symlink, other; null when it does not exist


class ListFilesParams(Params, frozen=True):
    sandbox_id: str
    path: str = "/workspace"
    recursive: bool = False
    include_hidden: bool = False


class FileInfo(Result, frozen=True):
    """One entry of ``listFiles``; ``type`` is file, directory, symlink or other. A name that is
    not UTF-8 is shown with U+FFFD and sent exactly in ``nameBase64`` (``relativePathBase64``)."""

    name: str = ""
    absolute_path: str = ""
    relative_path: str = ""
    type: str = ""
    size: int = 0
    modified_at: str = ""
    mode: str = ""
    name_base64: str | Unset = UNSET
    relative_path_base64: str | Unset = UNSET


class ListFilesResult(Result, frozen=True):
    success: bool
    path: str
    count: int
    files: list[FileInfo]
    truncated: bool
    timestamp: str


# --- git -----------------------------------------------------------------------------------------


class GitCheckoutParams(Params, frozen=True):
    sandbox_id: str
    repo_url: str
    branch: str | None = None
    target_dir: str | None = None
    depth: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)] | None = None
    timeout: Millis | None = None


class GitCheckoutResult(Result, frozen=True):
    success: bool
    repo_url: str
    branch: str
    target_dir: str


# --- code: runCode, runExampleCode, listLanguages -------------------------------------------------


class RunCodeParams(Params, frozen=True):
    sandbox_id: str
    language: str
    code: str
    stdin: str | None = None
    args: list[str] | None = None
    files: dict[str, str] | None = None
    limits: RunLimits | None = None
    compile_limits: RunLimits | None = None
    user: User = "root"
    stream: bool = False


class CompileReport(Result, frozen=True):
    status: str
    exit_code: int
    stdout: str
    stderr: str
    cpu_time_ms: int | None
    wall_time_ms: int | None
    memory_peak_bytes: int | None
    timed_out: bool
    oom_killed: bool


class RunCodeResult(Result, frozen=True):
    """``status`` CE (the compile failed: its report in ``compile``, nothing ran; the run fields
    other than the figures are then absent) or the run's verdict with its whole report."""

    success: bool
    language: str
    exit_code: int
    stdout: str
    stderr: str
    compile: CompileReport | None
    cached: bool
    status: str | None
    cpu_time_ms: int | None
    wall_time_ms: int | None
    memory_peak_bytes: int | None
    signal: str | Unset | None = UNSET
    timed_out: bool | Unset = UNSET
    limit_exceeded: str | Unset | None = UNSET
    oom_killed: bool | Unset = UNSET
    output_truncated: bool | Unset = UNSET
    pids_peak: int | Unset | None = UNSET
    error: str | Unset = UNSET


class RunExamplesParams(Params, frozen=True):
    sandbox_id: str


class ExampleResult(Result, frozen=True):
    """One language's hello world: its runCode result with ``name``, ``available`` and the
    ``expected`` output; only the first five fields for a language without a toolchain (and
    ``error`` when the sandbox failed)."""

    language: str
    name: str
    available: bool
    success: bool
    status: str | None
    error: str | Unset = UNSET
    expected: str | Unset = UNSET
    exit_code: int | Unset = UNSET
    stdout: str | Unset = UNSET
    stderr: str | Unset = UNSET
    compile: CompileReport | Unset | None = UNSET
    cached: bool | Unset = UNSET
    cpu_time_ms: int | Unset | None = UNSET
    wall_time_ms: int | Unset | None = UNSET
    memory_peak_bytes: int | Unset | None = UNSET
    signal: str | Unset | None = UNSET
    timed_out: bool | Unset = UNSET
    limit_exceeded: str | Unset | None = UNSET
    oom_killed: bool | Unset = UNSET
    output_truncated: bool | Unset = UNSET
    pids_peak: int | Unset | None = UNSET


class RunExamplesResult(Result, frozen=True):
    results: list[ExampleResult]


class ListLanguagesParams(Params, frozen=True):
    pass


class LanguageInfo(Result, frozen=True):
    id: str
    name: str
    aliases: list[str]
    extension: str
    compiled: bool
    version: str | None
    available: bool


class ListLanguagesResult(Result, frozen=True):
    languages: list[LanguageInfo]


# --- stats ---------------------------------------------------------------------------------------


class StatsParams(Params, frozen=True):
    sandbox_id: str | None = None


class RoomUsage(Result, frozen=True):
    """Live figures of a room's cgroup; null when the backend cannot tell, all absent when the
    room is being torn down under the call."""

    cpu_time_ms: int | Unset | None = UNSET
    memory_peak_bytes: int | Unset | None = UNSET
    memory_current_bytes: int | Unset | None = UNSET
    pids_current: int | Unset | None = UNSET
    pids_peak: int | Unset | None = UNSET
    oom_kills: int | Unset | None = UNSET


class NetworkStats(Result, frozen=True):
    """A room's egress counters (docs/network.md): bytes to and from the outside, connections
    forwarded, connections and DNS queries refused."""

    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0
    refused: int = 0


class RoomStats(Result, frozen=True):
    sandbox_id: str
    status: str
    active_runs: int
    limits: dict[str, Any]
    usage: RoomUsage
    network: NetworkStats | Unset = UNSET  # rooms with a network option


class StatsResult(Result, frozen=True):
    backend: str | None
    sandboxes: list[RoomStats]


# --- ports: waitForPort, exposePort, unexposePort, getExposedPorts (docs/ports.md) ---------------

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PortName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,63}$")]


class WaitForPortParams(Params, frozen=True):
    sandbox_id: str
    port: Port
    process_id: str | None = None  # PROCESS_EXITED_BEFORE_READY if it ends first
    mode: Literal["tcp", "http"] = "tcp"
    path: Annotated[str, msgspec.Meta(pattern=r"^/[\x21-\x7e]{0,2047}$")] = "/"  # http mode
    timeout: Millis | None = None  # ms; default ports.WAIT_TIMEOUT_MS


class WaitForPortResult(Result, frozen=True):
    ready: bool
    port: int | Unset = UNSET
    status: int | Unset = UNSET  # http mode: the status of the GET that succeeded


class ExposePortParams(Params, frozen=True):
    sandbox_id: str
    port: Port
    name: PortName | None = None  # default: the port number
    #: a Unix socket served to the caller's uid only (``path``) instead of a loopback TCP port
    unix_socket: bool = False


class ExposedPort(Result, frozen=True):
    """An exposed port: ``url`` for a loopback TCP exposure, ``path`` for a Unix socket."""

    port: int
    name: str
    url: str | Unset = UNSET
    path: str | Unset = UNSET


class UnexposePortParams(Params, frozen=True):
    sandbox_id: str
    port: Port


class UnexposePortResult(Result, frozen=True):
    port: int
    unexposed: bool  # false: it was not exposed (idempotent)


class GetExposedPortsParams(Params, frozen=True):
    sandbox_id: str


class GetExposedPortsResult(Result, frozen=True):
    ports: list[ExposedPort]


# --- persistence: backups, fork, export/import ----------------------------------------------------

BackupId = Annotated[str, msgspec.Meta(max_length=80)]
Glob = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class CreateBackupParams(Params, frozen=True):
    sandbox_id: str
    dir: str | None = None  # default /workspace
    name: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    excludes: Annotated[list[Glob], msgspec.Meta(max_length=256)] | None = None
    ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] | None = None


class BackupInfo(Result, frozen=True):
    backup_id: str
    sandbox_id: str
    dir: str
    name: str
    size_bytes: int
    created_at: str
    sha256: str = ""
    expires_at: str | Unset = UNSET


class RestoreBackupParams(Params, frozen=True):
    sandbox_id: str
    backup_id: BackupId
    dir: str | None = None  # default: the directory the backup was made of


class RestoreBackupResult(Result, frozen=True):
    sandbox_id: str
    dir: str
    backup_id: str


class ListBackupsParams(Params, frozen=True):
    sandbox_id: str | None = None


class ListBackupsResult(Result, frozen=True):
    backups: list[BackupInfo]


class DeleteBackupParams(Params, frozen=True):
    backup_id: BackupId


class DeleteBackupResult(Result, frozen=True):
    backup_id: str
    deleted: bool  # false: there was no such backup (idempotent)


class ForkSandboxParams(Params, frozen=True):
    sandbox_id: str
    new_sandbox_id: str


class ForkSandboxResult(Result, frozen=True):
    sandbox_id: str
    new_sandbox_id: str


class ExportSandboxParams(Params, frozen=True):
    sandbox_id: str
    dir: str | None = None  # default /workspace
    excludes: Annotated[list[Glob], msgspec.Meta(max_length=256)] | None = None


class ExportChunk(Notification, frozen=True):
    """A piece (base64) of the gzip'd tar ``exportSandbox`` streams, ``offset`` bytes in."""

    method: ClassVar[str] = "export.chunk"
    data: str
    offset: int


class ExportSandboxResult(Result, frozen=True):
    sandbox_id: str
    dir: str
    size_bytes: int
    sha256: str
    chunks: int


class ImportSandboxParams(Params, frozen=True):
    """One piece of a gzip'd tar (base64): the first with ``append`` false, the last with
    ``final`` true (a whole archive in one call: both defaults)."""

    sandbox_id: str
    data: str
    dir: str | None = None  # default /workspace
    append: bool = False
    final: bool = True


class ImportSandboxResult(Result, frozen=True):
    sandbox_id: str
    dir: str
    size_bytes: int  # received so far; the archive's size once final
    imported: bool  # true once the archive was unpacked (the final piece)
    sha256: str | Unset = UNSET
# --- terminals (issue 15, docs/interactive.md) -------------------------------------------------

#: a terminal's width or height in cells
TermSize = Annotated[int, msgspec.Meta(ge=1, le=1000)]
#: "term-" and 12 hex digits, made by openTerminal
TerminalId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
#: one writeTerminal: at most this many bytes (before base64)
MAX_TERMINAL_WRITE = 1 << 20


class OpenTerminalParams(Params, frozen=True):
    sandbox_id: str
    cols: TermSize = 80
    rows: TermSize = 24
    #: default: the room's login shell (bash -l if the tree has bash, else sh -l)
    command: Annotated[str, msgspec.Meta(min_length=1, max_length=1 << 20)] | None = None
    args: list[str] | None = None
    cwd: Path | None = None
    env: dict[str, str | None] | None = None  # as exec's: null unsets
    user: User = "root"
    #: the shell starts from this session's cwd, variables, functions and aliases
    session_id: SessionId | None = None


class OpenTerminalResult(Result, frozen=True):
    terminal_id: str
    pid: int | Unset = UNSET
    tty: str | Unset = UNSET  # the slave's path in the room, /dev/pts/N


class TerminalOutput(Notification, frozen=True):
    """Bytes the program wrote to its terminal (``data``: base64), to the connection that
    opened or last attached it; ``requestId`` is that openTerminal's or attachTerminal's."""

    method: ClassVar[str] = "terminal.output"
    terminal_id: str
    data: str


class TerminalExit(Notification, frozen=True):
    """The terminal's program ended (after its last output)."""

    method: ClassVar[str] = "terminal.exit"
    terminal_id: str
    exit_code: int
    signal: str | None = None


class TerminalParams(Params, frozen=True):
    terminal_id: TerminalId


class WriteTerminalParams(Params, frozen=True):
    terminal_id: TerminalId
    data: Annotated[str, msgspec.Meta(max_length=(MAX_TERMINAL_WRITE * 4) // 3 + 4)]


class WriteTerminalResult(Result, frozen=True):
    written: int


class ResizeTerminalParams(Params, frozen=True):
    terminal_id: TerminalId
    cols: TermSize
    rows: TermSize


class TerminalInfo(Result, frozen=True):
    """A terminal: ``status`` running or exited (then ``exitCode``, ``signal``)."""

    terminal_id: str
    sandbox_id: str
    pid: int
    tty: str
    command: str
    cols: int
    rows: int
    status: str
    attached: bool
    created_at: str
    exit_code: int | Unset = UNSET
    signal: str | Unset | None = UNSET


class ListTerminalsParams(Params, frozen=True):
    sandbox_id: str


class ListTerminalsResult(Result, frozen=True):
    terminals: list[TerminalInfo]


# --- sessions (docs/interactive.md) -------------------------------------------------------------


class CreateSessionParams(Params, frozen=True):
    sandbox_id: str
    session_id: SessionId | None = None
    cwd: Path | None = None  # default /workspace
    env: dict[str, str | None] | None = None  # over the room's; null unsets


class SessionInfo(Result, frozen=True):
    """A session: ``busy`` while a call runs in it."""

    session_id: str
    sandbox_id: str
    created_at: str
    busy: bool = False
    calls: int = 0


class SessionParams(Params, frozen=True):
    sandbox_id: str
    session_id: SessionId


class ListSessionsParams(Params, frozen=True):
    sandbox_id: str


class ListSessionsResult(Result, frozen=True):
    sessions: list[SessionInfo]


# --- code interpreter contexts (docs/contexts.md) -----------------------------------------------

#: 1-63 characters of [A-Za-z0-9_.-]
ContextId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,63}$")]
#: one cell's source: at most 1 MiB
MAX_CELL_CHARS = 1 << 20


class ContextLimits(Params, frozen=True):
    memory_bytes: ByteCount | None = None  # the kernel process's (default: the room's)
    cpu_time_ms: Millis | None = None  # per cell: then interrupted, like a timeout


class CreateCodeContextParams(Params, frozen=True):
    sandbox_id: str
    #: python, javascript or typescript (anything else: UNSUPPORTED_LANGUAGE)
    language: Annotated[str, msgspec.Meta(max_length=64)] = "python"
    cwd: Path | None = None  # default /workspace
    env: dict[str, str | None] | None = None  # over the room's; null unsets
    limits: ContextLimits | None = None


class CodeContextInfo(Result, frozen=True):
    """A context: ``status`` is ready (a kernel waits), busy (a cell runs) or stopped (its
    kernel is gone: the next cell starts a fresh one)."""

    context_id: str
    sandbox_id: str
    language: str
    cwd: str
    created_at: str
    status: str = "ready"
    executions: int = 0


class ContextParams(Params, frozen=True):
    sandbox_id: str
    context_id: ContextId


class ListCodeContextsParams(Params, frozen=True):
    sandbox_id: str


class ListCodeContextsResult(Result, frozen=True):
    contexts: list[CodeContextInfo]


class RunInContextParams(Params, frozen=True):
    sandbox_id: str
    context_id: ContextId
    code: Annotated[str, msgspec.Meta(max_length=MAX_CELL_CHARS)]
    timeout: Millis | None = None  # ms (default: the daemon's context_cell_timeout_ms)
    stream: bool = False  # context.output / context.result notifications as they happen


class ContextLogs(Result, frozen=True):
    stdout: list[str]
    stderr: list[str]


class ContextError(Result, frozen=True):
    """The user's code failed (never an RPC error): the exception's class name (or
    ``ContextRestarted``, ``MemoryLimitExceeded``), its message and the traceback lines."""

    name: str
    value: str
    traceback: list[str]


class RunInContextResult(Result, frozen=True):
    #: MIME bundles: {"text/plain": ..., "image/png": base64, ...}, display calls in order and
    #: the value of the cell's last expression
    results: list[dict[str, Any]]
    logs: ContextLogs
    execution_count: int | None
    error: ContextError | Unset = UNSET


class ContextOutput(Notification, frozen=True):
    method: ClassVar[str] = "context.output"
    context_id: str
    stream: str  # stdout | stderr
    text: str


class ContextResult(Notification, frozen=True):
    method: ClassVar[str] = "context.result"
    context_id: str
    result: dict[str, Any]


# --- file watch (docs/interactive.md) -----------------------------------------------------------

WatchGlob = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
WatchId = Annotated[str, msgspec.Meta(pattern=r"^w-[0-9a-f]{1,32}$")]


class WatchParams(Params, frozen=True):
    sandbox_id: str
    path: Path
    recursive: bool = True
    #: globs on the path relative to ``path`` (``*.py``, ``src/**``) or on the file's name;
    #: none: every file
    include: Annotated[list[WatchGlob], msgspec.Meta(max_length=64)] | None = None
    #: globs on any component of the path below ``path``; default ``.git``, ``node_modules``
    exclude: Annotated[list[WatchGlob], msgspec.Meta(max_length=64)] | None = None


class WatchResult(Result, frozen=True):
    watch_id: str
    path: str
    directories: int  # watched now (more as they are made, when recursive)
    truncated: bool = False  # max_watch_dirs or the room's inotify ceiling was reached


class WatchEvent(Notification, frozen=True):
    """A change under a watch, to the connection that made it (``requestId``: the watch's).
    ``eventType``: create, modify, delete, move_from, move_to, attrib, or overflow (``dropped``
    events were not sent: the client read too slowly, or the kernel's queue overflowed)."""

    method: ClassVar[str] = "watch.event"
    watch_id: str
    event_type: str
    path: str
    is_directory: bool = False
    dropped: int | Unset = UNSET


class UnwatchParams(Params, frozen=True):
    sandbox_id: str
    watch_id: WatchId


class UnwatchResult(Result, frozen=True):
    watch_id: str
    unwatched: bool
    events: int = 0  # sent in all
    dropped: int = 0


# --- network egress (docs/network.md) -----------------------------------------------------------


class NetworkOptions(Params, frozen=True):
    """A room's egress policy (docs/network.md; parsed and checked by ``netpolicy.parse``):
    params of getSandbox's options and of setNetworkPolicy."""

    allow: Annotated[list[Annotated[str, msgspec.Meta(max_length=300)]],
                     msgspec.Meta(max_length=256)] = []
    hosts: Annotated[dict[str, str], msgspec.Meta(max_length=256)] = {}
    bandwidth_bytes_per_sec: Annotated[int, msgspec.Meta(ge=1024)] | None = None



class SetNetworkPolicyParams(Params, frozen=True):
    sandbox_id: str
    #: the room's new ``network`` option; null cuts it off and closes its connections
    network: NetworkOptions | None


class NetworkPolicyResult(Result, frozen=True):
    sandbox_id: str
    network: NetworkOptions | None


class GetNetworkLogParams(Params, frozen=True):
    sandbox_id: str
    limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None


class NetworkLogEntry(Result, frozen=True):
    time: str
    protocol: str  # tcp | dns
    address: str
    port: int
    allowed: bool
    name: str | None = None
    reason: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0


class NetworkLogResult(Result, frozen=True):
    entries: list[NetworkLogEntry]
    stats: NetworkStats


# --- the table -----------------------------------------------------------------------------------

#: Every wire method: the server decodes params and encodes results from here, the client builds
#: params and decodes results from here, and tests check the handlers and the docs against it.
METHODS: dict[str, Method] = {
    "ping": Method(PingParams, PingResult, summary="version, capabilities; a room's init"),
    "getSandbox": Method(GetSandboxParams, SandboxInfo, summary="get or create a room"),
    "listSandboxes": Method(ListSandboxesParams, ListSandboxesResult,
                            summary="the caller's rooms (dead ones too)"),
    "destroy": Method(DestroyParams, DestroyResult, summary="tear a room down"),
    "exec": Method(ExecParams, ExecResult, (ExecOutput,),
                   summary="run a command (argv or shell), optionally streamed"),
    "writeFile": Method(WriteFileParams, WriteFileResult, summary="write or append a file"),
    "readFile": Method(ReadFileParams, ReadFileResult, (FileChunk,),
                       summary="read a file, or stream it in chunks"),
    "deleteFile": Method(PathParams, DeleteFileResult, summary="delete a file"),
    "renameFile": Method(RenameFileParams, RenameResult, summary="rename a file or directory"),
    "moveFile": Method(MoveFileParams, RenameResult, summary="move into a directory"),
    "mkdir": Method(MkdirParams, MkdirResult, summary="make a directory"),
    "listFiles": Method(ListFilesParams, ListFilesResult, summary="list a directory"),
    "exists": Method(PathParams, ExistsResult, summary="whether a path exists, and its type"),
    "gitCheckout": Method(GitCheckoutParams, GitCheckoutResult,
                          summary="git clone inside the room"),
    "runCode": Method(RunCodeParams, RunCodeResult, (ExecOutput,),
                      summary="compile (cached) and run a program"),
    "runExampleCode": Method(RunExamplesParams, RunExamplesResult,
                             summary="a hello world in every language"),
    "listLanguages": Method(ListLanguagesParams, ListLanguagesResult,
                            summary="the languages and their toolchains"),
    "stats": Method(StatsParams, StatsResult, summary="live usage of the caller's rooms"),
    "startProcess": Method(StartProcessParams, ProcessInfo,
                           summary="start a background process"),
    "getProcess": Method(ProcessParams, ProcessInfo, summary="a process's record"),
    "listProcesses": Method(ListProcessesParams, ListProcessesResult,
                            summary="the room's processes, running and ended"),
    "getProcessLogs": Method(ProcessLogsParams, ProcessLogs,
                             summary="a process's output from byte offsets"),
    "streamProcessLogs": Method(ProcessLogsParams, ProcessInfo, (ProcessOutput,),
                                summary="replay, then follow a process's output"),
    "killProcess": Method(KillProcessParams, ProcessInfo,
                          summary="signal a process's whole tree, then kill it"),
    "killAllProcesses": Method(KillAllProcessesParams, KillAllProcessesResult,
                               summary="kill every live process of the room"),
    "waitForLog": Method(WaitForLogParams, WaitForLogResult,
                         summary="wait for a line of a process's output"),
    "waitForPort": Method(WaitForPortParams, WaitForPortResult,
                          summary="wait until a port in the room accepts (or answers HTTP)"),
    "exposePort": Method(ExposePortParams, ExposedPort,
                         summary="forward a host loopback port (or a Unix socket) into the room"),
    "unexposePort": Method(UnexposePortParams, UnexposePortResult,
                           summary="stop forwarding a port (idempotent)"),
    "getExposedPorts": Method(GetExposedPortsParams, GetExposedPortsResult,
                              summary="the room's exposed ports"),
    "createBackup": Method(CreateBackupParams, BackupInfo,
                           summary="a consistent archive of a directory, kept by the daemon"),
    "restoreBackup": Method(RestoreBackupParams, RestoreBackupResult,
                            summary="replace a directory with a backup's contents"),
    "listBackups": Method(ListBackupsParams, ListBackupsResult, summary="your backups"),
    "deleteBackup": Method(DeleteBackupParams, DeleteBackupResult,
                           summary="delete a backup (idempotent)"),
    "forkSandbox": Method(ForkSandboxParams, ForkSandboxResult,
                          summary="a new room with a copy of a room's writable layer"),
    "exportSandbox": Method(ExportSandboxParams, ExportSandboxResult, (ExportChunk,),
                            summary="stream a directory as a gzip'd tar"),
    "importSandbox": Method(ImportSandboxParams, ImportSandboxResult,
                            summary="unpack a gzip'd tar (chunked) into a directory"),
    "openTerminal": Method(OpenTerminalParams, OpenTerminalResult,
                           (TerminalOutput, TerminalExit),
                           summary="a pty in the room running a shell or a program"),
    "writeTerminal": Method(WriteTerminalParams, WriteTerminalResult,
                            summary="input (base64) to a terminal's program"),
    "resizeTerminal": Method(ResizeTerminalParams, TerminalInfo,
                             summary="a terminal's window size (the program gets SIGWINCH)"),
    "closeTerminal": Method(TerminalParams, TerminalInfo,
                            summary="hang up a terminal: its whole tree is killed"),
    "attachTerminal": Method(TerminalParams, TerminalInfo, (TerminalOutput, TerminalExit),
                             summary="take over a terminal's output (the last 256 KiB first)"),
    "listTerminals": Method(ListTerminalsParams, ListTerminalsResult,
                            summary="the room's terminals"),
    "createSession": Method(CreateSessionParams, SessionInfo,
                            summary="a persistent shell: cwd, variables, functions kept"),
    "deleteSession": Method(SessionParams, SessionInfo, summary="end a session"),
    "listSessions": Method(ListSessionsParams, ListSessionsResult,
                           summary="the room's sessions"),
    "createCodeContext": Method(CreateCodeContextParams, CodeContextInfo,
                                summary="a persistent Python/JavaScript/TypeScript kernel"),
    "runInContext": Method(RunInContextParams, RunInContextResult, (ContextOutput, ContextResult),
                           summary="run a cell in a context: rich results, logs, error"),
    "listCodeContexts": Method(ListCodeContextsParams, ListCodeContextsResult,
                               summary="the room's code contexts"),
    "deleteCodeContext": Method(ContextParams, CodeContextInfo,
                                summary="end a context (its kernel is killed)"),
    "restartCodeContext": Method(ContextParams, CodeContextInfo,
                                 summary="a fresh kernel, same context id"),
    "interruptCodeContext": Method(ContextParams, CodeContextInfo,
                                   summary="interrupt the running cell (KeyboardInterrupt)"),
    "setNetworkPolicy": Method(SetNetworkPolicyParams, NetworkPolicyResult,
                               summary="change a live room's egress policy"),
    "getNetworkLog": Method(GetNetworkLogParams, NetworkLogResult,
                            summary="the room's recent connections, allowed and refused"),
    "watch": Method(WatchParams, WatchResult, (WatchEvent,),
                    summary="inotify in the room: watch.event notifications"),
    "unwatch": Method(UnwatchParams, UnwatchResult, summary="stop a watch"),
}

#: Every notification, by its method name.
NOTIFICATIONS: dict[str, type[Notification]] = {
    n.method: n for m in METHODS.values() for n in m.notifications}


def convert_params(method: str, params: dict[str, Any],
                   shape: type[Params] | None = None) -> Any:
    """``params`` (a decoded JSON object) as the method's params struct; -32601 for a method
    that does not exist, -32602 naming the field for params that do not fit."""
    if shape is None:
        spec = METHODS.get(method)
        if spec is None:
            raise errors.MethodNotFound(f"method not found: {method}", method=method)
        shape = spec.params
    try:
        return msgspec.convert(params, shape)
    except msgspec.ValidationError as err:
        raise errors.InvalidParams(f"invalid params for {method}: {err}", method=method) from err


ResultT = TypeVar("ResultT", bound=Result)


def convert_result(method: str, result: Any, shape: type[ResultT]) -> ResultT:
    """A decoded result object as ``shape`` (client side): unknown fields ignored and kept in
    ``raw``; a result that does not fit is a ProtocolError (the daemon broke the schema)."""
    try:
        out = msgspec.convert(result, shape)
    except msgspec.ValidationError as err:
        raise errors.ProtocolError(f"malformed result of {method}: {err}",
                                   method=method) from err
    out.__dict__["_raw"] = result
    return out


def params_to_wire(params: Params) -> dict[str, Any]:
    """A params struct as its JSON object (fields at their defaults left out)."""
    out: dict[str, Any] = msgspec.to_builtins(params)
    return out


def validate_text(value: str, what: str) -> None:
    """NUL bytes cannot cross execve or a path; refuse them early with the field named."""
    if "\x00" in value:
        raise errors.ValidationError(f"{what} contains a NUL byte", field=what)
