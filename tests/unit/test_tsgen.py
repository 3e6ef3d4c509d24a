"""The TypeScript client's types cannot drift from the schema: clients/typescript/src/protocol.ts
and errors.ts must be exactly what ``python -m sandboxd.tsgen`` makes of sandboxd/protocol.py
and sandboxd/errors.py today."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import msgspec
import msgspec.inspect
import pytest

from sandboxd import errors, protocol, tsgen

TOP = Path(__file__).resolve().parents[2]
SRC = TOP / "clients" / "typescript" / "src"


def test_committed_types_are_a_fresh_generation() -> None:
    for path, text in tsgen.outputs(TOP).items():
        assert path.read_text() == text, (
            f"{path.relative_to(TOP)} differs from the schema: run `python -m sandboxd.tsgen` "
            "and commit the result")


def test_every_method_and_param_is_in_the_typescript() -> None:
    ts = (SRC / "protocol.ts").read_text()
    for name, m in protocol.METHODS.items():
        assert re.search(rf"^  {name}: \{{ params: {m.params.__name__}; result: "
                         rf"{m.result.__name__};", ts, re.M), name
        found = re.search(rf"^export interface {m.params.__name__} \{{\n(.*?)^\}}", ts,
                          re.S | re.M)
        assert found, m.params.__name__
        info = msgspec.inspect.type_info(m.params)
        assert isinstance(info, msgspec.inspect.StructType)
        wire = [f.encode_name for f in info.fields]
        names = [ln.split("?")[0].split(":")[0].strip() for ln in found.group(1).splitlines()]
        assert names == wire, m.params.__name__
    for nname in protocol.NOTIFICATIONS:
        assert f'"{nname}":' in ts


def test_every_error_code_is_a_typescript_class() -> None:
    ts = (SRC / "errors.ts").read_text()
    for code, cls in errors.BY_CODE.items():
        assert f'  "{code}": {cls.__name__},' in ts
        assert f"export class {cls.__name__} extends " in ts or cls is errors.SandboxError


def test_a_schema_change_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a new param field makes the committed file stale, and --check says
    so (exit 1) without writing; a plain run rewrites it."""
    shutil.copytree(SRC, tmp_path / "clients" / "typescript" / "src")
    assert tsgen.main(["--check", "--root", str(tmp_path)]) == 0

    class PingParams(protocol.Params, frozen=True):
        sandbox_id: str | None = None
        verbose: bool = False

    monkeypatch.setitem(protocol.METHODS, "ping", protocol.Method(
        PingParams, protocol.PingResult, summary="version, capabilities; a room's init"))
    target = tmp_path / "clients" / "typescript" / "src" / "protocol.ts"
    before = target.read_text()
    assert tsgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert target.read_text() == before
    assert tsgen.main(["--root", str(tmp_path)]) == 0
    assert "  verbose?: boolean;" in target.read_text()


def test_result_fields_the_daemon_may_omit_are_optional() -> None:
    ts = (SRC / "protocol.ts").read_text()
    ping = ts.split("export interface PingResult {\n", 1)[1].split("\n}", 1)[0]
    assert "  sandbox?: PingSandbox;" in ping  # UNSET: only when the call named a room
    assert "  message: string;" in ping
    info = ts.split("export interface SandboxInfo {\n", 1)[1].split("\n}", 1)[0]
    assert "  createdAt?: string | null;" in info  # omit_defaults
    exec_ = ts.split("export interface ExecResult {\n", 1)[1].split("\n}", 1)[0]
    assert "  stdout: string;" in exec_ and "  error?: string;" in exec_
