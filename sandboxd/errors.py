"""One exception tree for sandboxd, each leaf carrying its stable wire code.

    SandboxError (code INTERNAL_ERROR)             base: everything sandboxd raises on purpose
    ├── ProtocolError                              JSON-RPC envelope errors (negative rpc codes)
    │   ├── ParseError          -32700
    │   ├── InvalidRequest      -32600
    │   ├── MethodNotFound      -32601
    │   └── InvalidParams       -32602
    ├── ValidationError         VALIDATION_FAILED  well-formed request, unacceptable value
    ├── InvalidSandboxId        INVALID_SANDBOX_ID
    ├── SandboxNotFound         SANDBOX_NOT_FOUND
    ├── SandboxUnavailable      SANDBOX_UNAVAILABLE the room died or is being destroyed
    │   └── RoomLost            (same code) made by room_lost: the room's init died or its
    │                           channel broke under a call; ``reason``, ``incarnation``
    ├── LimitUnavailable        LIMIT_UNAVAILABLE  a requested limit cannot be enforced here
    ├── QuotaExceeded           QUOTA_EXCEEDED
    ├── RequestTooLarge         REQUEST_TOO_LARGE
    ├── ShuttingDown            SHUTTING_DOWN
    ├── HostResourceExhausted   HOST_RESOURCE_EXHAUSTED the host ran out of fds, space, memory
    ├── FileError               (file API; subclasses carry FILE_NOT_FOUND, IS_DIRECTORY, ...)
    ├── GitError                (gitCheckout; GIT_* codes)
    ├── UnsupportedLanguage     UNSUPPORTED_LANGUAGE
    ├── ProcessError            (background processes; PROCESS_* codes)
    ├── PortError               (ports; PORT_* codes)
    │   └── PortAlreadyExposed  PORT_ALREADY_EXPOSED
    ├── TerminalNotFound        TERMINAL_NOT_FOUND (terminals: an id the caller has not)
    ├── SessionError            (sessions: SESSION_NOT_FOUND, SESSION_EXISTS)
    ├── WatchNotFound           WATCH_NOT_FOUND (file watch: an id this room has not)
    ├── ContextNotFound         CONTEXT_NOT_FOUND (code contexts: an id this room has not)
    ├── DaemonUnreachable       DAEMON_UNREACHABLE (client side only: no socket / refused)
    └── InternalError           INTERNAL_ERROR     "the sandbox broke", never "the program failed"

On the wire every application error is JSON-RPC code -32000 with ``data.code`` set to the class's
``code`` and the context fields in ``data``. Failures that are not SandboxErrors become wire
errors here, in one place: :func:`room_lost` for a room that died (its tombstone, or a call its
init failed under), :func:`room_failure` for a room's machinery failing under a call (its
init's channel broke or it did not answer), :func:`host_exhaustion` for the host running out;
the server answers with them (``server.py``); the client converts them back with
:func:`from_wire`.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, ClassVar

APPLICATION_ERROR = -32000


class SandboxError(Exception):
    """Base of every error sandboxd raises on purpose."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    rpc_code: ClassVar[int] = APPLICATION_ERROR

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def to_wire(self) -> dict[str, Any]:
        data: dict[str, Any] = {"code": self.code, **self.context}
        return {"code": self.rpc_code, "message": self.message, "data": data}


# --- JSON-RPC envelope -----------------------------------------------------------------------


class ProtocolError(SandboxError):
    code = "PROTOCOL_ERROR"


class ParseError(ProtocolError):
    code = "PARSE_ERROR"
    rpc_code = -32700


class InvalidRequest(ProtocolError):
    code = "INVALID_REQUEST"
    rpc_code = -32600


class MethodNotFound(ProtocolError):
    code = "METHOD_NOT_FOUND"
    rpc_code = -32601


class InvalidParams(ProtocolError):
    code = "INVALID_PARAMS"
    rpc_code = -32602


# --- application -------------------------------------------------------------------------------


class ValidationError(SandboxError):
    code = "VALIDATION_FAILED"


class InvalidSandboxId(SandboxError):
    code = "INVALID_SANDBOX_ID"


class SandboxNotFound(SandboxError):
    code = "SANDBOX_NOT_FOUND"


class SandboxUnavailable(SandboxError):
    code = "SANDBOX_UNAVAILABLE"


class RoomLost(SandboxUnavailable):
    """A room that died (OOM, a kill, a crash, a broken channel) or was destroyed under the
    call. Made by :func:`room_lost` only; on the client, every SANDBOX_UNAVAILABLE is one."""

    @property
    def reason(self) -> str | None:
        """"oom", "killed", "crashed" or "destroyed"; None when the room just broke."""
        value = self.context.get("reason")
        return value if isinstance(value, str) else None

    @property
    def incarnation(self) -> int | None:
        value = self.context.get("incarnation")
        return value if isinstance(value, int) else None


class LimitUnavailable(SandboxError):
    code = "LIMIT_UNAVAILABLE"


class QuotaExceeded(SandboxError):
    code = "QUOTA_EXCEEDED"


class RequestTooLarge(SandboxError):
    code = "REQUEST_TOO_LARGE"


class ShuttingDown(SandboxError):
    code = "SHUTTING_DOWN"


class HostResourceExhausted(SandboxError):
    """The daemon's host side ran out of something (ENOSPC, EMFILE...): retry later; not the
    caller's fault and not a broken sandbox. The message never names host paths."""

    code = "HOST_RESOURCE_EXHAUSTED"


class UnsupportedLanguage(SandboxError):
    code = "UNSUPPORTED_LANGUAGE"


class DaemonUnreachable(SandboxError):
    code = "DAEMON_UNREACHABLE"


class InternalError(SandboxError):
    code = "INTERNAL_ERROR"


# --- files -------------------------------------------------------------------------------------


class FileError(SandboxError):
    code = "FILE_ERROR"


class FileNotFound(FileError):
    code = "FILE_NOT_FOUND"


class IsDirectory(FileError):
    code = "IS_DIRECTORY"


class NotDirectory(FileError):
    code = "NOT_DIRECTORY"


class FileExists(FileError):
    code = "FILE_EXISTS"


class PermissionDenied(FileError):
    code = "PERMISSION_DENIED"


class NoSpace(FileError):
    code = "NO_SPACE"


class FileTooLarge(FileError):
    code = "FILE_TOO_LARGE"


class ReadOnly(FileError):
    code = "READ_ONLY"


# --- git ---------------------------------------------------------------------------------------


class GitError(SandboxError):
    code = "GIT_CLONE_FAILED"


class GitRepositoryNotFound(GitError):
    code = "GIT_REPOSITORY_NOT_FOUND"


class GitBranchNotFound(GitError):
    code = "GIT_BRANCH_NOT_FOUND"


class InvalidGitUrl(GitError):
    code = "INVALID_GIT_URL"


class GitCloneFailed(GitError):
    code = "GIT_CLONE_FAILED"


# --- background processes ----------------------------------------------------------------------


class ProcessError(SandboxError):
    code = "PROCESS_ERROR"


class ProcessExists(ProcessError):
    """startProcess: a live process of the room already has this processId."""

    code = "PROCESS_EXISTS"


class ProcessNotFound(ProcessError):
    """No process (live, or an ended record still kept) of the room has this processId."""

    code = "PROCESS_NOT_FOUND"


class ProcessExitedBeforeReady(ProcessError):
    """waitForLog / waitForPort: the process ended first (``exitCode``, ``status``)."""

    code = "PROCESS_EXITED_BEFORE_READY"


class ProcessReadyTimeout(ProcessError):
    """waitForLog / waitForPort: not ready within ``timeout`` ms."""

    code = "PROCESS_READY_TIMEOUT"


# --- terminals --------------------------------------------------------------------------------


class TerminalNotFound(SandboxError):
    """No terminal of the caller's rooms has this terminalId (or it was closed)."""

    code = "TERMINAL_NOT_FOUND"


class SessionError(SandboxError):
    code = "SESSION_ERROR"


class SessionNotFound(SessionError):
    """No session of this id in the room (never made, deleted, or its shell exited)."""

    code = "SESSION_NOT_FOUND"


class SessionExists(SessionError):
    """createSession named a session id the room already has."""

    code = "SESSION_EXISTS"


class ContextNotFound(SandboxError):
    """No code context of this id in the room (never made, or deleted)."""

    code = "CONTEXT_NOT_FOUND"


class WatchNotFound(SandboxError):
    """No watch of this id in the room (never made, unwatched, or its connection went)."""

    code = "WATCH_NOT_FOUND"


# --- ports ------------------------------------------------------------------------------------


class PortError(SandboxError):
    code = "PORT_ERROR"


class PortAlreadyExposed(PortError):
    code = "PORT_ALREADY_EXPOSED"


# --- persistence ----------------------------------------------------------------------------


class BackupError(SandboxError):
    code = "BACKUP_ERROR"


class BackupNotFound(BackupError):
    """No backup of the caller's has this id (another uid's backups do not exist for it)."""

    code = "BACKUP_NOT_FOUND"


class BackupExpired(BackupError):
    """The backup's ``ttlSeconds`` ran out; its archive is gone."""

    code = "BACKUP_EXPIRED"


class InvalidArchive(BackupError):
    """An imported (or restored) archive that tar refused; the target directory is unchanged."""

    code = "INVALID_ARCHIVE"


class SandboxExists(SandboxError):
    """forkSandbox: the new id names a room that already exists."""

    code = "SANDBOX_EXISTS"


# --- failures that are not ours, as wire errors -------------------------------------------------

#: Host-side errnos that mean "the host ran out", not "the sandbox broke" (issue 23 D12).
_EXHAUSTED = {_errno.ENOSPC: "no space left on the host", _errno.EDQUOT: "host disk quota reached",
              _errno.EMFILE: "the daemon ran out of file descriptors",
              _errno.ENFILE: "the host ran out of file descriptors",
              _errno.ENOMEM: "the host ran out of memory",
              _errno.EAGAIN: "a host resource is temporarily exhausted"}


def host_exhaustion(err: BaseException) -> HostResourceExhausted | None:
    """HOST_RESOURCE_EXHAUSTED for an OSError (or an error caused by one) that says the host ran
    out of something; the message names the errno only, never a host path."""
    seen: BaseException | None = err
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _EXHAUSTED:
            return HostResourceExhausted(_EXHAUSTED[seen.errno] + "; retry later",
                                         errno=_errno.errorcode.get(seen.errno, ""))
        if isinstance(seen, SandboxError) and not isinstance(seen, InternalError):
            return None
        seen = seen.__cause__ or seen.__context__
    return None


def room_lost(sandbox_id: str, message: str, *, reason: str | None = None,
              incarnation: int | None = None) -> RoomLost:
    """SANDBOX_UNAVAILABLE for room ``sandbox_id``: ``reason`` and ``incarnation`` are in its
    data when known (a tombstone knows both; a broken channel neither)."""
    context: dict[str, Any] = {"sandboxId": sandbox_id}
    if reason is not None:
        context["reason"] = reason
    if incarnation is not None:
        context["incarnation"] = incarnation
    return RoomLost(message, **context)


def room_failure(err: BaseException, sandbox_id: str, doing: str) -> SandboxError:
    """The wire error for a room's machinery failing under a call (never the payload's fault):
    its init not answering ``doing`` in time is INTERNAL_ERROR; its channel breaking (a
    ``jail.JailError``, an OSError) means the room is gone: SANDBOX_UNAVAILABLE."""
    if isinstance(err, TimeoutError):
        return InternalError(f"sandbox {sandbox_id}: the room init did not answer {doing}",
                             sandboxId=sandbox_id)
    if isinstance(err, OSError):
        return room_lost(sandbox_id, f"sandbox {sandbox_id} is gone: {err}")
    return InternalError(f"sandbox {sandbox_id}: {doing} failed: {type(err).__name__}",
                         sandboxId=sandbox_id)


# --- wire mapping ------------------------------------------------------------------------------


def _leaves(cls: type[SandboxError]) -> list[type[SandboxError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_leaves(sub))
    return out


#: Every stable ``data.code`` string, mapped to its class (the most derived class wins).
BY_CODE: dict[str, type[SandboxError]] = {c.code: c for c in _leaves(SandboxError)}
BY_RPC_CODE: dict[int, type[SandboxError]] = {
    c.rpc_code: c for c in _leaves(ProtocolError) if c.rpc_code != APPLICATION_ERROR
}


def from_wire(error: dict[str, Any]) -> SandboxError:
    """Rebuild the exception a server sent (client side)."""
    data = error.get("data") or {}
    message = str(error.get("message", "error"))
    cls: type[SandboxError] | None = None
    if isinstance(data, dict) and isinstance(data.get("code"), str):
        cls = BY_CODE.get(data["code"])
    if cls is None:
        cls = BY_RPC_CODE.get(int(error.get("code", APPLICATION_ERROR)), SandboxError)
    context = {k: v for k, v in data.items() if k != "code"} if isinstance(data, dict) else {}
    exc = cls(message, **context)
    return exc


__all__ = [name for name, obj in list(globals().items())
           if isinstance(obj, type) and issubclass(obj, SandboxError)] + [
    "BY_CODE", "from_wire", "host_exhaustion", "room_failure", "room_lost"]
