"""The syscall filter: a deny-list table, compiled once to classic BPF, installed before each exec.

Theory of operation
-------------------
``RULES`` below is the whole policy, one row per decision: the syscalls, what they get (EPERM,
ENOSYS, or ALLOW for a call we examined and leave open on purpose), an optional condition on one
argument, and the reason (an escape class from PEERS.md, a CVE, an issue). Everything not named is
allowed: the room's namespaces, dropped capabilities and cgroup limits are the walls; the filter
closes the kernel interfaces those walls do not cover (keyrings, bpf, io_uring, vsock, nested
namespaces, the mount API, non-native syscall ABIs, terminal injection).

Two processes touch it:

* the zygote (or whoever starts first) calls :func:`build_filter` once. libseccomp turns the table
  into BPF (arch check, x32 check, argument compares) and exports it through a memfd; the result is
  plain ``bytes``, inherited copy-on-write by every room init forked afterwards.
* the payload child calls :func:`install` right before ``execve``, after dropping capabilities.
  ``install`` is two syscalls (``prctl(PR_SET_NO_NEW_PRIVS)`` and ``seccomp(SET_MODE_FILTER)``) and
  never touches libseccomp: ~0.2 ms per run, mostly the kernel translating and JIT-compiling the
  ~210-instruction program (libseccomp would add milliseconds).

Calls made through a non-native ABI (i386 ``int 0x80``/``sysenter``, x32 numbers with bit 30 set)
fail with EPERM: those tables are not what RULES describes (CVE-2009-0835 is the classic bypass).
Denials return an errno rather than killing, so nothing reaches the audit log (a payload looping on
a denied call must not flood the host's kernel log) and programs get a chance to fall back.

Argument conditions compare only the low 32 bits of arguments the kernel declares ``int``/``unsigned
int`` (ioctl's cmd, socket's domain, personality, clone's flags): the kernel truncates them, so a
64-bit compare would let ``0x1_00005412`` through as TIOCSTI (flatpak, CVE-2019-10063).
"""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass
from enum import Enum
from typing import Any

import prctl

from sandboxd.jail import _syscalls

__all__ = ["RULES", "Action", "Rule", "build_filter", "describe", "install"]

_LOW32 = 0xFFFF_FFFF


class Action(Enum):
    EPERM = "EPERM"
    ENOSYS = "ENOSYS"
    ALLOW = "ALLOW"  # a decision to leave the call open, kept in the table for its reason


# --- argument conditions -------------------------------------------------------------------------
# Each condition reduces to a set of (mask, value) pairs on one argument; the rule applies when
# any pair matches (arg & mask == value). libseccomp ANDs comparisons within a rule and refuses two
# comparisons of the same argument, so "any of" is one libseccomp rule per pair.


@dataclass(frozen=True)
class AnyBit:
    """The rule applies when any of ``bits`` is set in the argument."""

    arg: int
    argname: str
    bits: tuple[tuple[str, int], ...]

    def pairs(self) -> list[tuple[int, int]]:
        return [(bit, bit) for _, bit in self.bits]

    def text(self) -> str:
        return f"{self.argname} & ({'|'.join(n for n, _ in self.bits)}) != 0"


@dataclass(frozen=True)
class OneOf:
    """The rule applies when the (32-bit) argument is one of ``values``."""

    arg: int
    argname: str
    values: tuple[tuple[str, int], ...]

    def pairs(self) -> list[tuple[int, int]]:
        return [(_LOW32, value) for _, value in self.values]

    def text(self) -> str:
        return " or ".join(f"{self.argname} == {n}" for n, _ in self.values)


@dataclass(frozen=True)
class NoneOf:
    """The rule applies unless the (32-bit) argument is one of ``values``.

    Only "all zeros, all ones, and at most one single-bit value" can be expressed, because a
    complement must be written as a union of masked compares (see :func:`_complement_pairs`).
    """

    arg: int
    argname: str
    values: tuple[tuple[str, int], ...]

    def pairs(self) -> list[tuple[int, int]]:
        return _complement_pairs({value for _, value in self.values})

    def text(self) -> str:
        return f"{self.argname} not in {{{', '.join(n for n, _ in self.values)}}}"


Condition = AnyBit | OneOf | NoneOf


def _complement_pairs(allowed: set[int]) -> list[tuple[int, int]]:
    """(mask, value) pairs matching exactly the 32-bit words not in ``allowed``.

    ``allowed`` must hold 0, 0xffffffff and at most one word with a single bit ``b`` set. Proof: a
    word that is neither all zeros nor all ones, read cyclically, has a run of ones starting at
    some bit s, with bit s-1 clear. The pair "bit s-1 clear, bit s set" matches it, for every
    s != b. For s == b, the pair "bit b-1 clear, bits b and b+1 set" matches the runs longer than
    one bit; a word whose only run is the single bit b is the allowed word itself, and any other
    word has a second run, starting elsewhere, matched by that run's pair. 32 pairs in all.
    """
    extra = allowed - {0, _LOW32}
    if not {0, _LOW32} <= allowed or len(extra) > 1 or any(v & (v - 1) for v in extra):
        raise ValueError(f"cannot express 'none of {sorted(allowed)}' as masked compares")
    single = extra.pop().bit_length() - 1 if extra else -1
    pairs = []
    for start in range(32):
        before, after = (start - 1) % 32, (start + 1) % 32
        if start == single:
            pairs.append(((1 << before) | (1 << start) | (1 << after), (1 << start) | (1 << after)))
        else:
            pairs.append(((1 << before) | (1 << start), 1 << start))
    return pairs


# --- the table -----------------------------------------------------------------------------------

CLONE_NS_FLAGS = (
    ("CLONE_NEWNS", _syscalls.CLONE_NEWNS),
    ("CLONE_NEWCGROUP", _syscalls.CLONE_NEWCGROUP),
    ("CLONE_NEWUTS", _syscalls.CLONE_NEWUTS),
    ("CLONE_NEWIPC", _syscalls.CLONE_NEWIPC),
    ("CLONE_NEWUSER", _syscalls.CLONE_NEWUSER),
    ("CLONE_NEWPID", _syscalls.CLONE_NEWPID),
    ("CLONE_NEWNET", _syscalls.CLONE_NEWNET),
    ("CLONE_NEWTIME", 0x0000_0080),
)
AF_VSOCK = 40
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
F_SETLEASE = 1024
F_NOTIFY = 1026
PER_LINUX = 0x0000
PER_LINUX32 = 0x0008
PERSONALITY_QUERY = 0xFFFF_FFFF
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4  # Linux 5.7


@dataclass(frozen=True)
class Rule:
    syscalls: tuple[str, ...]
    action: Action
    reason: str
    when: Condition | None = None


EPERM, ENOSYS, ALLOW = Action.EPERM, Action.ENOSYS, Action.ALLOW

RULES: tuple[Rule, ...] = (
    # -- kernel objects no namespace isolates (PEERS escape class 4) --
    Rule(("keyctl", "add_key", "request_key"), EPERM,
         "Keyrings are not namespaced: keys are shared per host uid, so rooms could read or plant "
         "each other's keys; long CVE history (CVE-2016-0728 refcount overflow to root)."),
    Rule(("bpf",), EPERM,
         "eBPF verifier bugs are a standard local root (CVE-2021-3490, CVE-2021-31440); no "
         "payload needs to load programs."),
    Rule(("perf_event_open",), EPERM,
         "Sees host-wide events and has a history of local roots (CVE-2013-2094); profiling "
         "inside rooms is not offered."),
    Rule(("userfaultfd",), EPERM,
         "Lets a payload stall the kernel at a chosen copy_from_user: the standard primitive to "
         "win kernel races in exploits."),
    Rule(("io_uring_setup", "io_uring_enter", "io_uring_register"), EPERM,
         "io_uring operations run without passing through this filter, and the interface has a "
         "long CVE list (CVE-2022-29582, CVE-2023-2598); libuv and others fall back on error."),
    Rule(("socket",), EPERM,
         "AF_VSOCK reaches the hypervisor/host by CID and is not network-namespaced "
         "(CVE-2021-26708 vsock race to root). Other families stay open: net namespace.",
         OneOf(0, "domain", (("AF_VSOCK", AF_VSOCK),))),
    Rule(("fcntl",), EPERM,
         "File leases block other openers of the same file (shared runtime tree: cross-room "
         "denial of service) and dnotify watches other rooms' activity (isolate 2.4 denylist).",
         OneOf(1, "cmd", (("F_SETLEASE", F_SETLEASE), ("F_NOTIFY", F_NOTIFY)))),
    Rule(("open_by_handle_at", "name_to_handle_at"), EPERM,
         "File handles bypass path lookup and so the mount namespace (the 2014 'shocker' Docker "
         "escape); name_to_handle_at only mints handles and leaks inode identities."),
    # -- nested namespaces (PEERS escape class 5) --
    Rule(("unshare", "setns"), EPERM,
         "A new user namespace gives back every capability we dropped, and with it the netfilter "
         "and filesystem code behind CVE-2022-0185 and CVE-2023-32233. Denied whole, not by flag: "
         "the harmless flags (CLONE_FILES, CLONE_FS) are unused by payloads, and namespace flags "
         "added by future kernels are covered."),
    Rule(("clone",), EPERM,
         "Same as unshare, through clone's flags (x86_64/aarch64: argument 0). Threads and fork "
         "use no namespace flag. In clone() bit 0x80 (CLONE_NEWTIME) is part of the exit-signal "
         "byte, so time namespaces come only from unshare and clone3; masking it refuses only "
         "exit 'signals' >= 128, which are not signals.",
         AnyBit(0, "flags", CLONE_NS_FLAGS)),
    Rule(("clone3",), ENOSYS,
         "Its flags live in a struct in memory, which seccomp cannot read. ENOSYS makes glibc "
         "(2.34+) and other runtimes fall back to clone(), whose flags the rule above checks."),
    # -- mounts: the room's tree is fixed once set up (PEERS escape classes 1, 2) --
    Rule(("mount", "umount2", "pivot_root"), EPERM,
         "The room's mount tree is final after set-up: unmounting would uncover masked /proc "
         "paths, mounting would reach filesystem parsers (CVE-2022-0185)."),
    Rule(("fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
          "mount_setattr", "open_tree_attr"), EPERM,
         "The new mount API reaches the same code as mount(2); fsconfig was the entry point of "
         "CVE-2022-0185 (legacy_parse_param heap overflow)."),
    # -- host administration: the kernel already wants init-namespace capabilities; second fence --
    Rule(("kexec_load", "kexec_file_load"), EPERM, "Replaces the running kernel (CAP_SYS_BOOT)."),
    Rule(("init_module", "finit_module", "delete_module"), EPERM,
         "Loads or unloads kernel code (CAP_SYS_MODULE)."),
    Rule(("reboot",), EPERM,
         "Host power state; inside a pid namespace it would kill the room init."),
    Rule(("acct",), EPERM, "Process accounting writes to a host file (CAP_SYS_PACCT)."),
    Rule(("swapon", "swapoff"), EPERM, "Host swap configuration (CAP_SYS_ADMIN)."),
    Rule(("syslog",), EPERM,
         "The kernel log is host-wide: it leaks kernel addresses (KASLR bypass) and other rooms' "
         "events."),
    Rule(("quotactl", "quotactl_fd"), EPERM, "Host filesystem quotas (CAP_SYS_ADMIN)."),
    Rule(("lookup_dcookie",), EPERM,
         "Oprofile-era interface that resolves host paths; removed from recent kernels."),
    Rule(("nfsservctl",), EPERM,
         "Kernel NFS server control (removed in 3.1; ENOSYS there anyway)."),
    Rule(("vhangup",), EPERM, "Hangs up the controlling terminal (CAP_SYS_TTY_CONFIG)."),
    Rule(("ioperm", "iopl"), EPERM, "Raw I/O port access to host hardware (CAP_SYS_RAWIO)."),
    Rule(("settimeofday", "clock_settime", "adjtimex", "clock_adjtime"), EPERM,
         "The wall clock is host-wide (time namespaces offset only monotonic and boottime). "
         "adjtimex/clock_adjtime are denied whole, including read-only modes=0 queries: their "
         "mode is in a struct seccomp cannot read, and no payload we run needs ntp_gettime()."),
    # -- terminals (PEERS escape class 7) --
    Rule(("ioctl",), EPERM,
         "TIOCSTI pushes keystrokes into a terminal's input queue, typed as the user who owns it "
         "(CVE-2017-5226); TIOCLINUX does the same via console selection paste (CVE-2023-1523). "
         "Compared on 32 bits (CVE-2019-10063).",
         OneOf(1, "cmd", (("TIOCSTI", TIOCSTI), ("TIOCLINUX", TIOCLINUX)))),
    # -- execution domain --
    Rule(("personality",), EPERM,
         "Flags such as ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC and MMAP_PAGE_ZERO weaken exploit "
         "mitigations for the next exec. Allowed: PER_LINUX, PER_LINUX32 (only changes uname's "
         "machine to i686 for `linux32` builds; the i386 ABI stays blocked) and the 0xffffffff "
         "query (sanitizers and gdb read it). gdb warns that it cannot disable ASLR, then works.",
         NoneOf(0, "persona", (("PER_LINUX", PER_LINUX), ("PER_LINUX32", PER_LINUX32),
                               ("0xffffffff", PERSONALITY_QUERY)))),
    # -- deliberately left open --
    Rule(("ptrace", "process_vm_readv", "process_vm_writev"), ALLOW,
         "Debuggers and strace in a room are legitimate. The pid namespace shows only the room's "
         "processes, the user namespace and the non-dumpable room init keep set-up code out of "
         "reach (bubblewrap PR #114), and since Linux 4.8 a tracer cannot change a syscall to "
         "skip this filter (it is re-checked after the tracer stops)."),
)

#: How calls through a non-native syscall ABI end (libseccomp's "bad arch" action; x32 numbers
#: are caught by libseccomp's x86_64 code, which checks bit 30 of the syscall number).
NON_NATIVE_ABI = Rule(
    ("<any syscall via the i386 ABI (int 0x80, sysenter)>", "<any syscall via the x32 ABI>"),
    EPERM,
    "Other ABIs have other syscall tables, which the rules above do not describe (seccomp arch "
    "confusion, CVE-2009-0835). EPERM, not a kill: no audit-log records, and a 32-bit binary "
    "fails visibly on its first syscall.")

# Syscalls newer than the libseccomp this runs with (2.5.4 knows up to Linux ~5.15). Numbers from
# 424 on are shared by every architecture except alpha.
_LATE_SYSCALLS = {"open_tree_attr": 467}


def describe() -> list[dict[str, Any]]:
    """The policy as plain data, one dict per row: for docs/security.md and the tests."""
    rows = []
    for rule in (*RULES, NON_NATIVE_ABI):
        rows.append({
            "syscalls": list(rule.syscalls),
            "action": rule.action.value,
            "condition": rule.when.text() if rule.when else "",
            "reason": rule.reason,
        })
    return rows


# --- compile and install -------------------------------------------------------------------------


@functools.cache
def build_filter() -> bytes:
    """Compile RULES for the native architecture and return the classic-BPF program.

    Costs milliseconds (libseccomp): call it once per daemon, before forking rooms. Raises OSError
    or ValueError if a rule cannot be compiled: there is no "filter without that rule".
    """
    filt = _compile()
    fd = os.memfd_create("sandboxd-seccomp", os.MFD_CLOEXEC)
    with open(fd, "w+b", buffering=0) as f:
        filt.export_bpf(f)
        f.seek(0)
        return f.read()


def _compile() -> Any:
    """RULES as a libseccomp filter object (its ``export_pfc`` shows the program readably)."""
    # Imported here so the payload path (install) never loads libseccomp.
    import pyseccomp as sc

    errno_of = {EPERM: sc.ERRNO(errno.EPERM), ENOSYS: sc.ERRNO(errno.ENOSYS)}
    filt = sc.SyscallFilter(sc.ALLOW)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.ERRNO(errno.EPERM))
    filt.set_attr(sc.Attr.CTL_NNP, 0)  # install() sets no_new_privs itself; export ignores it
    filt.set_attr(sc.Attr.CTL_OPTIMIZE, 2)  # binary tree: O(log n) syscall-number checks per call
    for rule in RULES:
        if rule.action is ALLOW:
            continue
        for name in rule.syscalls:
            nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
            if nr == -1:  # __NR_SCMP_ERROR: libseccomp does not know the name at all
                if name not in _LATE_SYSCALLS:
                    raise ValueError(f"seccomp: unknown syscall {name!r}")
                nr = _LATE_SYSCALLS[name]
            # Other negative numbers are libseccomp's pseudo-syscalls for names that do not exist
            # on this architecture (ioperm on aarch64): it accepts and drops them.
            if rule.when is None:
                filt.add_rule(errno_of[rule.action], nr)
                continue
            for mask, value in rule.when.pairs():
                filt.add_rule(errno_of[rule.action], nr,
                              sc.Arg(rule.when.arg, sc.MASKED_EQ, mask, value))
    return filt


def install(bpf: bytes) -> None:
    """Install ``bpf`` (from :func:`build_filter`) on the calling thread; it survives exec.

    Call in the payload child after dropping capabilities, right before exec. Raises OSError: the
    caller must not exec then (fail closed: nsjail once silently ran payloads without its filter,
    PR #285).
    """
    # The kernel lets an unprivileged task install a filter only under no_new_privs (else a
    # filter could fool a setuid binary). Setting it again is harmless: one prctl.
    prctl.set_no_new_privs(1)
    # TSYNC: a filter binds one thread; a payload child forked from Python has one, but should a
    # caller have more, none may stay unfiltered (the kernel also copies no_new_privs to them).
    # TSYNC_ESRCH: without it a failed sync *returns the thread's id*, a success to any "< 0"
    # check, and the filter would silently not be there.
    _syscalls.seccomp_set_filter(bpf, SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_TSYNC_ESRCH)
