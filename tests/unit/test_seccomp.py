"""The syscall filter, tested in forked children: the parent pytest process never installs it.

Each child calls :func:`seccomp.install`, runs a set of probes (raw syscalls through libc's
``syscall()``, numbers written out by hand for x86_64 so libseccomp's own table is cross-checked),
and reports ``[return value, errno]`` per probe through a pipe. The same probes run once without
the filter: a probe whose unfiltered result equals the filtered one proves nothing, and
``test_probes_are_meaningful`` says so.

The probes are chosen to be harmless if the filter failed (the tests run as root): bad pointers,
bad fds, invalid flags, missing paths, read-only queries.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import mmap
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandboxd.jail import seccomp

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64",
                                reason="raw syscall numbers below are x86_64's")

DOC = Path(__file__).resolve().parents[2] / "docs" / "security.md"
BPF = seccomp.build_filter()

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

NR = {
    "ioctl": 16, "getpid": 39, "socket": 41, "clone": 56, "fcntl": 72, "syslog": 103,
    "personality": 135, "vhangup": 153, "pivot_root": 155, "adjtimex": 159, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "iopl": 172, "ioperm": 173, "init_module": 175, "delete_module": 176,
    "quotactl": 179, "nfsservctl": 180, "lookup_dcookie": 212, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "setns": 308, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "clone3": 435, "mount_setattr": 442, "quotactl_fd": 443, "open_tree_attr": 467,
}
X32_SYSCALL_BIT = 0x4000_0000
MISSING = b"/nonexistent-sandboxd-seccomp-test"
ADDR_NO_RANDOMIZE = 0x0040000
READ_IMPLIES_EXEC = 0x0400000
TIOCGWINSZ = 0x5413
F_GETFL = 3
F_RDLCK = 0
_WALL = 0x4000_0000
# <linux/sched.h>'s namespace flags, written out here and NOT read from seccomp.py: the clone and
# unshare probes below come from this table, so a filter table that lost, mistyped or shifted a
# flag fails test_denied (a probe built from the table under test would agree with any table).
LINUX_CLONE_NS_FLAGS = {
    "CLONE_NEWTIME": 0x0000_0080,
    "CLONE_NEWNS": 0x0002_0000,
    "CLONE_NEWCGROUP": 0x0200_0000,
    "CLONE_NEWUTS": 0x0400_0000,
    "CLONE_NEWIPC": 0x0800_0000,
    "CLONE_NEWUSER": 0x1000_0000,
    "CLONE_NEWPID": 0x2000_0000,
    "CLONE_NEWNET": 0x4000_0000,
}
CLONE_NEWUSER = LINUX_CLONE_NS_FLAGS["CLONE_NEWUSER"]
CLONE_FS = 0x0000_0200


def _sys(nr: int, *args: int | bytes | None) -> tuple[int, int]:
    """Raw syscall; every argument passed as a full 64-bit register (not a C int)."""
    conv = [ctypes.c_char_p(a) if isinstance(a, bytes) or a is None else ctypes.c_long(a)
            for a in args]
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(nr), *conv)
    return ret, (ctypes.get_errno() if ret == -1 else 0)


def _clone(flags: int) -> tuple[int, int]:
    """clone(flags) with fork semantics; a child that should not exist leaves at once."""
    ret, err = _sys(NR["clone"], flags, 0, 0, 0, 0)
    if ret == 0:
        os._exit(0)
    if ret > 0:
        os.waitpid(ret, _WALL)  # also reaps children whose exit signal is not SIGCHLD
        return 0, 0  # "it worked", comparable across runs
    return ret, err


# --- the child harness ---------------------------------------------------------------------------


def _in_child(body: Callable[[], Any], *, filtered: bool) -> Any:
    """Run ``body`` in a forked child (own session, filter installed if asked); return its result.

    ``filtered=False`` in a child that has the filter still runs under it (filters are inherited).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(r)
            os.setsid()  # no controlling tty: vhangup and TIOCSTI probes cannot touch ours
            if filtered:
                seccomp.install(BPF)
            out: dict[str, Any] = {"ok": body()}
            status = 0
        except BaseException:  # noqa: BLE001 -- any failure is reported; never return to pytest
            out = {"error": traceback.format_exc()}
        finally:
            try:
                os.write(w, json.dumps(out).encode())
            finally:
                os._exit(status)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        raise AssertionError(f"child died without a report: wait status {status:#x}")
    out = json.loads(b"".join(chunks))
    if "error" in out:
        raise AssertionError("child failed:\n" + out["error"])
    return out["ok"]


# --- probes that must be denied ------------------------------------------------------------------

def _denied_probes() -> dict[str, Callable[[], tuple[int, int]]]:
    s, n = _sys, NR
    p: dict[str, Callable[[], tuple[int, int]]] = {
        "keyctl": lambda: s(n["keyctl"], 0, -3, 0),  # KEYCTL_GET_KEYRING_ID, session keyring
        "add_key": lambda: s(n["add_key"], None, None, None, 0, 0),
        "request_key": lambda: s(n["request_key"], None, None, None, 0),
        "bpf": lambda: s(n["bpf"], -1, 0, 0),
        "perf_event_open": lambda: s(n["perf_event_open"], 0, 0, -1, -1, 0),
        "userfaultfd": lambda: s(n["userfaultfd"], 0),
        "kexec_load": lambda: s(n["kexec_load"], 0, 0, 0, 0xDEAD_0000),
        "kexec_file_load": lambda: s(n["kexec_file_load"], -1, -1, 0, 0, 0xDEAD_0000),
        "init_module": lambda: s(n["init_module"], 0, 0, 0),
        "finit_module": lambda: s(n["finit_module"], -1, 0, 0),
        "delete_module": lambda: s(n["delete_module"], 0, 0),
        "mount": lambda: s(n["mount"], None, None, None, 0, 0),
        "umount2": lambda: s(n["umount2"], MISSING, 0),
        "pivot_root": lambda: s(n["pivot_root"], None, None),
        "fsopen": lambda: s(n["fsopen"], None, 0),
        "fsconfig": lambda: s(n["fsconfig"], -1, 0, None, None, 0),
        "fsmount": lambda: s(n["fsmount"], -1, 0, 0),
        "fspick": lambda: s(n["fspick"], -1, None, 0),
        "move_mount": lambda: s(n["move_mount"], -1, None, -1, None, 0),
        "open_tree": lambda: s(n["open_tree"], -1, None, 0),
        "mount_setattr": lambda: s(n["mount_setattr"], -1, None, 0, 0, 0),
        "open_tree_attr": lambda: s(n["open_tree_attr"], -1, None, 0, 0, 0),
        "unshare(0)": lambda: s(n["unshare"], 0),
        "unshare(CLONE_NEWUSER)": lambda: s(n["unshare"], CLONE_NEWUSER),
        "setns": lambda: s(n["setns"], -1, 0),
        "clone3": lambda: s(n["clone3"], 0, 0),
        "open_by_handle_at": lambda: s(n["open_by_handle_at"], -1, None, 0),
        "name_to_handle_at": lambda: s(n["name_to_handle_at"], -100, None, None, None, 0),
        "io_uring_setup": lambda: s(n["io_uring_setup"], 0, None),
        "io_uring_enter": lambda: s(n["io_uring_enter"], -1, 0, 0, 0, None, 0),
        "io_uring_register": lambda: s(n["io_uring_register"], -1, 0, None, 0),
        "socket(AF_VSOCK)": lambda: s(n["socket"], seccomp.AF_VSOCK, 1, 0),
        # the kernel reads domain as an int: high bits must not slip the rule
        "socket(AF_VSOCK | 1<<32)": lambda: s(n["socket"], (1 << 32) | seccomp.AF_VSOCK, 1, 0),
        "acct": lambda: s(n["acct"], MISSING),
        "swapon": lambda: s(n["swapon"], MISSING, 0),
        "swapoff": lambda: s(n["swapoff"], MISSING),
        "reboot": lambda: s(n["reboot"], 0, 0, 0, None),  # bad magic: EINVAL if not filtered
        "syslog": lambda: s(n["syslog"], 10, None, 0),  # SYSLOG_ACTION_SIZE_BUFFER
        "lookup_dcookie": lambda: s(n["lookup_dcookie"], 0, None, 0),
        "quotactl": lambda: s(n["quotactl"], 0, None, 0, None),
        "quotactl_fd": lambda: s(n["quotactl_fd"], -1, 0, 0, None),
        "nfsservctl": lambda: s(n["nfsservctl"], 0, None, None),
        "vhangup": lambda: s(n["vhangup"]),  # no controlling tty after setsid: a no-op
        "ioperm": lambda: s(n["ioperm"], 0, 0, 0),
        "iopl": lambda: s(n["iopl"], 0),
        "settimeofday": lambda: s(n["settimeofday"], None, None),  # both NULL: a no-op
        "clock_settime": lambda: s(n["clock_settime"], -1, None),
        "adjtimex": lambda: s(n["adjtimex"], None),
        "clock_adjtime": lambda: s(n["clock_adjtime"], -1, None),
        "personality(ADDR_NO_RANDOMIZE)": lambda: s(n["personality"], ADDR_NO_RANDOMIZE),
        "personality(READ_IMPLIES_EXEC)": lambda: s(n["personality"], READ_IMPLIES_EXEC),
        "personality(0xfffffffe)": lambda: s(n["personality"], 0xFFFF_FFFE),
        "personality(PER_LINUX32|ADDR_NO_RANDOMIZE)":
            lambda: s(n["personality"], seccomp.PER_LINUX32 | ADDR_NO_RANDOMIZE),
        # x32: same arch token as x86_64, bit 30 set in the number (this kernel may lack x32
        # entirely, then the unfiltered answer is ENOSYS; the filter must answer first)
        "x32 getpid": lambda: s(X32_SYSCALL_BIT | n["getpid"]),
    }
    for name, flag in LINUX_CLONE_NS_FLAGS.items():
        p[f"clone({name})"] = functools.partial(_clone, flag | signal.SIGCHLD)
    # every namespace flag at once, and each with a harmless flag beside it (CLONE_FS)
    p["clone(all namespace flags)"] = functools.partial(
        _clone, functools.reduce(int.__or__, LINUX_CLONE_NS_FLAGS.values()) | signal.SIGCHLD)
    p["clone(CLONE_FS | CLONE_NEWNET)"] = functools.partial(
        _clone, CLONE_FS | LINUX_CLONE_NS_FLAGS["CLONE_NEWNET"] | signal.SIGCHLD)
    # the kernel uses only clone's low 32 flag bits
    p["clone(CLONE_NEWUSER | 1<<32)"] = lambda: _clone(
        (1 << 32) | CLONE_NEWUSER | signal.SIGCHLD)
    p["ioctl(TIOCSTI)"] = lambda: _on_pty(seccomp.TIOCSTI)
    p["ioctl(TIOCLINUX)"] = lambda: _on_pty(seccomp.TIOCLINUX)
    # CVE-2019-10063: ioctl's cmd is an unsigned int, so high bits must not slip the rule
    p["ioctl(TIOCSTI | 1<<32)"] = lambda: _on_pty((1 << 32) | seccomp.TIOCSTI)
    p["fcntl(F_SETLEASE)"] = lambda: _on_file(seccomp.F_SETLEASE, F_RDLCK)
    p["fcntl(F_NOTIFY)"] = lambda: _on_dir(seccomp.F_NOTIFY, 0)
    return p


def _on_pty(cmd: int) -> tuple[int, int]:
    master, slave = os.openpty()
    try:
        ch = ctypes.c_char(b"x")
        return _sys(NR["ioctl"], slave, cmd, ctypes.addressof(ch))
    finally:
        os.close(master)
        os.close(slave)


def _on_file(cmd: int, arg: int) -> tuple[int, int]:
    fd = os.open(sys.executable, os.O_RDONLY)
    try:
        return _sys(NR["fcntl"], fd, cmd, arg)
    finally:
        os.close(fd)


def _on_dir(cmd: int, arg: int) -> tuple[int, int]:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _sys(NR["fcntl"], fd, cmd, arg)
    finally:
        os.close(fd)


EXPECTED_ERRNO = {name: errno.EPERM for name in _denied_probes()}
EXPECTED_ERRNO["clone3"] = errno.ENOSYS


def _run_denied() -> dict[str, list[int]]:
    # One grandchild per probe (inheriting the filter, if any): without the filter some probes
    # succeed and change the process (unshare(CLONE_NEWUSER) would make every later probe EPERM).
    return {name: list(_in_child(probe, filtered=False))
            for name, probe in _denied_probes().items()}


@pytest.fixture(scope="module")
def filtered() -> dict[str, list[int]]:
    return dict(_in_child(_run_denied, filtered=True))


@pytest.fixture(scope="module")
def unfiltered() -> dict[str, list[int]]:
    return dict(_in_child(_run_denied, filtered=False))


@pytest.mark.parametrize("probe", sorted(EXPECTED_ERRNO))
def test_denied(filtered: dict[str, list[int]], probe: str) -> None:
    assert filtered[probe] == [-1, EXPECTED_ERRNO[probe]]


def test_probes_are_meaningful(unfiltered: dict[str, list[int]]) -> None:
    """Without the filter no probe gives the filtered answer: each test above tests the filter."""
    same = {name: res for name, res in unfiltered.items()
            if res == [-1, EXPECTED_ERRNO[name]]}
    assert not same


# --- non-native ABIs -----------------------------------------------------------------------------

def _int80_getpid() -> int:
    """getpid through the i386 ABI (int 0x80, eax=20) from this 64-bit process."""
    code = bytes.fromhex(
        "b814000000"  # mov eax, 20        ; i386 __NR_getpid
        "cd80"        # int 0x80           ; compat entry: arch AUDIT_ARCH_I386
        "c3"          # ret                ; result in eax
    )
    buf = mmap.mmap(-1, mmap.PAGESIZE,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    return int(ctypes.CFUNCTYPE(ctypes.c_int)(addr)())


def test_i386_abi_fails_with_eperm() -> None:
    try:
        native = _in_child(lambda: [_int80_getpid(), os.getpid()], filtered=False)
    except AssertionError as err:  # int 0x80 faults when ia32 emulation is off (ia32_emulation=0)
        pytest.skip(f"no i386 syscall entry on this kernel: {err}")
    if native[0] != native[1]:
        pytest.skip(f"i386 getpid unavailable here (returned {native[0]})")
    assert _in_child(_int80_getpid, filtered=True) == -errno.EPERM


# --- what must keep working ----------------------------------------------------------------------

def _run_allowed() -> dict[str, Any]:
    out: dict[str, Any] = {}
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out["clone(SIGCHLD)"] = _clone(signal.SIGCHLD)[0]
    # a flag beside the namespace ones stays allowed (a table with a stray bit would refuse it)
    out["clone(CLONE_FS | SIGCHLD)"] = _clone(CLONE_FS | signal.SIGCHLD)[0]
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(threading.get_native_id()))
    t.start()
    t.join()
    out["thread"] = len(box) == 1 and box[0] != threading.get_native_id()
    out["/bin/true"] = subprocess.run(["/bin/true"], check=False).returncode
    out["python -c pass"] = subprocess.run([sys.executable, "-c", "pass"], check=False).returncode
    # the filter survives exec and is inherited: a grandchild is still denied
    probe = ("import ctypes; l = ctypes.CDLL(None, use_errno=True); "
             "print(l.unshare(0x10000000), ctypes.get_errno())")
    out["exec inherits"] = subprocess.run([sys.executable, "-c", probe], check=False,
                                          capture_output=True, text=True).stdout.split()
    for family in (1, 2):  # AF_UNIX, AF_INET
        ret, err = _sys(NR["socket"], family, 1, 0)
        out[f"socket({family})"] = [ret >= 0, err]
        if ret >= 0:
            os.close(ret)
    ret, err = _on_pty(TIOCGWINSZ)
    out["ioctl(TIOCGWINSZ)"] = [ret, err]
    out["fcntl(F_GETFL)"] = list(_on_file(F_GETFL, 0))[1]
    # allowed personalities; the query first, PER_LINUX last to leave the default behind
    for value in (seccomp.PERSONALITY_QUERY, seccomp.PER_LINUX32, seccomp.PER_LINUX):
        out[f"personality({value:#x})"] = _sys(NR["personality"], value)[1]
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _sys(101, 0, 0, 0, 0)[0] == 0 else 1)  # ptrace(PTRACE_TRACEME)
    out["ptrace(TRACEME)"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return out


def test_clone_table_is_sched_h() -> None:
    """The filter's namespace-flag table against <linux/sched.h>, written out independently."""
    assert dict(seccomp.CLONE_NS_FLAGS) == LINUX_CLONE_NS_FLAGS


def test_ordinary_things_still_work() -> None:
    out = _in_child(_run_allowed, filtered=True)
    assert out == {
        "fork": 7, "clone(SIGCHLD)": 0, "clone(CLONE_FS | SIGCHLD)": 0, "thread": True,
        "/bin/true": 0, "python -c pass": 0,
        "exec inherits": ["-1", str(errno.EPERM)],
        "socket(1)": [True, 0], "socket(2)": [True, 0],
        "ioctl(TIOCGWINSZ)": [0, 0], "fcntl(F_GETFL)": 0,
        "personality(0xffffffff)": 0, "personality(0x8)": 0, "personality(0x0)": 0,
        "ptrace(TRACEME)": 0,
    }


def _other_thread_is_filtered_too() -> list[int]:
    ready, go = threading.Event(), threading.Event()
    box: list[tuple[int, int]] = []

    def worker() -> None:
        ready.set()
        go.wait()
        box.append(_sys(NR["unshare"], 0))

    t = threading.Thread(target=worker)
    t.start()
    ready.wait()
    seccomp.install(BPF)  # the thread already exists: only TSYNC reaches it
    go.set()
    t.join()
    return list(box[0])


def test_install_covers_threads_that_already_exist() -> None:
    assert _in_child(_other_thread_is_filtered_too, filtered=False) == [-1, errno.EPERM]


def test_install_does_not_load_libseccomp() -> None:
    """The payload path imports the module and installs; libseccomp stays out of it."""
    code = ("import sys; import sandboxd.jail.seccomp; "
            "print('pyseccomp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "False"


# --- the table itself ----------------------------------------------------------------------------

def test_build_filter_is_cached_and_whole_instructions() -> None:
    assert seccomp.build_filter() is BPF
    assert len(BPF) % 8 == 0 and 0 < len(BPF) // 8 < 4096  # BPF_MAXINSNS


def test_each_syscall_has_one_row() -> None:
    names = [n for rule in seccomp.RULES for n in rule.syscalls]
    assert len(names) == len(set(names))


def test_issue7_list_is_covered() -> None:
    required = {
        "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "mount",
        "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
        "pivot_root", "umount2", "unshare", "setns", "clone", "clone3", "open_by_handle_at",
        "name_to_handle_at", "io_uring_setup", "io_uring_enter", "io_uring_register", "socket",
        "acct", "swapon", "swapoff", "reboot", "syslog", "personality", "lookup_dcookie",
        "quotactl", "nfsservctl", "vhangup", "ioperm", "iopl", "settimeofday", "clock_settime",
        "adjtimex", "clock_adjtime", "ioctl",
    }
    denied = {n for r in seccomp.RULES if r.action is not seccomp.Action.ALLOW for n in r.syscalls}
    assert required <= denied
    allowed = {n for r in seccomp.RULES if r.action is seccomp.Action.ALLOW for n in r.syscalls}
    assert "ptrace" in allowed


def test_personality_pairs_deny_exactly_the_complement() -> None:
    (rule,) = [r for r in seccomp.RULES if r.syscalls == ("personality",)]
    assert rule.when is not None
    pairs = rule.when.pairs()
    allowed = {0, 8, 0xFFFF_FFFF}
    words = set(range(0x1_0000))
    words |= {1 << i for i in range(32)} | {0xFFFF_FFFF ^ (1 << i) for i in range(32)}
    words |= {(1 << i) | (1 << j) for i in range(32) for j in range(32)}
    words |= {0xFFFF_FFFF ^ ((1 << i) | (1 << j)) for i in range(32) for j in range(32)}
    words |= {8 | (1 << i) for i in range(32)}
    words |= {(0xFFFF_FFFF << i) & 0xFFFF_FFFF for i in range(32)}
    for w in words:
        assert any(w & mask == want for mask, want in pairs) == (w not in allowed), hex(w)


def test_complement_refuses_what_it_cannot_express() -> None:
    with pytest.raises(ValueError):
        seccomp._complement_pairs({0, 0xFFFF_FFFF, 8, 16})
    with pytest.raises(ValueError):
        seccomp._complement_pairs({0, 8})


# --- docs/security.md ----------------------------------------------------------------------------

def render_table() -> str:
    """The Markdown table docs/security.md must carry between its seccomp-table markers."""
    lines = ["| Syscalls | Action | Condition | Reason |", "|---|---|---|---|"]
    for row in seccomp.describe():
        cells = [", ".join(f"`{n}`" for n in row["syscalls"]), row["action"],
                 f"`{row['condition']}`" if row["condition"] else "always", row["reason"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def test_docs_carry_the_table() -> None:
    text = DOC.read_text()
    m = re.search(r"<!-- seccomp-table:begin[^>]*-->\n(.*?)\n<!-- seccomp-table:end -->", text,
                  re.S)
    assert m, "docs/security.md lacks the seccomp-table markers"
    expected = render_table()
    assert m.group(1) == expected, (
        "docs/security.md is out of date with seccomp.RULES; paste this between the markers "
        "(or run `python tests/unit/test_seccomp.py`):\n" + expected)


if __name__ == "__main__":
    print(render_table())
