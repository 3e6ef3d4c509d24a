"""The only ctypes code in sandboxd: thin wrappers over the syscalls Python's os module lacks.

Each wrapper raises OSError naming the syscall and its arguments, so a failure deep in room set-up
says exactly what the kernel refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# --- constants (linux/sched.h, linux/mount.h) ----------------------------------------------------
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

# x86_64 syscall numbers for what libc may not wrap on Debian 12 (glibc 2.36).
_SYSCALLS = {
    "x86_64": {"pivot_root": 155, "seccomp": 317, "pidfd_send_signal": 424},
    "aarch64": {"pivot_root": 41, "seccomp": 277, "pidfd_send_signal": 424},
}
_NR = _SYSCALLS.get(platform.machine(), _SYSCALLS["x86_64"])

_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.sethostname.argtypes = (ctypes.c_char_p, ctypes.c_size_t)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), f"setns({fd}, {nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    d = _b(data)
    _check(_libc.mount(_b(source), _b(target), _b(fstype), flags, d),
           f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r})")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount2({target!r}, {flags})")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_NR["pivot_root"], _b(new_root), _b(put_old)),
           f"pivot_root({new_root!r}, {put_old!r})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), f"sethostname({name!r})")


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(_libc.syscall(_NR["pidfd_send_signal"], pidfd, sig, None, 0),
           f"pidfd_send_signal({pidfd}, {sig})")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


SECCOMP_SET_MODE_FILTER = 1


def seccomp_set_filter(bpf: bytes, flags: int = 0) -> None:
    """Install a classic-BPF seccomp program (8 bytes per instruction). Needs no_new_privs."""
    if len(bpf) % 8:
        raise ValueError("a BPF program is a whole number of 8-byte instructions")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.syscall(_NR["seccomp"], SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(prog)),
           f"seccomp(SET_MODE_FILTER, {flags:#x}, <{len(bpf) // 8} insns>)")


# --- openat2 (file API: resolution inside the room without magic links) --------------------------
# 437 on every architecture (numbers from 424 on are shared); glibc 2.36 has no wrapper.
_NR_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """openat2(2); raises OSError with ``filename`` set to ``path``."""
    how = _OpenHow(flags, mode, resolve)
    ret = _libc.syscall(_NR_OPENAT2, ctypes.c_int(dirfd), _b(path), ctypes.byref(how),
                        ctypes.c_size_t(ctypes.sizeof(how)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"openat2({path!r}, {flags:#o}, resolve={resolve:#x}): "
                           f"{os.strerror(err)}", path)
    return int(ret)


# --- inotify (file watch: jail/watchops.py makes the instance and adds the watches) -------------
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_libc.inotify_init1.argtypes = (ctypes.c_int,)
_libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)


def inotify_init1(flags: int) -> int:
    return _check(_libc.inotify_init1(flags), f"inotify_init1({flags:#x})")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    ret = _libc.inotify_add_watch(fd, _b(path), mask)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_add_watch({fd}, {path!r}, {mask:#x}): {os.strerror(err)}",
                      path)
    return int(ret)
