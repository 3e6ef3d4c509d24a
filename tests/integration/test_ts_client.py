"""The TypeScript client (clients/typescript) against a real daemon, with Node's own test runner.

The package is copied out of the checkout, installed with ``npm ci`` (its lockfile; the npm cache
outside the checkout) and built with its pinned ``tsc``; each compiled test file of
clients/typescript/test then runs under ``node --test`` with the daemon's socket in
``SANDBOXD_TEST_SOCKET``, and a failure shows node's output. Node is the one scripts/node.sh
installs (``SANDBOXD_NODE_BIN`` overrides); without it these tests skip, and under CI=true fail.

The restart test is driven from here: node makes a call that is in flight when this side kills
and restarts the daemon, and reports what the client said. The seed flow (13 languages) runs
only where the language rootfs is (SANDBOXD_TEST_LANG_ROOTFS, as test_languages.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_daemon, skip_unless_ci

pytestmark = [pytest.mark.integration]

TOP = Path(__file__).resolve().parents[2]
PKG = TOP / "clients" / "typescript"
NODE_BIN = Path(os.environ.get("SANDBOXD_NODE_BIN", "/opt/sandboxd/node/bin"))
NPM_CACHE = os.environ.get("SANDBOXD_NPM_CACHE", "/var/cache/sandboxd-npm")
LANG_ROOTFS = os.environ.get("SANDBOXD_TEST_LANG_ROOTFS", "/var/lib/sandboxd/rootfs/default")
#: the files of test/ that run against the session daemon (the others need their own set-up)
SUITES = ["methods", "streaming", "concurrency", "errors", "bad_input"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("npm_")}
    env["PATH"] = f"{NODE_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def _run(argv: list[str], cwd: Path, timeout: float,
         **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=_env(**extra), capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, installed (npm ci) and compiled (tsc) in a copy outside the checkout."""
    node = NODE_BIN / "node"
    if not node.exists():
        skip_unless_ci(f"node is not installed at {NODE_BIN} (scripts/node.sh, which "
                       "`scripts/deps.sh --tests` runs)")
    out = _run([str(node), "--version"], TOP, 30)
    major = int(out.stdout.strip().lstrip("v").split(".")[0])
    assert major >= 20, f"node {out.stdout.strip()} is older than the package's engines (>=20)"
    dest = tmp_path_factory.mktemp("ts") / "typescript"
    shutil.copytree(PKG, dest, ignore=shutil.ignore_patterns("node_modules", "dist"))
    ci = _run([str(NODE_BIN / "npm"), "ci", "--no-audit", "--no-fund", "--cache", NPM_CACHE],
              dest, 300)
    assert ci.returncode == 0, f"npm ci failed:\n{ci.stdout}\n{ci.stderr}"
    tsc = _run([str(node), "node_modules/typescript/bin/tsc", "-p", "."], dest, 300)
    assert tsc.returncode == 0, f"tsc failed:\n{tsc.stdout}\n{tsc.stderr}"
    return dest


def _node_test(built: Path, name: str, timeout: float = 280, min_tests: int = 1,
               **env: str) -> None:
    test = built / "dist" / "test" / f"{name}.test.js"
    assert test.exists(), f"{test} was not built"
    r = _run([str(NODE_BIN / "node"), "--test", "--test-reporter=spec", str(test)], built,
             timeout, **env)
    assert r.returncode == 0, f"node --test {name} failed:\n{r.stdout[-15000:]}\n{r.stderr[-5000:]}"
    # A suite that ran nothing, or skipped some, would pass: every test must have passed.
    counts = dict(re.findall("^\u2139 (tests|pass|skipped|todo) (\\d+)$", r.stdout, re.M))
    assert int(counts.get("tests", 0)) >= min_tests, f"too few tests ran:\n{r.stdout[-3000:]}"
    assert counts.get("pass") == counts["tests"], r.stdout[-3000:]
    assert counts.get("skipped") == "0" and counts.get("todo") == "0", r.stdout[-3000:]


@pytest.mark.parametrize("suite", SUITES)
def test_node_suite(built: Path, daemon: Any, suite: str) -> None:
    _node_test(built, suite, SANDBOXD_TEST_SOCKET=daemon.socket)


def test_daemon_restart_mid_call_then_reconnect(built: Path, fresh_daemon: Any) -> None:
    """A call in flight when the daemon dies fails with a clear DaemonUnreachable; the next
    call on the same client reconnects to the restarted daemon and works."""
    d = fresh_daemon
    d.start()
    script = built / "dist" / "test" / "restart.drive.js"
    proc = subprocess.Popen([str(NODE_BIN / "node"), str(script)], cwd=built,
                            env=_env(SANDBOXD_TEST_SOCKET=d.socket), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line.strip() == "IN-FLIGHT", f"node said {line!r}: {proc.stderr.read()}"
        d.stop(signal.SIGKILL)
        d.start()
        proc.stdin.write("RESTARTED\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"restart driver failed:\n{line}{out}\n{err}"
    assert "OK" in out.split(), out


def test_restart_driver_fails_without_a_restart(built: Path, fresh_daemon: Any) -> None:
    """The driver's checks can fail: if the daemon is never stopped, the in-flight call ends
    normally and the driver says so (exit 1)."""
    d = fresh_daemon
    d.start()
    script = built / "dist" / "test" / "restart.drive.js"
    proc = subprocess.Popen([str(NODE_BIN / "node"), str(script)], cwd=built,
                            env=_env(SANDBOXD_TEST_SOCKET=d.socket, SANDBOXD_TEST_HOLD_S="1"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate("RESTARTED\n", timeout=120)
    assert proc.returncode == 1, f"{out}\n{err}"
    assert "the in-flight call did not fail" in err


@pytest.fixture(scope="module")
def lang_daemon(test_user: Any) -> Iterator[Any]:
    if not os.path.isdir(os.path.join(LANG_ROOTFS, "usr")):
        skip_unless_ci(f"the runtime tree is not built at {LANG_ROOTFS} "
                       "(rootfs/build.sh or .ci/rootfs.sh)")
    d = make_daemon(test_user, rootfs=LANG_ROOTFS)
    d.start()
    yield d
    assert d.stop() == 0, d.log()
    assert d.leftovers() == []


@pytest.mark.rootfs
@pytest.mark.timeout(1200)
def test_seed_flow_all_languages(built: Path, lang_daemon: Any) -> None:
    """examples/seed-flow.ts (the seed's snippets verbatim) in all 13 languages."""
    _node_test(built, "seed_flow", timeout=1100, min_tests=18,
               SANDBOXD_TEST_SOCKET=lang_daemon.socket, SANDBOXD_SOCKET=lang_daemon.socket)


def test_seed_flow_is_the_seed_verbatim() -> None:
    """The three snippets of examples/seed-cloudflare-sandbox.md appear in seed-flow.ts line
    for line, but for their import lines."""
    doc = (TOP / "examples" / "seed-cloudflare-sandbox.md").read_text()
    flow = (PKG / "examples" / "seed-flow.ts").read_text()
    blocks = {}
    for title in ("Basic Code Execution", "Using the CodeRunService",
                  "Example: Complete Code Execution Flow"):
        section = doc.split(f"### {title}\n" if not title.startswith("Example") else
                            f"## {title}\n", 1)[1]
        body = section.split("```typescript\n", 1)[1].split("```", 1)[0]
        lines = [ln for ln in body.splitlines() if not ln.startswith("import ")]
        while lines and not lines[0].strip():
            lines.pop(0)
        blocks[title] = "\n".join(lines)
    for title, text in blocks.items():
        assert text in flow, f"seed-flow.ts lacks the seed's {title!r} snippet verbatim"
    imports = [ln for ln in flow.splitlines() if ln.startswith("import ")]
    assert imports and all("'@sandboxd/client'" in ln or '"@sandboxd/client"' in ln
                           or "node:" in ln for ln in imports), imports


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
