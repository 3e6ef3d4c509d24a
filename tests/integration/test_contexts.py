"""Code interpreter contexts from the wire (issue 16, docs/contexts.md): Python through a real
ipykernel in the room (state across cells, last-expression results, stdout/stderr, errors, PNG
plots, DataFrames as HTML, display() of JSON, timeouts, a kernel that ignores SIGINT, a memory
hog), JavaScript and TypeScript through the node driver, many contexts at once, and nothing left
after deleteCodeContext or destroy. Rooms run over the host tree: scripts/deps.sh --tests
installs python3-ipykernel & co and node-typescript there."""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProc, skip_unless_ci
from test_languages import ROOTFS
from test_limits import host_ok, run_cgroups, strays

from sandboxd import errors

pytestmark = pytest.mark.integration

SANDBOXCTL = str(Path(sys.executable).parent / "sandboxctl")
PY_MODULES = ("ipykernel", "jupyter_client", "numpy", "pandas", "matplotlib", "scipy")


@pytest.fixture(scope="module")
def python_ok() -> None:
    probe = "import " + ", ".join(PY_MODULES)
    if subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True).returncode:
        skip_unless_ci("the host's python3 lacks " + ", ".join(PY_MODULES)
                       + " (scripts/deps.sh --tests)")


@pytest.fixture(scope="module")
def node_ok() -> None:
    if shutil.which("node") is None:
        skip_unless_ci("no node on the host")


@pytest.fixture(scope="module")
def ts_ok(node_ok: None) -> None:
    probe = "try { require('typescript') } catch (e) { require('/usr/share/nodejs/typescript') }"
    if subprocess.run(["node", "-e", probe], capture_output=True).returncode:
        skip_unless_ci("node cannot require typescript (node-typescript: scripts/deps.sh --tests)")


@pytest.fixture(autouse=True)
def _room_destroyed(client: Any, room_id: str) -> Iterator[None]:
    """Every test's room (and with it its kernels) goes at its end: the host checks of the
    next tests look at every room."""
    yield
    with contextlib.suppress(errors.SandboxError):
        client.sandbox(room_id).destroy()


def plain(r: Any) -> list[str]:
    return [b.get("text/plain") for b in r.results]


def test_python_state_results_logs_and_errors(client: Any, daemon: DaemonProc, room_id: str,
                                              python_ok: None) -> None:
    sb = client.sandbox(room_id)
    info = sb.create_code_context("python")
    assert (info.language, info.cwd, info.status) == ("python", "/workspace", "ready")
    cid = info.context_id
    for cell in ("import math\nx = 41", "def f(a):\n    return a * 2",
                 "class C:\n    def v(self):\n        return 'c'"):
        r = sb.run_in_context(cid, cell)
        assert "error" not in r.raw and r.results == [], r.raw
    r = sb.run_in_context(cid, "x + 1")
    assert plain(r) == ["42"] and r.execution_count == 4, r.raw
    r = sb.run_in_context(cid, "f(x), C().v(), math.floor(2.5)")
    assert plain(r) == ["(82, 'c', 2)"], r.raw
    r = sb.run_in_context(cid, "import sys, os\nprint('out'); print('err', file=sys.stderr)\n"
                          "os.getcwd()")
    assert r.logs.stdout == ["out\n"] and r.logs.stderr == ["err\n"], r.raw
    assert plain(r) == ["'/workspace'"]
    r = sb.run_in_context(cid, "def g():\n    raise ValueError('bad value')\ng()")
    assert "error" in r and r.error.name == "ValueError", r.raw
    assert r.error.value == "bad value"
    assert any("bad value" in line for line in r.error.traceback), r.error.traceback
    assert any("g()" in line for line in r.error.traceback), r.error.traceback
    # An error is the cell's, never the context's: the state is still there.
    assert plain(sb.run_in_context(cid, "x")) == ["41"]
    with pytest.raises(errors.ContextNotFound):
        sb.run_in_context("ctx-000000000000", "1")
    with pytest.raises(errors.UnsupportedLanguage):
        sb.create_code_context("cobol")
    assert [c.context_id for c in sb.list_code_contexts()] == [cid]
    sb.delete_code_context(cid)
    assert sb.list_code_contexts() == []
    with pytest.raises(errors.ContextNotFound):
        sb.delete_code_context(cid)
    host_ok(daemon, sb)


def test_python_rich_output(client: Any, room_id: str, python_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("python").context_id
    r = sb.run_in_context(cid, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()",
                          timeout=60)
    pngs = [b["image/png"] for b in r.results if "image/png" in b]
    assert len(pngs) == 1, r.raw
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    # A figure left open at the end of a cell is shown too.
    r = sb.run_in_context(cid, "fig = plt.figure(); _ = plt.bar([1, 2], [3, 4])")
    assert sum("image/png" in b for b in r.results) == 1, r.raw
    r = sb.run_in_context(cid, "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    (df,) = r.results
    assert "<table" in df["text/html"] and "a  b" in df["text/plain"], r.raw
    r = sb.run_in_context(cid, "from IPython.display import display, JSON, HTML\n"
                          "display(JSON({'k': [1, 2]}))\ndisplay(HTML('<b>hi</b>'))\n7")
    assert [b.get("application/json") for b in r.results[:1]] == [{"k": [1, 2]}], r.raw
    assert r.results[1]["text/html"] == "<b>hi</b>" and plain(r)[2] == "7"
    r = sb.run_in_context(cid, "import numpy as np, scipy\nfloat(np.arange(4).sum())")
    assert plain(r) == ["6.0"], r.raw


def test_python_streams_notifications(client: Any, room_id: str, python_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("python").context_id
    seen: list[tuple[str, Any]] = []
    r = sb.run_in_context(cid, "import time\nprint('a', flush=True)\ntime.sleep(0.2)\n"
                          "display(5)\nprint('b')\n6",
                          on_output=lambda s, t: seen.append((s, t)),
                          on_result=lambda b: seen.append(("result", b["text/plain"])))
    assert seen == [("stdout", "a\n"), ("result", "5"), ("stdout", "b\n"), ("result", "6")], seen
    assert plain(r) == ["5", "6"]


def test_python_timeout_interrupts_and_keeps_state(client: Any, room_id: str,
                                                   python_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("python").context_id
    sb.run_in_context(cid, "kept = 'yes'")
    t0 = time.monotonic()
    r = sb.run_in_context(cid, "while True:\n    pass", timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert r.error.name == "KeyboardInterrupt" and "timed out" in r.error.value, r.raw
    assert plain(sb.run_in_context(cid, "kept")) == ["'yes'"]
    # interruptCodeContext from another connection, while the cell runs
    out: list[Any] = []
    th = threading.Thread(target=lambda: out.append(sb.run_in_context(cid, "import time\n"
                                                                      "time.sleep(100)")))
    th.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if sb.list_code_contexts()[0].status == "busy":
            break
        time.sleep(0.05)
    time.sleep(0.3)
    sb.interrupt_code_context(cid)
    th.join(15)
    assert out and out[0].error.name == "KeyboardInterrupt", out
    assert plain(sb.run_in_context(cid, "kept")) == ["'yes'"]


def test_python_kernel_ignoring_the_interrupt_is_restarted(client: Any, daemon: DaemonProc,
                                                           room_id: str, python_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("python").context_id
    sb.run_in_context(cid, "lost = 1")
    r = sb.run_in_context(cid, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                          "while True:\n    pass", timeout=0.3)
    assert r.error.name == "ContextRestarted", r.raw
    r = sb.run_in_context(cid, "lost")
    assert r.error.name == "NameError", r.raw
    # restartCodeContext: a fresh state, the same id
    sb.run_in_context(cid, "again = 1")
    assert sb.restart_code_context(cid).context_id == cid
    assert sb.run_in_context(cid, "again").error.name == "NameError"


def test_python_memory_hog_is_restarted_with_the_error(client: Any, daemon: DaemonProc,
                                                       room_id: str, python_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("python", memory_bytes=400 << 20).context_id
    sb.run_in_context(cid, "before = 1")
    r = sb.run_in_context(cid, "hog = []\nwhile True:\n    hog.append(b'x' * (64 << 20))",
                          timeout=60)
    assert r.error.name == "MemoryLimitExceeded", r.raw
    r = sb.run_in_context(cid, "before")
    assert r.error.name == "NameError", r.raw
    assert plain(sb.run_in_context(cid, "1 + 1")) == ["2"]


def test_python_cell_cannot_reopen_its_drivers_channel(client: Any, room_id: str,
                                                       python_ok: None) -> None:
    """The kernel is a child of the driver, as the same user, but the channel's pipes are the
    daemon's (mode 0600, an id the room does not map) and not inherited: the cell cannot write
    forged or garbage events into them through /proc/<ppid>/fd."""
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("python").context_id
    sb.run_in_context(cid, "kept = 1")
    r = sb.run_in_context(cid, "import os\nppid = os.getppid()\nopened = []\n"
                          "for fd in os.listdir(f'/proc/{ppid}/fd'):\n"
                          "    p = f'/proc/{ppid}/fd/{fd}'\n"
                          "    if int(fd) > 2 and os.readlink(p).startswith('pipe:'):\n"
                          "        try:\n"
                          "            open(p, 'wb', buffering=0).write(b'garbage\\n')\n"
                          "            opened.append(fd)\n"
                          "        except PermissionError:\n"
                          "            pass\n"
                          "opened")
    assert plain(r) == ["[]"], r.raw
    assert plain(sb.run_in_context(cid, "kept")) == ["1"]


def test_javascript_context(client: Any, daemon: DaemonProc, room_id: str,
                            node_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("javascript").context_id
    for cell in ("let n = 41", "const k = 1; function twice(a) { return a * 2 }",
                 "class P { hi() { return 'hi' } }"):
        r = sb.run_in_context(cid, cell)
        assert "error" not in r.raw, r.raw
    assert plain(sb.run_in_context(cid, "n + k")) == ["42"]
    assert plain(sb.run_in_context(cid, "twice(n) + new P().hi()")) == ["'82hi'"]
    r = sb.run_in_context(cid, "await new Promise(r => setTimeout(() => r(n * 10), 50))")
    assert plain(r) == ["410"], r.raw
    r = sb.run_in_context(cid, "const os = require('os'); const path = require('node:path');\n"
                          "console.log('hello', 1); console.error('oops');\n"
                          "path.join('a', 'b')")
    assert r.logs.stdout == ["hello 1\n"] and r.logs.stderr == ["oops\n"], r.raw
    assert plain(r) == ["'a/b'"]
    r = sb.run_in_context(cid, "({a: 1, b: [1, 2]})")
    assert r.results[0]["application/json"] == {"a": 1, "b": [1, 2]}, r.raw
    r = sb.run_in_context(cid, "function bad() { throw new TypeError('nope') }\nbad()")
    assert (r.error.name, r.error.value) == ("TypeError", "nope"), r.raw
    assert any("bad" in line for line in r.error.traceback)
    r = sb.run_in_context(cid, "await Promise.reject(new RangeError('later'))")
    assert (r.error.name, r.error.value) == ("RangeError", "later"), r.raw
    assert plain(sb.run_in_context(cid, "n")) == ["41"]
    sb.delete_code_context(cid)
    host_ok(daemon, sb)


def test_javascript_timeout_interrupts_and_keeps_state(client: Any, room_id: str,
                                                       node_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("javascript").context_id
    sb.run_in_context(cid, "let kept = 'yes'")
    # a synchronous loop (vm breakOnSigint) and an await that never settles (the event loop)
    for cell in ("while (true) {}", "await new Promise(() => {})"):
        t0 = time.monotonic()
        r = sb.run_in_context(cid, cell, timeout=0.3)
        assert time.monotonic() - t0 < 5
        assert r.error.name == "KeyboardInterrupt" and "timed out" in r.error.value, r.raw
        assert plain(sb.run_in_context(cid, "kept")) == ["'yes'"]


def test_python_cpu_time_per_cell(client: Any, room_id: str, python_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("python", cpu_time_ms=300).context_id
    sb.run_in_context(cid, "kept = 2")
    # sleeping costs no CPU: a cell may outlive its CPU budget in wall time
    assert "error" not in sb.run_in_context(cid, "import time; time.sleep(0.6)").raw
    t0 = time.monotonic()
    r = sb.run_in_context(cid, "while True:\n    pass", timeout=30)
    assert time.monotonic() - t0 < 10
    assert r.error.name == "KeyboardInterrupt" and "CPU time" in r.error.value, r.raw
    assert plain(sb.run_in_context(cid, "kept")) == ["2"]


def test_typescript_context(client: Any, room_id: str, ts_ok: None) -> None:
    sb = client.sandbox(room_id)
    cid = sb.create_code_context("typescript").context_id
    r = sb.run_in_context(cid, "interface Pt { x: number; y: number }\n"
                          "const p: Pt = { x: 3, y: 4 };\n"
                          "function norm(q: Pt): number { return Math.hypot(q.x, q.y) }")
    assert "error" not in r.raw, r.raw
    assert plain(sb.run_in_context(cid, "norm(p) as number")) == ["5"]
    assert plain(sb.run_in_context(cid, "await Promise.resolve<string>('ok')")) == ["'ok'"]
    r = sb.run_in_context(cid, "const broken: number = ;")
    assert r.error.name == "SyntaxError" and "TS1109" in r.error.value, r.raw
    assert plain(sb.run_in_context(cid, "p.x")) == ["3"]


def test_many_contexts_at_once_die_with_the_room(client: Any, daemon: DaemonProc, room_id: str,
                                                 python_ok: None, node_ok: None) -> None:
    sb = client.sandbox(room_id)
    ids = [sb.create_code_context(lang).context_id
           for lang in ("python", "python", "javascript", "javascript")]
    for i, cid in enumerate(ids):
        sb.run_in_context(cid, f"v = {i}" if i < 2 else f"var v = {i}")
    out: dict[str, Any] = {}

    def cell(cid: str) -> None:
        out[cid] = sb.run_in_context(cid, "v")

    threads = [threading.Thread(target=cell, args=(c,)) for c in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [plain(out[c]) for c in ids] == [["0"], ["1"], ["2"], ["3"]]
    assert {c.status for c in sb.list_code_contexts()} == {"ready"}
    sb.destroy()
    deadline = time.monotonic() + 5
    while (left := strays(daemon) + run_cgroups(daemon)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, left


def test_cwd_env_and_the_context_quota(client: Any, room_id: str, node_ok: None) -> None:
    sb = client.sandbox(room_id)
    sb.exec("mkdir -p /workspace/sub")
    cid = sb.create_code_context("javascript", cwd="sub", env={"GREETING": "hi"}).context_id
    r = sb.run_in_context(cid, "[process.cwd(), process.env.GREETING]")
    assert r.results[0]["application/json"] == ["/workspace/sub", "hi"], r.raw
    more = [sb.create_code_context("javascript").context_id for _ in range(7)]
    with pytest.raises(errors.QuotaExceeded):
        sb.create_code_context("javascript")
    sb.delete_code_context(more[0])
    sb.create_code_context("javascript")
    assert len(sb.list_code_contexts()) == 8


def test_sandboxctl_repl(daemon: DaemonProc, room_id: str, python_ok: None) -> None:
    got = subprocess.run([SANDBOXCTL, "--socket", daemon.socket, "repl", room_id],
                         input="x = 20\ndef f(a):\n    return a * 2\n\nf(x) + 2\n"
                               "print('out')\n1/0\nexit\n",
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout == "42\nout\n", got
    assert "ZeroDivisionError" in got.stderr



def test_a_tree_without_jupyter_is_limit_unavailable(client: Any, daemon: DaemonProc,
                                                     room_id: str, python_ok: None) -> None:
    """A python3 that cannot import jupyter_client (here: shadowed by PYTHONPATH) makes the
    driver exit before ready: LIMIT_UNAVAILABLE naming the package, and nothing left."""
    sb = client.sandbox(room_id)
    sb.write_file("/workspace/fake/jupyter_client.py", "raise ImportError('no jupyter here')\n")
    with pytest.raises(errors.LimitUnavailable, match="python3-ipykernel"):
        sb.create_code_context("python", env={"PYTHONPATH": "/workspace/fake"})
    assert sb.list_code_contexts() == []
    host_ok(daemon, sb)


@pytest.fixture(scope="module")
def tree_daemon(test_user: Any) -> Iterator[Any]:
    """A daemon whose rooms run over the language rootfs (as test_languages.py's)."""
    if not os.path.isdir(os.path.join(ROOTFS, "usr")):
        skip_unless_ci(f"the runtime tree is not built at {ROOTFS} "
                       "(rootfs/build.sh or .ci/rootfs.sh)")
    if not Path(ROOTFS, "usr/lib/python3/dist-packages/ipykernel").is_dir():
        skip_unless_ci(f"the runtime tree at {ROOTFS} predates python3-ipykernel in "
                       "rootfs/packages.txt: rebuild it (.ci/rootfs.sh)")
    from conftest import make_daemon

    d = make_daemon(test_user, rootfs=ROOTFS)
    d.start()
    yield d
    assert d.stop() == 0, d.log()


def test_contexts_over_the_language_tree(tree_daemon: Any) -> None:
    """The language rootfs (rootfs/packages.txt) has what contexts need: ipykernel and the data
    stack for Python, node and typescript for JavaScript and TypeScript."""
    with tree_daemon.client(timeout=600) as c:
        sb = c.sandbox("ctx-tree")
        try:
            cid = sb.create_code_context("python").context_id
            r = sb.run_in_context(cid, "import numpy as np, pandas as pd, scipy\n"
                                  "import matplotlib.pyplot as plt\nplt.plot(np.arange(3))\n"
                                  "plt.show()\npd.DataFrame({'a': [1]})", timeout=120)
            assert "error" not in r.raw, r.raw
            assert any("image/png" in b for b in r.results), r.raw
            assert "<table" in r.results[-1]["text/html"]
            for lang, cell, want in (("javascript", "await Promise.resolve(6 * 7)", "42"),
                                     ("typescript", "const n: number = 42; n", "42")):
                cid = sb.create_code_context(lang).context_id
                assert plain(sb.run_in_context(cid, cell)) == [want], lang
        finally:
            sb.destroy()
