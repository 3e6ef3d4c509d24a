"""Method families: one module each (rooms, exec, files, code), thin layers over RoomManager.

Each handler is registered with :func:`method` under its wire name together with its params
struct (from ``protocol``); the server looks handlers up in METHODS and converts their
exceptions to wire errors in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import protocol

if TYPE_CHECKING:
    from ..daemon import Daemon

Notify = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass
class Context:
    """Who is calling and how to talk back to them during a call."""

    daemon: Daemon
    uid: int
    pid: int
    request_id: Any
    notify: Notify
    extra: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Context, Any], Awaitable[Any]]
METHODS: dict[str, Handler] = {}


def method(name: str, params: type[Any] | None = None) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        METHODS[name] = fn
        if params is not None:
            protocol.register_params(name, params)
        return fn

    return register


def load_all() -> None:
    """Import every method family so their handlers register."""
    from . import exec as _exec  # noqa: F401
    from . import rooms as _rooms  # noqa: F401

    for optional in ("files", "git", "code", "processes", "stats"):
        try:
            __import__(f"{__name__}.{optional}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{optional}":
                raise
