"""The zygote (and the room inits forked from it) start isolated from the daemon's environment:
``-I`` keeps the daemon's cwd (and PYTHON* variables) out of sys.path (issue 10, L3)."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import pytest

from sandboxd import jail


def test_zygote_is_started_with_isolated_mode_and_root_cwd(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_popen(argv: list[str], **kw: Any) -> Any:
        seen["argv"], seen["kw"] = argv, kw
        raise Stop

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    with pytest.raises(Stop):
        asyncio.run(jail.Zygote().start())
    assert seen["argv"][1:3] == ["-I", "-m"]
    assert seen["kw"]["cwd"] == "/"
