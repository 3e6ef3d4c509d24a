"""The zygote (and the room inits forked from it) start isolated from the daemon's environment:
``-I`` keeps the daemon's cwd (and PYTHON* variables) out of sys.path (issue 10, L3)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from typing import Any

import pytest

from sandboxd.jail import channel, handles


def test_zygote_is_started_with_isolated_mode_and_root_cwd(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_popen(argv: list[str], **kw: Any) -> Any:
        seen["argv"], seen["kw"] = argv, kw
        raise Stop

    made: list[socket.socket] = []

    def pair() -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        made.extend((a, b))
        return a, b

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    monkeypatch.setattr(channel, "pair", pair)
    with pytest.raises(Stop):
        asyncio.run(handles.Zygote().start())
    # A failed start leaks neither end of the channel (a zygote restart under EMFILE).
    assert made and all(sock.fileno() == -1 for sock in made)
    assert seen["argv"][1:3] == ["-I", "-m"]
    assert seen["kw"]["cwd"] == "/"
