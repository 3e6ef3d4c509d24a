"""The room's filesystem: built by the room init inside its fresh mount namespace.

Theory of operation. The room's set-up process (still the daemon's host uid, already in the
room's fresh user and mount namespaces) mounts a size- and inode-limited tmpfs on the room's
scratch directory (``<state>/rooms/<id>/mnt``; the host only ever sees that directory empty,
because the mount lives in the room's namespace) and hands an fd of its root to the init
(:func:`mount_scratch`). The init (PID 1 of the room, root of the room's user namespace, a
subordinate host uid that cannot traverse the daemon's state directory) builds the new root on
that tmpfs through ``/proc/self/fd/N``:

  rootfs = a built tree:  overlay(lower = tree, upper/work on the tmpfs) is the new root
  rootfs = "host":        the tmpfs itself is the new root, with read-only binds of the host's
                          /usr and /lib* (and their /bin-style symlinks) and a minimal /etc

In both cases /usr is read-only (bind-remounted; a built tree's whole root too), the writable
places (/workspace, /tmp, /root, /home, /var/tmp, /run; the root itself in host mode) share the
one tmpfs budget (``diskBytes``) and are nosuid,nodev; /proc is fresh for the room's pid namespace
with the sensitive files masked and /proc/sys read-only; /sys is not mounted at all (see
docs/security.md: the JVM and Go size themselves from /proc and sched_getaffinity); /dev is a
nodev tmpfs with binds of the harmless host nodes (a user namespace cannot mknod), a devpts
newinstance and a private /dev/shm. Then pivot_root and
the old root is detached, so nothing of the host tree stays reachable.
"""

from __future__ import annotations

import os
import stat

from . import _syscalls as sc
from . import user

# Host /etc entries a toolchain needs to start, bound read-only into "host" rooms.
HOST_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives", "ssl",
            "ca-certificates", "ca-certificates.conf", "localtime", "mime.types", "protocols",
            "services", "gitconfig", "python3", "python3.11", "java-17-openjdk", "perl")
ROOT_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
#: ptys one room may hold at once (its devpts instance's max=)
PTY_MAX = 64
# /proc files that leak host state or offer host-wide knobs (PEERS.md escape class 2).
PROC_MASKED_FILES = ("kcore", "keys", "key-users", "timer_list", "sched_debug", "sysrq-trigger",
                     "kallsyms", "kmsg", "latency_stats", "config.gz", "vmallocinfo", "slabinfo",
                     "pagetypeinfo", "zoneinfo", "buddyinfo", "iomem", "ioports", "modules",
                     "softirqs", "interrupts", "mtrr", "partitions", "diskstats")
PROC_MASKED_DIRS = ("acpi", "scsi", "bus", "irq", "driver", "fs", "tty", "sysvipc")
PROC_READONLY = ("sys",)

# Where a room may write (all on the room's one tmpfs budget), with their modes.
WRITABLE_DIRS = (("workspace", 0o755), ("tmp", 0o1777), ("root", 0o700), ("home", 0o755),
                 ("run", 0o755), ("var/tmp", 0o1777))
# Made inside the fresh writable dirs above, which hide what the tree had there (Debian's
# /run/lock is where lockfile users and some test suites expect to write).
WRITABLE_SUBDIRS = (("run/lock", 0o1777),)

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = "root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n"

_ST_TO_MS = ((os.ST_NOSUID, sc.MS_NOSUID), (os.ST_NODEV, sc.MS_NODEV),
             (os.ST_NOEXEC, sc.MS_NOEXEC), (os.ST_NOATIME, sc.MS_NOATIME),
             (os.ST_NODIRATIME, sc.MS_NODIRATIME), (os.ST_RELATIME, sc.MS_RELATIME))


def _locked_flags(path: str) -> int:
    # A user namespace may not clear flags the host mount carries (the kernel locks nosuid,
    # nodev, noexec and the atime mode on mounts it copies), so a read-only remount must repeat
    # them or it fails with EPERM — the same trick bubblewrap uses.
    f = os.statvfs(path).f_flag
    return sum(ms for st, ms in _ST_TO_MS if f & st)


def bind(src: str, dst: str, *, readonly: bool = True, extra: int = 0) -> None:
    sc.mount(src, dst, None, sc.MS_BIND | sc.MS_REC)
    if readonly or extra:
        flags = sc.MS_BIND | sc.MS_REMOUNT | _locked_flags(dst) | extra
        sc.mount(None, dst, None, flags | (sc.MS_RDONLY if readonly else 0))


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))


def _write(path: str, text: str, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _mirror(src: str, dst: str) -> None:
    """Reproduce one top-level host entry (a symlink as a symlink, a directory as a ro bind)."""
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        os.mkdir(dst)
        bind(src, dst)
    elif os.path.isfile(src):
        _touch(dst)
        bind(src, dst)


def make_private() -> None:
    # Nothing we mount may propagate back to the host (or from it into the room).
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)


def mount_scratch(scratch: str, disk_bytes: int) -> int:
    """Set-up process side: the room's tmpfs on its scratch directory; return an fd of its root.

    Runs in the room's set-up process after unshare and after the maps are written, but before it
    becomes the room's root (``user.become_root``): only the daemon's uid can traverse the state
    directory (0700) to the scratch directory, a subordinate uid cannot — and the state dir stays
    closed to every other host user. The init then reaches the tmpfs only through this fd
    (``/proc/self/fd/N``), never by a host path. ``uid=0,gid=0`` are the room's ids: the tmpfs
    root belongs to the room's root, whichever host id that is.
    """
    make_private()
    inodes = max(1024, disk_bytes // 16384)  # an inode limit too: a million empty files is a DoS
    sc.mount("tmpfs", scratch, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
             f"size={disk_bytes},nr_inodes={inodes},mode=0755,uid=0,gid=0")
    return os.open(scratch, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def build_root(scratch: str, rootfs: str, hostname: str) -> str:
    """Assemble the new root on the mounted scratch tmpfs; return its path."""
    if rootfs == "host":
        root = scratch
        os.mkdir(f"{root}/usr")
        bind("/usr", f"{root}/usr")
        for name in ROOT_DIRS:
            if os.path.lexists(f"/{name}"):
                _mirror(f"/{name}", f"{root}/{name}")
        _host_etc(root, hostname)
        for d, mode in (*WRITABLE_DIRS, *WRITABLE_SUBDIRS, ("proc", 0o555), ("dev", 0o755),
                        ("home/sandbox", 0o755)):
            os.makedirs(f"{root}/{d}", exist_ok=True)
            os.chmod(f"{root}/{d}", mode)
        return root
    for d in ("upper", "work", "root", "rw"):
        os.mkdir(f"{scratch}/{d}", 0o755)
    root = f"{scratch}/root"
    # The tree by fd, not by its host path: overlayfs shows the strings it was given in every
    # room's /proc/self/mountinfo, and the host's layout is none of the room's business (M4).
    lower = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sc.mount("overlay", root, "overlay", sc.MS_NOSUID | sc.MS_NODEV,
                 f"lowerdir=/proc/self/fd/{lower},upperdir={scratch}/upper,"
                 f"workdir={scratch}/work")
    finally:
        os.close(lower)
    # The runtime tree stays read-only even for the room's root: writes go to /workspace,
    # /tmp and home directories, never into the toolchains every run depends on.
    bind(f"{root}/usr", f"{root}/usr")
    # The tree's directories belong to host root, which this user namespace does not map: even
    # the room's root cannot create entries in them (rootfs/build.sh makes the mount points).
    # The writable places are fresh directories on the room's tmpfs bound over them.
    for d, mode in WRITABLE_DIRS:
        src = f"{scratch}/rw/{d.replace('/', '_')}"
        os.mkdir(src)
        os.chmod(src, mode)
        sc.mount(src, f"{root}/{d}", None, sc.MS_BIND | sc.MS_NOSUID | sc.MS_NODEV)
    for d, mode in (*WRITABLE_SUBDIRS, ("home/sandbox", 0o755)):
        os.mkdir(f"{root}/{d}")
        os.chmod(f"{root}/{d}", mode)
    # The runtime tree read-only as a mount, not only by ownership: a tree file that happens to be
    # world-writable (or owned by a mapped id) must not become a channel between runs.
    sc.mount(None, root, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _locked_flags(root)
             | sc.MS_NOSUID | sc.MS_NODEV)
    return root


def _host_etc(root: str, hostname: str) -> None:
    etc = f"{root}/etc"
    os.mkdir(etc)
    _write(f"{etc}/passwd", PASSWD)
    _write(f"{etc}/group", GROUP)
    _write(f"{etc}/hostname", hostname + "\n")
    _write(f"{etc}/hosts", f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n")
    # No nameserver line: the resolver asks 127.0.0.1:53, which a room without a network
    # refuses at once and a room with one redirects to the daemon's DNS (sandboxd/egress.py).
    _write(f"{etc}/resolv.conf", "")
    _write(f"{etc}/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n")
    for name in HOST_ETC:
        if os.path.lexists(f"/etc/{name}"):
            _mirror(f"/etc/{name}", f"{etc}/{name}")


def mount_proc(root: str) -> None:
    proc = f"{root}/proc"
    sc.mount("proc", proc, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    # Masks are read-only binds of an empty *regular* file, not of /dev/null: a device node
    # accepts writes even on a read-only mount, so a write to a /dev/null-masked sysrq-trigger
    # would "succeed"; on a regular file it fails with EROFS. The file lives on a scratch tmpfs
    # mounted on <root>/dev for a moment and detached again (mount_dev mounts the real /dev
    # there): the binds keep it alive, nothing else can reach it.
    holder = f"{root}/dev"
    sc.mount("tmpfs", holder, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
             "size=4k,nr_inodes=4,mode=0555")
    empty = f"{holder}/empty"
    os.close(os.open(empty, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
    for name in PROC_MASKED_FILES:
        if os.path.exists(f"{proc}/{name}"):
            bind(empty, f"{proc}/{name}")
    sc.umount2(holder, sc.MNT_DETACH)
    for name in PROC_MASKED_DIRS:
        if os.path.isdir(f"{proc}/{name}"):
            sc.mount("tmpfs", f"{proc}/{name}", "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV,
                     "size=0,mode=0555")
    # The room's own ceilings on per-user counters (user.py), written through the room's fresh
    # procfs before /proc/sys goes read-only: /proc/sys/user/* answers for the namespace of
    # whoever opens it, and the host's /proc/sys may be read-only already (systemd's
    # ProtectKernelTunables=, a container), which failed every room there.
    user.cap_room_ucounts(proc)
    for name in PROC_READONLY:
        bind(f"{proc}/{name}", f"{proc}/{name}")


def mount_dev(root: str, shm_bytes: int) -> None:
    dev = f"{root}/dev"
    # nodev on the tmpfs itself: the usable nodes are separate bind mounts of the host's, so a
    # node the room's root makes here (mknod is refused in a user namespace anyway) opens nothing.
    sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
             "size=64k,nr_inodes=64,mode=0755")
    for name in DEV_NODES:
        src = f"/dev/{name}"
        if os.path.exists(src) and stat.S_ISCHR(os.stat(src).st_mode):
            _touch(f"{dev}/{name}")
            sc.mount(src, f"{dev}/{name}", None, sc.MS_BIND)
    os.mkdir(f"{dev}/pts")
    # A devpts of our own: PTYs made in the room are not the host's (CVE-2017-5226 class).
    # max=: the kernel's pty pool (kernel.pty.max, 4096) is global; without a per-instance cap
    # one room opening /dev/ptmx in a loop left every other room (and the host) with ENOSPC.
    sc.mount("devpts", f"{dev}/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
             f"newinstance,ptmxmode=0666,mode=0620,max={PTY_MAX}")
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    os.mkdir(f"{dev}/shm")
    sc.mount("tmpfs", f"{dev}/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
             f"size={shm_bytes},nr_inodes=4096,mode=1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{dev}/{name}")
    # Read-only once built: room code could otherwise replace /dev/null or /dev/stdout with a
    # file or a link of its own for every later run (issue 10, L6). The nodes, devpts and shm
    # are mounts of their own and keep their flags.
    sc.mount(None, dev, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID
             | sc.MS_NODEV | sc.MS_NOEXEC)


def pivot(root: str) -> None:
    # pivot_root(".", ".") stacks the old root under the new one; detaching it leaves no path
    # back to the host tree (no put_old directory needed, so none is left behind in the room).
    os.chdir(root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def setup(scratch_fd: int, rootfs: str, disk_bytes: int, hostname: str) -> None:
    """The whole filesystem set-up, in order (runs in the room init, after ``mount_scratch`` in
    the set-up process; ``scratch_fd`` is the room tmpfs's root and is closed here)."""
    scratch = f"/proc/self/fd/{scratch_fd}"
    root = build_root(scratch, rootfs, hostname)
    from .fileops import setup_code_base  # (fileops imports init, which imports us)

    setup_code_base(root)
    mount_proc(root)
    mount_dev(root, shm_bytes=min(disk_bytes, 64 * 1024 * 1024))
    pivot(root)
    # Nothing of the pre-pivot view may stay reachable from the room (payloads close every fd
    # anyway, but the init serves for the room's whole life).
    os.close(scratch_fd)
