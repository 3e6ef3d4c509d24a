"""The wire: newline-delimited JSON-RPC 2.0 over a Unix stream socket, and every method's params.

Framing: one message per line of UTF-8 JSON (a request, a notification, or a batch array); the
server may interleave responses and notifications (``exec.output``, ``file.chunk``) in any order;
responses match requests by ``id``. This module is shared by the server and the client and imports
nothing of the daemon.

Param shapes are msgspec structs (camelCase on the wire, snake_case in Python). Unknown fields are
refused (-32602, naming the field) so that a misspelt option never silently does nothing.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
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


# --- params ------------------------------------------------------------------------------------

_Struct = msgspec.Struct


class _Params(_Struct, frozen=True, kw_only=True, rename="camel", forbid_unknown_fields=True):
    pass


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


class PingParams(_Params, frozen=True):
    sandbox_id: str | None = None


class GetSandboxParams(_Params, frozen=True):
    sandbox_id: str
    # Kept raw here: fields a client leaves out take the *daemon's* configured defaults, which
    # only rooms.py knows (see rooms.resolve_options).
    options: dict[str, Any] | None = None


class ListSandboxesParams(_Params, frozen=True):
    pass


class DestroyParams(_Params, frozen=True):
    sandbox_id: str


class RunLimits(_Params, frozen=True):
    """Per-run limits (issue "Limits"): each run gets its own child cgroup of the room."""

    cpu_time_ms: Millis | None = None
    wall_time_ms: Millis | None = None
    memory_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=MAX_BYTES)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)] | None = None
    output_bytes: ByteCount | None = None
    file_size_bytes: ByteCount | None = None


class ExecParams(_Params, frozen=True):
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
    user: Literal["root", "sandbox"] = "root"


PARAMS: dict[str, type[_Params]] = {
    "ping": PingParams,
    "getSandbox": GetSandboxParams,
    "listSandboxes": ListSandboxesParams,
    "destroy": DestroyParams,
    "exec": ExecParams,
}


def register_params(method: str, shape: type[_Params]) -> None:
    """Method families (files, processes, code) add their shapes here."""
    PARAMS[method] = shape


def convert_params(method: str, params: dict[str, Any], shape: type[_Params] | None = None) -> Any:
    shape = shape or PARAMS.get(method)
    if shape is None:
        raise errors.MethodNotFound(f"method not found: {method}", method=method)
    try:
        return msgspec.convert(params, shape)
    except msgspec.ValidationError as err:
        raise errors.InvalidParams(f"invalid params for {method}: {err}", method=method) from err


def validate_text(value: str, what: str) -> None:
    """NUL bytes cannot cross execve or a path; refuse them early with the field named."""
    if "\x00" in value:
        raise errors.ValidationError(f"{what} contains a NUL byte", field=what)
