"""The zygote: a single-threaded, pre-imported fork server that creates room inits.

Theory of operation. The daemon starts the zygote once (``python -m sandboxd.jail.zygote FD``)
with one end of a SEQPACKET socketpair as FD. The zygote imports everything a room needs
(pyroute2 alone costs ~0.1 s) and, if asked, compiles the seccomp filter once; every room is then a
cheap fork whose pages are shared copy-on-write. It is a child subreaper, so room inits are
re-parented to it (and reaped by it) once their set-up process exits, and it dies with the daemon.

Spawning one room (a ``messages.SpawnRoom`` request carrying the ``messages.RoomSpec``):

  zygote ──fork──> set-up process (host namespaces, daemon's uid)
                     1. writes "0" to the room cgroup's cgroup.procs files (before unshare:
                        afterwards the cgroup namespace would root it where it is)
                     2. unshare(USER|NS|PID|NET|IPC|UTS|CGROUP), says "u" on the sync socket
  zygote: writes the uid/gid maps (it is still in the parent user namespace), says "m"
                     3. mounts the room's tmpfs on its scratch directory and keeps an fd of it
                        (still the daemon's uid: only that uid may traverse the state dir)
                     4. becomes the room's root (setgroups([]) with a subordinate map,
                        setresgid/setresuid 0): from here on its host ids are the room's slice
                     5. forks the init (PID 1 of the new pid namespace), sends its host pid,
                        and exits
  zygote: reaps the set-up process, opens a pidfd for the init, and replies to the daemon with
          RoomSpawned {pid} + fds [daemon's end of the init channel, pidfd]; later, once it
          reaped the init, an Exited {pid, status} event. Any failure is an ErrorReply.

The set-up process exiting is what re-parents the init to the zygote; the init waits for that
(EOF on a pipe only the set-up process held) before setting its PDEATHSIG.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import signal
import socket
import sys
from typing import assert_never

from . import _syscalls as sc
from . import caps, channel, messages, mnt, user
from . import init as room_init

NS_FLAGS = (sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWNET
            | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWCGROUP)
HANDSHAKE_TIMEOUT = 5.0
ROOM_NOFILE = 1024


def _expect(sock: socket.socket, timeout: float = HANDSHAKE_TIMEOUT) -> bytes:
    ready, _, _ = select.select([sock], [], [], timeout)
    if not ready:
        raise TimeoutError("room set-up process did not answer")
    data = sock.recv(4096)
    if not data:
        raise ConnectionError("room set-up process died")
    if data.startswith(b"E"):
        raise OSError(f"room set-up failed: {data[1:].decode(errors='replace')}")
    return data


def _setup_process(spec: messages.RoomSpec, keep: list[int], ctl: socket.socket,
                   sync: socket.socket, reparented: int) -> None:
    """Runs in the forked set-up process; never returns."""
    try:
        # The zygote's wake-up pipe is about to be closed: detach from it before a signal
        # could write into whatever file reuses its number.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.closerange(3, min(keep))
        for lo, hi in zip(sorted(keep), [*sorted(keep)[1:], 1 << 20], strict=True):
            os.closerange(lo + 1, hi)
        caps.set_name(f"sandboxd: room {spec.room_id} setup")
        # Kept open for the init, which steps into a run's cgroup to start a payload there and
        # back into its own leaf (init.Init._spawn_fast): the same kind of fd runs are joined
        # by (cgroup.RunCgroup.join_fds) — v2: the file, opened here with the daemon's
        # credentials outside the room's cgroup namespace; v1: the directory, so that the init
        # opens the file with its own (possibly subordinate) uid.
        home_fds = []
        by_dir = spec.cgroup_home_by_dir
        for path in spec.cgroup_procs:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            os.write(fd, b"0")
            if by_dir:
                os.close(fd)
                fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            home_fds.append(fd)
        # /proc/<pid>/{uid_map,setgroups} of a non-dumpable process belong to global root, so
        # the zygote could not write our maps; we are dumpable only until the init (which
        # inherits this) turns it off again right after the maps are in place.
        caps.set_dumpable(True)
        # The user namespace's ceilings on per-user counters are the creator's rlimits at this
        # moment; the room's own share is set right after (caps.py, "per-user kernel counters").
        caps.raise_user_rlimits()
        sc.unshare(NS_FLAGS)
        caps.set_rlimits(caps.room_user_rlimits())
        sync.send(b"u")
        if _expect(sync) != b"m":
            raise OSError("bad handshake from the zygote")
        scratch_fd = mnt.mount_scratch(spec.scratch, spec.disk_bytes)
        # Only now: the scratch mount above needed the daemon's uid to reach the state dir, and
        # the maps had to exist for the tmpfs to be owned by the room's root.
        user.become_root(spec.ids)
        # The init's step back through home_fds must work with the ids it now has: cgroup v1
        # lets a file opened by the daemon's uid move only tasks of that uid, so a room on a
        # subordinate slice cannot use them. Probe (moving ourselves where we already are) and
        # let the init take the fork path instead when they do not work.
        try:
            from . import cgroup

            cgroup.enter(home_fds)
        except PermissionError:
            for fd in home_fds:
                os.close(fd)
            home_fds = []
        pid = os.fork()
        if pid == 0:
            sync.close()
            room_init.main(spec, ctl, reparented, home_fds, scratch_fd)
        sync.send(str(pid).encode())
        os._exit(0)
    except BaseException as err:  # noqa: BLE001 - nothing may unwind past fork
        try:
            sync.send(b"E" + f"{type(err).__name__}: {err}".encode()[:3000])
        finally:
            os._exit(1)


def spawn(spec: messages.RoomSpec) -> tuple[int, socket.socket, int]:
    """Create one room; return (init host pid, daemon's channel end, pidfd of the init)."""
    ctl_daemon, ctl_room = channel.pair()
    sync_z, sync_s = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The init may set PDEATHSIG only once it is our child: that is after the set-up process has
    # been reaped (its fds close before the kernel re-parents its children, so EOF on a pipe it
    # held would be too early and the re-parenting itself would deliver the death signal).
    reparented_r, reparented_w = os.pipe2(os.O_CLOEXEC)
    keep = [ctl_room.fileno(), sync_s.fileno(), reparented_r]
    pid = os.fork()
    if pid == 0:
        os.set_inheritable(reparented_r, True)
        _setup_process(spec, keep, ctl_room, sync_s, reparented_r)
    ctl_room.close()
    sync_s.close()
    os.close(reparented_r)
    try:
        if _expect(sync_z) != b"u":
            raise OSError("bad handshake from the set-up process")
        user.write_maps(pid, spec.ids)
        sync_z.send(b"m")
        init_pid = int(_expect(sync_z))
        pidfd = os.pidfd_open(init_pid)
    except BaseException:
        ctl_daemon.close()
        os.close(reparented_w)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise
    finally:
        sync_z.close()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    os.write(reparented_w, b"g")
    os.close(reparented_w)
    _INITS.add(init_pid)
    return init_pid, ctl_daemon, pidfd


#: Host pids of the room inits we made: their wait statuses are reported to the daemon, which
#: cannot wait for them itself (it only holds pidfds) and must tell a room's owner why it died.
_INITS: set[int] = set()


def _reap(sock: socket.socket | None = None) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if pid in _INITS:
            _INITS.discard(pid)
            if sock is not None:
                try:
                    channel.send(sock, messages.Exited(pid=pid, status=status))
                except OSError:
                    pass


def serve(sock: socket.socket) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    while True:
        try:
            ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap(sock)
        if sock.fileno() in ready:
            try:
                msg, fds = channel.recv(sock, messages.to_zygote)
            except (channel.ChannelClosed, ConnectionError):
                return
            # (channel.BadMessage is not caught: the zygote exits on garbage, the daemon sees
            # its channel close and starts a new one)
            channel.close_fds(fds)
            handle(msg, sock)


def handle(msg: messages.ToZygote, sock: socket.socket) -> None:
    match msg:
        case messages.SpawnRoom(spec=spec):
            try:
                pid, ctl, pidfd = spawn(spec)
            except BaseException as err:  # noqa: BLE001 - one failed room must not end the zygote
                num = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
                channel.send(sock, messages.ErrorReply(
                    re=msg.id, errno=num, message=f"{type(err).__name__}: {err}"))
                return
            try:
                channel.send(sock, messages.RoomSpawned(re=msg.id, pid=pid),
                             [ctl.fileno(), pidfd])
            finally:
                ctl.close()
                os.close(pidfd)
        case messages.Ping():
            channel.send(sock, messages.Pong(re=msg.id))
        case _:
            assert_never(msg)


def main() -> None:
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    caps.set_name("sandboxd: zygote")
    caps.die_with_parent()
    if os.getppid() == 1:
        sys.exit(0)  # the daemon died before we could ask to die with it
    import prctl

    prctl.set_child_subreaper(True)
    caps.non_dumpable()
    # The daemon raised its own soft fd limit for itself; rooms and their payloads start from
    # the conventional 1024 (select()-based programs break above FD_SETSIZE).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, ROOM_NOFILE), hard))
    # Pre-import what every room needs, so forks pay nothing for it.
    from . import net  # noqa: F401
    try:
        from . import seccomp  # noqa: F401
    except ImportError:
        pass
    serve(sock)


if __name__ == "__main__":
    main()
