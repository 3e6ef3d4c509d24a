"""The daemon's side of a code context's line protocol (sandboxd.contexts): the driver is code
in the room, so its lines are parsed as bounded JSON objects and anything else ends it."""

from __future__ import annotations

import asyncio
import os
from types import SimpleNamespace
from typing import Any

import pytest

from sandboxd import contexts


async def _read(data: bytes, max_line: int | None = None) -> tuple[list[Any], str | None]:
    ctx: Any = SimpleNamespace(id="ctx-1", room=None, language="python")
    drv = contexts.Driver(ctx)
    r, w = os.pipe()
    task = asyncio.ensure_future(drv._read(r))
    os.write(w, data)
    os.close(w)
    got: list[Any] = []
    with pytest.raises(contexts.DriverGone):
        while True:
            got.append(await drv.next_event())
    await task
    with pytest.raises(contexts.DriverGone):  # every later reader sees the end too
        await drv.next_event()
    return got, drv.control.kill_reason


def test_events_then_end_of_stream() -> None:
    got, killed = asyncio.run(_read(b'{"ev": "ready"}\n{"ev": "done", "id": 1}\n'))
    assert got == [{"ev": "ready"}, {"ev": "done", "id": 1}]
    assert killed == "protocol"  # (the stream ended while the run was thought alive)


@pytest.mark.parametrize("bad", [b"not json\n", b"[1, 2]\n", b'"a string"\n'])
def test_a_line_that_is_not_a_json_object_ends_the_driver(bad: bytes) -> None:
    got, killed = asyncio.run(_read(b'{"ev": "ready"}\n' + bad + b'{"ev": "late"}\n'))
    assert got == [{"ev": "ready"}] and killed == "protocol"


def test_a_line_over_the_bound_ends_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contexts, "MAX_LINE", 1024)
    got, killed = asyncio.run(_read(b'{"ev": "ready"}\n{"x": "' + b"a" * 4096 + b'"}\n'))
    assert got == [{"ev": "ready"}] and killed == "protocol"


def test_driver_sources_ship_with_the_package() -> None:
    py = contexts.driver_argv("python")
    assert py[:2] == ["/usr/bin/python3", "-c"] and "jupyter_client" in py[2]
    js = contexts.driver_argv("typescript")
    assert js[0] == "/bin/sh" and js[-1] == "typescript" and "transpileModule" in js[4]
    # one argv string each, far under the 128 KiB bound on argv + env (runs.MAX_ARGV_ENV_BYTES)
    assert max(len(py[2]), len(js[4])) < 32 * 1024
