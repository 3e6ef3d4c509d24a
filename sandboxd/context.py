"""What a method handler (and a service below it) may use: the daemon's services and the caller.

Handlers get a :class:`Context`, never the daemon: the rooms, the config, the host's facts (its
capabilities and enforceable limits), the code-run service, who is calling, and how to send them
notifications during the call. This module imports nothing at run time, so that the daemon, the
server, ``api/`` and the services can all name it without an import circle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .coderun.service import CodeRunService
    from .config import DaemonConfig
    from .facts import HostFacts
    from .protocol import Notification, RequestId
    from .rooms import RoomManager

#: Sends one notification to the caller (waits while the client's backlog is over the cap).
Notify = Callable[["Notification"], Awaitable[None]]
#: Registers a callback run once when the caller's connection ends (terminals: the grace
#: period starts; watches end); it returns a function that unregisters it.
OnClose = Callable[[Callable[[], None]], Callable[[], None]]


def _never_closes(_callback: Callable[[], None]) -> Callable[[], None]:
    return lambda: None


@dataclass(frozen=True)
class Services:
    """The daemon's long-lived parts that handlers use, set up once the daemon runs."""

    rooms: RoomManager
    config: DaemonConfig
    facts: HostFacts
    coderun: CodeRunService

    def context(self, uid: int, pid: int, request_id: RequestId, notify: Notify,
                on_close: OnClose = _never_closes) -> Context:
        return Context(rooms=self.rooms, config=self.config, facts=self.facts,
                       coderun=self.coderun, uid=uid, pid=pid, request_id=request_id,
                       notify=notify, on_close=on_close)


@dataclass(frozen=True)
class Context:
    """Who is calling (SO_PEERCRED uid and pid, the request's id) and what they may reach."""

    rooms: RoomManager
    config: DaemonConfig
    facts: HostFacts
    coderun: CodeRunService
    uid: int
    pid: int
    request_id: RequestId
    notify: Notify
    #: the connection's close hook (things that outlive the call but not the connection)
    on_close: OnClose = _never_closes
