"""The pure validators and verdicts, table-driven, without privileges (issue 24's mutants).

Each table row is a case a wrong answer would turn into a security bug or a wrong verdict: the
mutants that survived every other test (C01 a newline at the end of a sandbox id, C03 a '.'
inside one, V01 an OOM-killed main process reported SG, S08 the filter installed without
TSYNC_ESRCH, G01 the cpu-quota floor) and the path resolution of issue 10's C1/M6.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from sandboxd import errors, protocol, runs
from sandboxd import roomfiles as files
from sandboxd.api import git
from sandboxd.config import check_sandbox_id
from sandboxd.jail import _syscalls, fileops, init, messages, seccomp
from sandboxd.jail.cgroup import tree
from sandboxd.jail.cgroup.interface import CgroupStats
from sandboxd.jail.fileops import resolve

# --- sandbox ids ---------------------------------------------------------------------------------

GOOD_IDS = ["a", "A", "0", "_", "a-b", "a_b", "x" * 63, "room-1", "R2d2_"]
BAD_IDS = ["", "-a", "a-", "a\n", "\na", "a.b", ".", "..", "a/b", "a b", "x" * 64, "é",
           "a\x00", "a:b", "a\t", None, 5, ["a"]]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_sandbox_id_accepted(value: str) -> None:
    assert check_sandbox_id(value) == value


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
def test_sandbox_id_refused(value: Any) -> None:
    with pytest.raises(errors.InvalidSandboxId):
        check_sandbox_id(value)


# --- user paths ----------------------------------------------------------------------------------

PATHS = [("x", "/workspace/x"), ("/x", "/x"), ("a/../b", "/workspace/b"),
         ("../../..", "/"), ("//etc", "/etc"), ("/a/./b/", "/a/b"), ("/", "/"),
         ("workspace/..", "/workspace")]


@pytest.mark.parametrize(("path", "want"), PATHS)
def test_resolve_is_lexical_and_rooted(path: str, want: str) -> None:
    assert resolve(path) == want


@pytest.mark.parametrize("path", ["", "a\x00b", None, 3])
def test_resolve_refuses(path: Any) -> None:
    with pytest.raises(OSError) as err:
        resolve(path)
    assert err.value.errno == errno.EINVAL


# --- the file API's path bound (A01) and errno mapping (A03) -------------------------------------


@pytest.mark.parametrize("n", [1, protocol.MAX_PATH - 1, protocol.MAX_PATH])
def test_check_path_accepts_up_to_max_path(n: int) -> None:
    # A01: exactly MAX_PATH (4096) characters is a valid path; one more is not.
    assert files.check_path("x" * n) == "x" * n


@pytest.mark.parametrize("path", ["", "a\x00b", "x" * (protocol.MAX_PATH + 1)], ids=len)
def test_check_path_refuses(path: str) -> None:
    with pytest.raises(errors.ValidationError) as err:
        files.check_path(path, field="oldPath")
    assert err.value.context["field"] == "oldPath"


ERRNOS = [
    (errno.ENOENT, errors.FileNotFound), (errno.EISDIR, errors.IsDirectory),
    (errno.ENOTDIR, errors.NotDirectory), (errno.EEXIST, errors.FileExists),
    (errno.ENOTEMPTY, errors.FileExists), (errno.EACCES, errors.PermissionDenied),
    (errno.EPERM, errors.PermissionDenied),
    # A03: a magic link (or a symlink loop) on the way is "permission denied", not a file error
    (errno.ELOOP, errors.PermissionDenied),
    (errno.EBUSY, errors.PermissionDenied), (errno.ENOSPC, errors.NoSpace),
    (errno.EDQUOT, errors.NoSpace), (errno.EFBIG, errors.NoSpace), (errno.EROFS, errors.ReadOnly),
    (errno.EINVAL, errors.ValidationError), (errno.ENAMETOOLONG, errors.ValidationError),
    (errno.EXDEV, errors.ValidationError), (errno.EIO, errors.FileError),
]


@pytest.mark.parametrize(("num", "cls"), ERRNOS, ids=lambda v: getattr(v, "__name__", v))
def test_file_error_mapping(num: int, cls: type[errors.SandboxError]) -> None:
    err = files.file_error(num, os.strerror(num), "/w/p")
    assert type(err) is cls
    assert err.context["path"] == "/w/p"


# --- regular files only: the daemon's fence (A02) and the init's after open (F04) ---------------


def test_daemon_uses_only_regular_fds(tmp_path: Path) -> None:
    # A02: the daemon fstat()s every fd the init hands it; anything but a regular file is refused.
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    fd = os.open(f, os.O_RDONLY)
    r, w = os.pipe()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert files._regular(fd, "f").st_size == 3
        for other in (r, dfd):
            with pytest.raises(errors.PermissionDenied):
                files._regular(other, "x")
    finally:
        for x in (fd, r, w, dfd):
            os.close(x)


def test_open_read_checks_the_opened_file_not_only_the_stat(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    # F04: a FIFO swapped in between the stat and the open must still be refused, by the fstat of
    # the opened fd. The swap is played by a stat() that reports the FIFO as a regular file.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    real_stat = os.stat

    def stat_(path: Any, *a: Any, **kw: Any) -> os.stat_result:
        return real_stat(plain if str(path) == str(fifo) else path, *a, **kw)

    monkeypatch.setattr(fileops.os, "stat", stat_)
    with pytest.raises(OSError) as err:
        _, fd = fileops.open_read(messages.OpenRead(path=str(fifo)))
        os.close(fd)
    assert err.value.errno == errno.EPERM
    reply, fd = fileops.open_read(messages.OpenRead(path=str(plain)))
    try:
        assert reply.size == 1
    finally:
        os.close(fd)


# --- argv and environment ------------------------------------------------------------------------


def test_check_argv_bounds() -> None:
    runs.check_argv(["x" * (runs.MAX_ARGV_ENV_BYTES - 10)], {})
    with pytest.raises(errors.ValidationError) as err:
        runs.check_argv(["x" * runs.MAX_ARGV_ENV_BYTES], {})
    assert err.value.context["limit"] == "argvEnvBytes"
    with pytest.raises(errors.ValidationError):
        runs.check_argv(["a"], {"K": "v" * runs.MAX_ARGV_ENV_BYTES})
    for argv, env in ((["a\x00"], {}), (["a"], {"": "v"}), (["a"], {"A=B": "v"}),
                      (["a"], {"A": "v\x00"}), (["a"], {"A\x00": "v"})):
        with pytest.raises(errors.ValidationError):
            runs.check_argv(argv, env)


# --- cwd and program lookup (issue 10, C1/M6): magic links refused ------------------------------


def test_enter_cwd_refuses_magic_links(tmp_path: Path) -> None:
    here = os.getcwd()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    (tmp_path / "link").symlink_to(f"/proc/self/fd/{fd}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "honest").symlink_to(tmp_path / "sub")
    try:
        for cwd in (f"/proc/self/fd/{fd}", "/proc/self/cwd", "/proc/self/root",
                    str(tmp_path / "link")):
            with pytest.raises(OSError) as err:
                init.enter_cwd(cwd)
            assert err.value.errno == errno.ELOOP, cwd
        init.enter_cwd(str(tmp_path / "honest"))
        assert os.getcwd() == str(tmp_path / "sub")
    finally:
        os.chdir(here)
        os.close(fd)


def test_find_executable_keeps_execvp_rules_and_refuses_magic_links(tmp_path: Path) -> None:
    prog = tmp_path / "prog"
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    plain = tmp_path / "plain"
    plain.write_text("")
    plain.chmod(0o644)
    (tmp_path / "exe").symlink_to("/proc/self/exe")
    (tmp_path / "lnk").symlink_to(prog)
    d = str(tmp_path)
    assert init.find_executable("prog", f"/nonexistent:{d}") == f"{d}/prog"
    assert init.find_executable("lnk", d) == f"{d}/lnk"
    assert init.find_executable(f"{d}/prog", "") == f"{d}/prog"
    cases = [("missing", d, errno.ENOENT), ("plain", d, errno.EACCES),
             (f"{d}/plain", "", errno.EACCES), ("", d, errno.ENOENT),
             (d, "", errno.EACCES),  # a directory
             ("exe", d, errno.ELOOP), (f"{d}/exe", "", errno.ELOOP),
             ("/proc/self/exe", "", errno.ELOOP), ("exe", "/proc/self", errno.ELOOP)]
    for name, path, want in cases:
        with pytest.raises(OSError) as err:
            init.find_executable(name, path)
        assert err.value.errno == want, (name, path, err.value)
    # EACCES is remembered over a later ENOENT, as execvp does; a later hit still wins.
    with pytest.raises(OSError) as err:
        init.find_executable("plain", f"{d}:/nonexistent")
    assert err.value.errno == errno.EACCES
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "plain").write_text("")
    (tmp_path / "bin" / "plain").chmod(0o755)
    assert init.find_executable("plain", f"{d}:{d}/bin") == f"{d}/bin/plain"


# --- verdicts ------------------------------------------------------------------------------------

_OUT = runs.Output(b"", False)


def _verdict(status: int, killed: str | None = None, oom: bool = False,
             failure: dict[str, Any] | None = None, **stats: Any) -> runs.RunResult:
    msg = messages.Exit(run="1", status=status,
                        failure=None if failure is None else messages.Failure(**failure))
    return runs.verdict(msg, killed, oom, _OUT, _OUT, 5, CgroupStats(**stats))


def _signalled(sig: int) -> int:
    return sig  # a wait status for "killed by sig" is the signal number itself


VERDICTS = [
    # (wait status, our kill, oom, failure) -> (status, exit code, limitExceeded)
    ((0, None, False, None), ("OK", 0, None)),
    ((3 << 8, None, False, None), ("RE", 3, None)),
    ((137 << 8, None, False, None), ("RE", 137, None)),  # a shell reporting a kill is an exit
    ((_signalled(signal.SIGSEGV), None, False, None), ("SG", 128 + signal.SIGSEGV, None)),
    # V01: the main process itself OOM-killed (argv form, no shell): ML, not SG
    ((_signalled(signal.SIGKILL), None, True, None), ("ML", 137, "memory")),
    ((137 << 8, None, True, None), ("ML", 137, "memory")),
    ((_signalled(signal.SIGKILL), "wall", True, None), ("TO", 124, "wall")),
    ((_signalled(signal.SIGKILL), "cpu", False, None), ("TO", 124, "cpu")),
    ((_signalled(signal.SIGKILL), "output", True, None), ("OL", 137, "output")),
    ((1 << 8, None, False, {"stage": "cgroup", "errno": errno.EACCES}), ("XX", 1, None)),
    ((127 << 8, None, False, {"stage": "exec", "errno": errno.ENOENT}), ("RE", 127, None)),
    ((1 << 8, None, False, {"stage": "chdir", "errno": errno.ELOOP}), ("RE", 1, None)),
]


@pytest.mark.parametrize(("given", "want"), VERDICTS)
def test_verdict_table(given: tuple[Any, ...], want: tuple[Any, ...]) -> None:
    status, killed, oom, failure = given
    r = _verdict(status, killed, oom, failure)
    assert (r.status, r.exit_code, r.limit_exceeded) == want


def test_pids_limit_is_named_without_changing_the_status() -> None:
    r = _verdict(0, pids_limit_hits=2)
    assert (r.status, r.limit_exceeded) == ("OK", "pids")


# --- kernel-facing constants --------------------------------------------------------------------


@pytest.mark.parametrize(("cpus", "quota"), [(0.0001, 1000), (0.01, 1000), (0.5, 50000),
                                             (2.0, 200000)])
def test_cpu_quota_floor(cpus: float, quota: int) -> None:
    # G01: the kernel refuses quotas below 1 ms (EINVAL): the floor keeps tiny cpus valid.
    assert tree.cpu_quota(cpus) == quota


def test_seccomp_install_asks_for_tsync_esrch(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(seccomp.prctl, "set_no_new_privs", lambda v: None)
    monkeypatch.setattr(_syscalls, "seccomp_set_filter", lambda bpf, flags: seen.append(flags))
    seccomp.install(b"\0" * 8)
    assert seen and seen[0] & seccomp.SECCOMP_FILTER_FLAG_TSYNC_ESRCH
    assert seen[0] & seccomp.SECCOMP_FILTER_FLAG_TSYNC


# --- git URLs and branches ------------------------------------------------------------------------

GOOD_URLS = ["https://example.com/a/b.git", "http://h/x", "git://h/x", "ssh://git@h/x",
             "file:///srv/repo", "git+ssh://h/x", "/srv/repo", "git@github.com:o/r.git",
             "host:path/repo", "x" * 10 + ":" + "y" * (git.MAX_URL - 11)]
BAD_URLS = ["", "-uhttps://h/x", "-oProxyCommand=x:r", "-h:o/r", "--upload-pack=touch /tmp/p",
            "ext::sh -c touch% /tmp/p",
            "fd::17", "https://h/x y", "https://h/x\n", "https://h/\x7f", "relative/path",
            "host://x", "https://h/" + "x" * git.MAX_URL, "transport::https://h/x"]


@pytest.mark.parametrize("url", GOOD_URLS, ids=lambda u: u[:40])
def test_git_url_accepted(url: str) -> None:
    assert git.check_url(url) == url


@pytest.mark.parametrize("url", BAD_URLS, ids=lambda u: repr(u[:40]))
def test_git_url_refused(url: str) -> None:
    with pytest.raises(errors.InvalidGitUrl):
        git.check_url(url)


@pytest.mark.parametrize("branch", ["main", "feature/x", "v1.2", "a-b_c", "release/2024.1"])
def test_git_branch_accepted(branch: str) -> None:
    assert not git._BRANCH_BAD.search(branch)


@pytest.mark.parametrize("branch", ["-f", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[",
                                    "a\\b", "a@{1}", "/a", "a/", "x.lock", "@", "a//b", "a.",
                                    "a\x00", "a\x7f"], ids=repr)
def test_git_branch_refused(branch: str) -> None:
    assert git._BRANCH_BAD.search(branch)


@pytest.mark.parametrize(("url", "name"), [("https://h/o/r.git", "r"), ("https://h/o/r/", "r"),
                                           ("git@h:o/r.git", "r"), ("/srv/r/.git", "r"),
                                           ("https://h/..", "repo"), ("host:.git", "repo")])
def test_git_repo_name(url: str, name: str) -> None:
    assert git.repo_name(url) == name


@pytest.mark.parametrize(("stderr", "cls"), [
    ("fatal: Remote branch nope not found in upstream origin", errors.GitBranchNotFound),
    ("fatal: repository 'https://h/x/' not found", errors.GitRepositoryNotFound),
    ("fatal: '/srv/x' does not appear to be a git repository", errors.GitRepositoryNotFound),
    ("fatal: transport 'ext' not allowed", errors.InvalidGitUrl),
    ("git: 'remote-zz' is not a git command\nfatal: Unable to find remote helper for 'zz'",
     errors.InvalidGitUrl),
    ("fatal: early EOF", errors.GitCloneFailed), ("", errors.GitCloneFailed)])
def test_git_errors_classified(stderr: str, cls: type[errors.SandboxError]) -> None:
    assert type(git.classify(stderr, "u", "b")) is cls
