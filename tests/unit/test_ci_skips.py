"""Skips that would keep CI green (issue 24): under CI=true a missing prerequisite fails.

``skip_unless_ci`` is the one way a test skips for a prerequisite CI provides (root, the built
runtime tree, the dev tools); the skips left are about the machine kind (another architecture,
a host without cgroup2 or cgroup.kill, an old systemd) and are listed here with their reason, so
that a new plain ``pytest.skip`` has to be argued for.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import skip_unless_ci

TESTS = Path(__file__).resolve().parents[1]

# (file, text of the skip's reason): skips this machine kind justifies, not a broken CI set-up.
MACHINE_KIND = {
    ("integration/test_cgroup_real.py", "no cgroup2 mount"),
    ("integration/test_cgroup_real.py", "freezer"),
    ("integration/test_cgroup_real.py", "needs root"),  # root: pytest_sessionstart under CI
    ("integration/test_test_users.py", "root"),
    ("integration/test_limits.py", "no cgroup2 mount"),
    ("integration/test_limits.py", "cgroup.kill"),
    ("unit/test_seccomp.py", "x86_64"),
    ("unit/test_seccomp.py", "i386"),
    ("unit/test_server_limits.py", "needs root"),
    ("unit/test_hostsetup.py", "needs root"),
    ("unit/test_systemd_units.py", "systemd"),
    ("unit/test_systemd_units.py", "daemon.py does not exist"),
    ("unit/test_registry.py", "cannot make a user namespace"),
    ("vm/test_vm.py", "in the guest"),  # mirrors a guest test's own skip (checked there)
}
SKIP = re.compile(r"pytest\.(?:skip\(|mark\.skipif\(|importorskip\(|mark\.skip\b)")


def test_skip_unless_ci_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and the prerequisite is missing"):
        skip_unless_ci("no tree")


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_skip_unless_ci_skips_elsewhere(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no tree"):
        skip_unless_ci("no tree")


def test_every_plain_skip_is_justified_by_the_machine_kind() -> None:
    unjustified = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = str(path.relative_to(TESTS))
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if not SKIP.search(line) or rel in ("conftest.py", "unit/test_ci_skips.py"):
                continue
            text = " ".join(lines[i:i + 3])  # the reason may continue on the next lines
            if not any(rel == f and why in text for f, why in MACHINE_KIND):
                unjustified.append(f"{rel}:{i + 1}: {line.strip()}")
    assert unjustified == [], "use conftest.skip_unless_ci, or justify it in MACHINE_KIND"
