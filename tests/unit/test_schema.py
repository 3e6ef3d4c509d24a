"""The wire schema has one home (``protocol.METHODS``): the handlers, the docs and the package's
public names are held to it here, and ``sandboxd/`` has no import circle."""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import msgspec
import pytest

import sandboxd
from sandboxd import api, protocol

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "sandboxd"


def test_every_method_has_exactly_one_handler() -> None:
    assert set(api.HANDLERS) == set(protocol.METHODS)


@pytest.mark.parametrize("method", sorted(protocol.METHODS))
def test_handler_signature_matches_the_schema(method: str) -> None:
    """A handler takes its method's params struct and returns its result struct (the table's
    Handler type cannot say which, so this test does)."""
    fn = api.HANDLERS[method]
    assert inspect.iscoroutinefunction(fn)
    hints = typing.get_type_hints(fn)
    spec = protocol.METHODS[method]
    params = [h for name, h in hints.items() if name not in ("ctx", "return")]
    assert params == [spec.params], method
    assert hints["return"] is spec.result, method


def test_schema_structs_are_camel_case_and_strict() -> None:
    for name, spec in protocol.METHODS.items():
        assert issubclass(spec.params, protocol.Params), name
        assert spec.params.__struct_config__.forbid_unknown_fields, name
        assert not spec.result.__struct_config__.forbid_unknown_fields, name
        for shape in (spec.params, spec.result):
            for wire in shape.__struct_encode_fields__:
                assert re.fullmatch(r"[a-z][A-Za-z0-9]*", wire), (name, wire)


def test_notifications_are_declared_by_the_methods_that_send_them() -> None:
    assert set(protocol.NOTIFICATIONS) == {"exec.output", "export.chunk", "file.chunk",
                                           "process.output", "terminal.output",
                                           "terminal.exit", "watch.event", "context.output",
                                           "context.result"}
    assert protocol.METHODS["exportSandbox"].notifications == (protocol.ExportChunk,)
    assert protocol.METHODS["attachTerminal"].notifications == (protocol.TerminalOutput,
                                                                protocol.TerminalExit)
    assert protocol.METHODS["streamProcessLogs"].notifications == (protocol.ProcessOutput,)
    wire = msgspec.to_builtins(protocol.ProcessOutput(request_id=4, process_id="web",
                                                      stream="stdout", data="hi"))
    assert wire == {"requestId": 4, "processId": "web", "stream": "stdout", "data": "hi"}
    assert protocol.ExecOutput in protocol.METHODS["exec"].notifications
    assert protocol.ExecOutput in protocol.METHODS["runCode"].notifications
    assert protocol.METHODS["readFile"].notifications == (protocol.FileChunk,)
    wire = msgspec.to_builtins(protocol.FileChunk(request_id=3, data="aGk=", encoding="base64",
                                                  offset=0))
    assert wire == {"requestId": 3, "data": "aGk=", "encoding": "base64", "offset": 0}


def test_results_read_as_their_wire_dicts_and_keep_unknown_fields() -> None:
    raw = {"sandboxId": "r", "destroyed": True, "later": 1}
    res = protocol.convert_result("destroy", raw, protocol.DestroyResult)
    assert (res.sandbox_id, res["sandboxId"], res.get("destroyed"), res.raw["later"]) == (
        "r", "r", True, 1)
    assert "later" in res and "nothing" not in res and res.get("nothing", 5) == 5
    assert {**res} == raw
    with pytest.raises(KeyError):
        res["nothing"]
    # absent (UNSET) fields are absent in every reading, and on the wire
    run = protocol.ExecResult(exit_code=0)
    assert "error" not in run and run.get("error") is None
    assert "error" not in msgspec.to_builtins(run)
    assert "error" in msgspec.to_builtins(protocol.ExecResult(error="boom"))
    with pytest.raises(sandboxd.errors.ProtocolError, match="malformed result of destroy"):
        protocol.convert_result("destroy", {"sandboxId": 1}, protocol.DestroyResult)


def test_params_leave_defaults_out_and_refuse_unknown_fields() -> None:
    p = protocol.ExecParams(sandbox_id="a", command="x", stream=False, user="root")
    assert protocol.params_to_wire(p) == {"sandboxId": "a", "command": "x"}
    with pytest.raises(sandboxd.errors.InvalidParams, match="bogus"):
        protocol.convert_params("exec", {"sandboxId": "a", "command": "x", "bogus": 1})
    with pytest.raises(sandboxd.errors.MethodNotFound):
        protocol.convert_params("nope", {})


def test_public_names_are_pinned() -> None:
    """Like httpx's tests/test_exported_members.py: what ``import sandboxd`` offers changes only
    on purpose."""
    assert sandboxd.__all__ == ["AsyncClient", "Client", "__version__", "errors"]
    for name in sandboxd.__all__:
        assert hasattr(sandboxd, name)
    from sandboxd import client

    assert sorted(client.__all__) == sorted([
        "AsyncClient", "AsyncSandbox", "Client", "CopyFromResult", "CopyToResult", "ExecResult",
        "FileContent", "FileInfo", "OutputCallback", "ProgressCallback", "RunCodeResult",
        "Sandbox", "SandboxInfo", "Process", "AsyncProcess", "Terminal", "Watcher"])
    assert client.ExecResult is protocol.ExecResult
    assert client.RunCodeResult is protocol.RunCodeResult
    assert issubclass(client.FileContent, protocol.METHODS["readFile"].result)


# --- import circles ------------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path) -> set[str]:
    """sandboxd modules ``path`` imports when it is imported: module level only (imports inside
    functions run later, and ``if TYPE_CHECKING:`` blocks never)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef,
                                                             ast.AsyncFunctionDef,
                                                             ast.ClassDef)) else ():
            if isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names if a.name.startswith("sandboxd")}
            elif isinstance(sub, ast.ImportFrom):
                if sub.level:
                    base = package.split(".")
                    base = base[:len(base) - sub.level + 1]
                    mod = ".".join(base + ([sub.module] if sub.module else []))
                else:
                    mod = sub.module or ""
                if not mod.startswith("sandboxd"):
                    continue
                out.add(mod)
                for alias in sub.names:  # `from . import errors` names a module
                    if (PKG.parent / (mod.replace(".", "/") + "/" + alias.name + ".py")).exists() \
                            or (PKG.parent / mod.replace(".", "/") / alias.name).is_dir():
                        out.add(f"{mod}.{alias.name}")
    return out


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        deps = set()
        for mod in _runtime_imports(path):
            # importing a.b.c imports a and a.b first
            parts = mod.split(".")
            deps |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        name = _module_name(path)
        # A module's own packages are already being imported when it runs (api.code importing
        # api.exec does not import api again): only other packages count.
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        graph[name] = deps - own
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m not in graph:
                continue
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)) is not None:
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)) is not None:
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles_in_sandboxd() -> None:
    """Module-level imports only (the daemon <-> server <-> api circle was one of them)."""
    graph = import_graph()
    assert "sandboxd.api" in graph["sandboxd.server"]
    assert "sandboxd.daemon" not in graph["sandboxd.server"] | graph["sandboxd.api.rooms"]
    outside = {k: v for k, v in graph.items() if not k.startswith("sandboxd.jail")}
    assert _cycle(outside) is None, " -> ".join(_cycle(outside) or [])


def test_cgroup_package_layers() -> None:
    """jail/cgroup/ (issue 12): its __init__ is enter() alone (the room init imports it), the
    backends sit on the interface and never on the daemon's layers above, and the root-only
    host side (hostsetup) is imported by no daemon-side module at module level."""
    graph = import_graph()
    pkg = "sandboxd.jail.cgroup"
    mods = {n for n in graph if n == pkg or n.startswith(pkg + ".")}
    assert mods >= {f"{pkg}.{m}" for m in
                    ("interface", "fs", "tree", "v1", "v2", "disabled", "detect")}, mods
    assert graph[pkg] == set(), graph[pkg]
    above = {"sandboxd.rooms", "sandboxd.runs", "sandboxd.daemon", "sandboxd.server",
             "sandboxd.api", "sandboxd.hostsetup", "sandboxd.jail.init", "sandboxd.jail.zygote"}
    for m in mods:
        assert not graph[m] & above, (m, graph[m] & above)
    for m, deps in graph.items():
        if not m.startswith(("sandboxd.hostsetup", "sandboxd.cli")):
            assert "sandboxd.hostsetup.cgroups" not in deps, m
    for user in ("sandboxd.jail.init", "sandboxd.jail.zygote"):
        assert not {d for d in graph[user] if d.startswith(pkg + ".")}, graph[user]


def test_no_import_circles_in_the_jail() -> None:
    graph = import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    names = sorted(n for n in import_graph() if n != "sandboxd.__main__")
    code = ("import importlib, sys\n"
            "bad = []\n"
            f"for name in {names!r}:\n"
            "    for m in [k for k in sys.modules if k.startswith('sandboxd')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except Exception as err:\n"
            "        bad.append(f'{name}: {type(err).__name__}: {err}')\n"
            "print('\\n'.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == ""


# --- the docs ------------------------------------------------------------------------------------


def _method_rows(text: str) -> dict[str, str]:
    """Rows ``| `name` | params | ...`` of the markdown tables whose first header is "method"."""
    rows: dict[str, str] = {}
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|"):
            in_table = False
            continue
        if cells[0].lower() == "method":
            in_table = True
            continue
        if in_table and len(cells) >= 3 and (m := re.fullmatch(r"`([a-zA-Z]+)`", cells[0])):
            rows[m.group(1)] = cells[1]
    return rows


def _param_names(cell: str) -> set[str]:
    first = re.match(r"`([^`]*)`", cell)
    if first is None:
        return set()
    return {re.sub(r"\?.*|\s.*", "", t.strip()) for t in first.group(1).split(",") if t.strip()}


def _check_rows(rows: dict[str, str], where: str) -> None:
    for method, cell in rows.items():
        assert method in protocol.METHODS, f"{where}: {method} is not a method"
        shape = protocol.METHODS[method].params
        fields = dict(zip(shape.__struct_encode_fields__, shape.__struct_fields__, strict=True))
        named = _param_names(cell)
        assert named <= set(fields), f"{where}: {method} has no params {named - set(fields)}"
        required = {f.encode_name for f in msgspec.structs.fields(shape) if f.required}
        for w in required:
            assert re.search(rf"\b{w}\b(?!\?)", cell), f"{where}: {method} lacks {w}"


def test_readme_method_table_is_the_schema() -> None:
    rows = _method_rows((ROOT / "README.md").read_text())
    assert set(rows) == set(protocol.METHODS)
    _check_rows(rows, "README.md")


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_method_tables_are_the_schema(doc: str) -> None:
    _check_rows(_method_rows((ROOT / "docs" / doc).read_text()), f"docs/{doc}")


def test_the_doc_checker_notices_drift() -> None:
    with pytest.raises(AssertionError, match="no params"):
        _check_rows({"exec": "`sandboxId, command, shell?`"}, "x")
    with pytest.raises(AssertionError, match="lacks command"):
        _check_rows({"exec": "`sandboxId`"}, "x")
    with pytest.raises(AssertionError, match="not a method"):
        _check_rows({"execute": "`sandboxId`"}, "x")
