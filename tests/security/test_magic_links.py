"""A run's cwd and program are resolved inside the room, never through the init's magic links.

Issue 10, C1 (critical), H1 and M6. The room init holds directory fds of its own cgroup leaves on
the *host's* cgroupfs (the fast spawn path steps back through them). ``chdir(cwd)`` in the init
resolved ``/proc/self/fd/N`` through the init's own fd table: ``cwd: /proc/self/fd/3`` put the
payload on the host cgroupfs, ``..`` walked up the host's mount tree, and in single-id mode (room
root = the daemon's uid) the payload listed the host's root and wrote into the daemon user's
home. In subordinate mode the payload wrote its pid into the init's leaf ``cgroup.procs`` and
escaped its run's limits (H1). ``command: /proc/self/exe`` ran the host's Python in the room
(M6). Each attack runs on both spawn paths (posix_spawn in the init; fork, forced here by a
``fileSizeBytes`` limit) and in both id modes, against a daemon of this module's own.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from typing import Any

import pytest
from sec_helpers import client_of, sec_user, start_daemon, stop_and_check

from sandboxd.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.security]
__all__ = ["sec_user"]  # the fixture, imported for pytest

FORK_PATH = {"fileSizeBytes": 1 << 30}  # an rlimit: the init forks instead of posix_spawn
PATHS = {"spawn": None, "fork": FORK_PATH}
MAGIC = ["/proc/self/fd/{n}", "/proc/1/fd/{n}", "/proc/self/cwd", "/proc/self/root",
         "/proc/1/cwd", "/proc/1/root", "/proc/self/fd/{n}/.."]


@pytest.fixture(scope="module", params=["subordinate", "single"])
def mode_daemon(request: pytest.FixtureRequest, sec_user: pwd.struct_passwd
                ) -> Iterator[tuple[str, Any]]:
    """A daemon with subordinate id slices, and one in single-id mode (no newuidmap on its
    PATH, as the review reproduced it): there the room's root *is* the daemon's uid, so
    nothing but path resolution stands between a payload and the daemon user's files."""
    d = start_daemon(sec_user, id_mode=request.param)
    yield request.param, d
    stop_and_check(d)


@pytest.fixture
def sb(mode_daemon: tuple[str, Any], room_id: str) -> Iterator[Any]:
    _, d = mode_daemon
    c: Client = client_of(d)
    box = c.sandbox(room_id[:50])
    yield box
    box.destroy()
    c.close()


def _targets() -> list[str]:
    return sorted({m.format(n=n) for m in MAGIC for n in range(0, 12)})


@pytest.mark.parametrize("path", PATHS)
def test_cwd_never_resolves_through_magic_links(sb: Any, mode_daemon: tuple[str, Any],
                                                path: str) -> None:
    _, d = mode_daemon
    home = d.user.pw_dir
    sentinel = os.path.join(home, f"PWNED-{sb.id}")
    attack = (f"stat -f -c %T . ; cd ../../../../../../../../../.. && ls; "
              f"echo pwned > {home}/PWNED-{sb.id}")
    escaped = []
    for cwd in _targets():
        r = sb.exec(attack, cwd=cwd, limits=PATHS[path])
        if r.exit_code == 0 or r.stdout:
            escaped.append((cwd, r.exit_code, r.stdout[:200]))
        else:
            assert "sandboxd: cwd" in r.stderr, (cwd, r.stderr)
    assert not escaped, f"a cwd through the init's magic links worked: {escaped}"
    assert not os.path.exists(sentinel)
    # The room is unharmed, and an honest cwd still works.
    assert sb.exec("pwd", cwd="/tmp", limits=PATHS[path]).stdout == "/tmp\n"


@pytest.mark.parametrize("path", PATHS)
def test_planted_symlink_to_init_fd_is_not_a_way_out(sb: Any, path: str) -> None:
    """Room code alone: it plants the link, and a well-meaning client later uses it as cwd."""
    sb.exec("for n in 0 1 2 3 4 5 6 7 8 9; do ln -s /proc/self/fd/$n /workspace/proj$n; done;"
            " ln -s /proc/1/cwd /workspace/initcwd; ln -s /tmp /workspace/honest")
    for name in [*(f"proj{n}" for n in range(10)), "initcwd"]:
        r = sb.exec("stat -f -c %T .", cwd=f"/workspace/{name}", limits=PATHS[path])
        assert r.exit_code != 0 and not r.stdout, (name, r)
    # Ordinary symlinks (and relative cwds, against /workspace) keep working.
    assert sb.exec("pwd -P", cwd="/workspace/honest", limits=PATHS[path]).stdout == "/tmp\n"
    sb.exec("mkdir -p /workspace/sub/dir")
    assert sb.exec("pwd", cwd="sub/dir", limits=PATHS[path]).stdout == "/workspace/sub/dir\n"


@pytest.mark.parametrize("path", PATHS)
def test_run_cannot_leave_its_cgroup_through_the_init_leaf(sb: Any, path: str) -> None:
    """H1: the payload moved itself into the init's leaf and beat its CPU limit (OK, 2 ms)."""
    limits = {"cpuTimeMs": 300, **(PATHS[path] or {})}
    for n in range(0, 12):
        r = sb.exec("echo $$ > cgroup.procs && "
                    "end=$(($(date +%s) + 3)); while [ $(date +%s) -lt $end ]; do :; done",
                    cwd=f"/proc/self/fd/{n}", limits=limits)
        assert r.status != "OK", (n, r)
        assert r.exit_code != 0


@pytest.mark.parametrize("path", PATHS)
def test_program_never_resolves_through_magic_links(sb: Any, path: str) -> None:
    """M6: /proc/self/exe of the init (or of the payload child before exec) is the host's
    Python; a program path is looked up in the room without magic links, PATH entries too."""
    sb.exec("ln -s /proc/self/exe /workspace/py; mkdir -p /workspace/bin;"
            " ln -s /proc/self/exe /workspace/bin/hostpy")
    for argv in (["/proc/self/exe", "-c", "print('host python')"],
                 ["/proc/1/exe", "-c", "print('host python')"],
                 ["/workspace/py", "-c", "print('host python')"],
                 ["/proc/self/fd/3/cgroup.procs"]):
        r = sb.exec(argv[0], argv[1:], limits=PATHS[path])
        assert r.exit_code == 126 and not r.stdout, (argv, r)
        assert "sandboxd:" in r.stderr
    r = sb.exec("hostpy", ["-c", "print('host python')"], env={"PATH": "/workspace/bin"},
                limits=PATHS[path])
    assert r.exit_code == 126 and not r.stdout, r
    r = sb.exec("exe", ["-c", "print('host python')"], env={"PATH": "/proc/self:/usr/bin"},
                limits=PATHS[path])
    assert r.exit_code == 126 and not r.stdout, r


@pytest.mark.parametrize("path", PATHS)
def test_program_lookup_keeps_execvp_semantics(sb: Any, path: str) -> None:
    """The positive control: what execvp found before is still found, and failures keep their
    shell exit codes (127 not found, 126 not executable)."""
    lim = PATHS[path]
    assert sb.exec("sh", ["-c", "echo ok"], limits=lim).stdout == "ok\n"
    sb.exec("printf '#!/bin/sh\\necho script $0\\n' > /workspace/s.sh; chmod +x /workspace/s.sh;"
            " cp /workspace/s.sh /workspace/noexec.sh; chmod -x /workspace/noexec.sh;"
            " mkdir -p /workspace/d; ln -sf /workspace/s.sh /workspace/link.sh")
    assert sb.exec("./s.sh", [], limits=lim).stdout == "script ./s.sh\n"
    assert sb.exec("/workspace/link.sh", [], limits=lim).stdout == "script /workspace/link.sh\n"
    assert sb.exec("s.sh", [], env={"PATH": "/nowhere:/workspace"}, limits=lim).exit_code == 0
    assert sb.exec("noexec.sh", [], env={"PATH": "/workspace"}, limits=lim).exit_code == 126
    assert sb.exec("./noexec.sh", [], limits=lim).exit_code == 126
    assert sb.exec("/workspace/d", [], limits=lim).exit_code == 126
    r = sb.exec("no-such-program", [], limits=lim)
    assert r.exit_code == 127 and "no-such-program" in r.stderr
    assert sb.exec("true", [], env={"PATH": ""}, limits=lim).exit_code == 127
