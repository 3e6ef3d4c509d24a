"""The room init: PID 1 of a room, serving the daemon over one SEQPACKET channel.

Theory of operation. The init is forked by the room's set-up process (see ``zygote.py``) right
after that process unshared the user, mount, pid, net, ipc, uts and cgroup namespaces, so the init
is PID 1 of the room's pid namespace, root (with capabilities) of the room's user namespace, and
already inside the room's cgroup. It

1. waits until its parent (the set-up process) has exited, then asks for SIGKILL when its new
   parent (the zygote, a child subreaper) dies, and makes itself non-dumpable;
2. builds the room's filesystem (``mnt.setup``), brings up loopback, sets the hostname;
3. says ``ready`` and serves requests until the channel closes, when it exits — and the kernel
   kills every process left in the pid namespace with it.

Requests are the ``messages.ToInit`` structs (declared with their replies in ``messages.py``),
dispatched by :meth:`Init.dispatch` with one ``match``:
  Spawn    + fds [stdin, stdout, stderr, *cgroup fds]: forks a payload: setsid, join the run
           cgroup, stdio, clean signals, rlimits, identity, cwd, drop privileges, close fds,
           exec (the seccomp filter is inherited from the init). Replies SpawnReply {pid};
           later an Exit event {run, status, rusage, failure, t} when the payload is reaped.
  Kill     {run, sig}        signal the run's process group -> KillReply {found}
  KillAll                    SIGKILL every process of the room but the init
  Ping                       -> Pong {runs}
  OpenPty  {cols, rows} -> PtyOpened {name} + [master, slave] of the room's devpts
           (``ptyops.py``); a Spawn with ``tty`` makes the slave the payload's controlling tty
  Connect  {port, timeout_ms} -> Connected {address} + [a connected TCP socket]: a job of the
           loop (``portops.py``), never blocking the other requests; ECONNREFUSED, ETIMEDOUT
  the file operations        ``fileops.py`` (Write is a Job: answered from the event loop)
Every failure of a request is an ErrorReply {errno, message, filename}. A datagram that does not
decode as a ``ToInit`` struct ends the init (and so the room): the daemon never sends one, so
whoever did is not the daemon.

Payload pipes and files are fds passed through the channel; the init never copies payload data.
As PID 1 it reaps every orphan of the room.
"""

from __future__ import annotations

import errno
import os
import resource
import selectors
import signal
import socket
import stat
import sys
import time
from typing import Protocol, assert_never

import msgspec

from . import _syscalls as sc
from . import caps, cgroup, channel, fileops, messages, mnt, net, portops, ptyops, watchops
from .messages import ErrorReply, Reply


class Job(Protocol):
    """An operation that takes longer than one request: the init polls ``fd`` in its loop
    (so it keeps reaping and spawning meanwhile) and replies when :meth:`step` returns a
    result. ``step`` raising OSError replies that error; :meth:`close` is called either way."""

    fd: int

    def step(self) -> Reply | None: ...

    def close(self) -> None: ...


def error_reply(err: BaseException) -> ErrorReply:
    """The one error shape: an OSError as its errno, text and file name; anything else EIO."""
    if isinstance(err, OSError):
        return ErrorReply(errno=err.errno or errno.EIO, message=str(err),
                          filename=None if err.filename is None else str(err.filename))
    return ErrorReply(errno=errno.EIO, message=f"{type(err).__name__}: {err}")


SANDBOX_UID = 1000
# When a room as a whole runs out of memory, the kernel picks its victim inside the room: never
# the init (~30 MB of Python, bigger than many payloads), which would take the room down.
PAYLOAD_OOM_SCORE_ADJ = 500
# errno values that mean "this program cannot be executed" (a result, exit 126/127), as opposed
# to the sandbox failing to start it (EAGAIN, ENOMEM, ...).
_EXEC_ERRNOS = frozenset((errno.ENOENT, errno.EACCES, errno.ENOEXEC, errno.ENOTDIR, errno.EISDIR,
                          errno.ELOOP, errno.ENAMETOOLONG, errno.EPERM, errno.E2BIG,
                          errno.ETXTBSY, errno.ELIBBAD))
# Dispositions a payload must not inherit from the init (which ignores these).
_RESET_SIGNALS = tuple(s for s in signal.valid_signals()
                       if s not in (signal.SIGKILL, signal.SIGSTOP))
RLIMIT_NAMES = {"fsize": "RLIMIT_FSIZE", "nofile": "RLIMIT_NOFILE", "core": "RLIMIT_CORE",
                "stack": "RLIMIT_STACK", "cpu": "RLIMIT_CPU", "nproc": "RLIMIT_NPROC"}


class Init:
    def __init__(self, spec: messages.RoomSpec, ctl: socket.socket,
                 home_fds: list[int] | None = None, scratch_fd: int = -1) -> None:
        self.spec = spec
        self.ctl = ctl
        # The room's tmpfs, mounted by the set-up process on the state directory (mnt.setup
        # builds the room's root on it).
        self.scratch_fd = scratch_fd
        # cgroup.procs fds of the init's own leaf (opened by the set-up process before unshare):
        # the fast spawn path steps into a run's cgroup and back through them.
        self.home_fds = home_fds or []
        self.oom_fd = -1
        self.started: dict[int, float] = {}
        self.runs: dict[int, tuple[str, int]] = {}  # pid -> (run id, error pipe read end)
        self.seccomp_bpf = spec.seccomp_bpf
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Connects in progress (portops): polled for writing, answered ETIMEDOUT at their
        # deadline; the loop's select timeout is the nearest one.
        self.connects: set[portops.Connector] = set()

    # --- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        spec = self.spec
        mnt.setup(self.scratch_fd, spec.rootfs, spec.disk_bytes, spec.hostname)
        # Opened while still dumpable: afterwards /proc/self belongs to global root.
        self.oom_fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        net.setup_loopback()
        sc.sethostname(spec.hostname)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        # Every process the init starts gets no capability across exec (root's file
        # capabilities are masked by the bounding set) and dumps no core; the init keeps its
        # own effective set for the file operations it does as the room's root.
        caps.empty_bounding_set()
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.seccomp_bpf:
            # Last step of set-up: from here on the init (and every payload it forks, which
            # inherits the filter across fork and exec) cannot mount, unshare, load keys, ...
            from . import seccomp

            seccomp.install(self.seccomp_bpf)

    # --- serving ------------------------------------------------------------------------------

    def serve(self) -> None:
        self.sel.register(self.ctl, selectors.EVENT_READ, "ctl")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        while True:
            for key, _ in self.sel.select(self._connect_timeout()):
                if isinstance(key.data, portops.Connector):
                    self._step_connect(key.data)
                elif isinstance(key.data, tuple):
                    self._step_job(*key.data)
                elif key.data == "wake":
                    try:
                        while os.read(self.wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                else:
                    try:
                        msg, fds = channel.recv(self.ctl, messages.to_init)
                    except (channel.ChannelClosed, ConnectionError):
                        return  # the daemon is gone: so is the room
                    except InterruptedError:
                        continue
                    # (channel.BadMessage is not caught: garbage on the channel ends the init,
                    # and with it the room — see main)
                    self.dispatch(msg, fds)
            self._expire_connects()

    def reply(self, msg: messages.ToInit, result: Reply, fds: list[int] | None = None) -> None:
        channel.send(self.ctl, msgspec.structs.replace(result, re=msg.id), fds or ())

    def dispatch(self, msg: messages.ToInit, fds: list[int]) -> None:
        """Do one request and answer it. ``fds`` are closed here, unless a job took them."""
        taken = False
        try:
            match msg:
                case messages.Spawn():
                    self.reply(msg, messages.SpawnReply(pid=self.spawn(msg, fds)))
                case messages.Kill(run=run, sig=sig):
                    self.reply(msg, messages.KillReply(found=self.kill(run, sig)))
                case messages.KillAll():
                    self.killall()
                    self.reply(msg, messages.KillAllReply())
                case messages.Ping():
                    self.reply(msg, messages.Pong(runs=len(self.runs)))
                case messages.Write():
                    job = fileops.FileWriter(msg, fds)
                    taken = True  # the job's now (it closes them)
                    self.sel.register(job.fd, selectors.EVENT_READ, (msg, job))
                case messages.OpenRead():
                    opened, fd = fileops.open_read(msg)
                    self._reply_fd(msg, opened, fd)
                case messages.ListDir():
                    listing, fd = fileops.list_dir(msg)
                    self._reply_fd(msg, listing, fd)
                case messages.Exists():
                    self.reply(msg, fileops.exists(msg))
                case messages.Delete():
                    self.reply(msg, fileops.delete(msg))
                case messages.Rename():
                    self.reply(msg, fileops.rename(msg))
                case messages.Mkdir():
                    self.reply(msg, fileops.mkdir(msg))
                case messages.Code():
                    self.reply(msg, fileops.code_dir(msg))
                case messages.Connect():
                    self._connect(msg)
                case messages.Listen():
                    listening, lfd = portops.listen(msg)
                    self._reply_fd(msg, listening, lfd)
                case messages.Namespaces():
                    nsfds = [os.open(f"/proc/self/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
                             for ns in ("user", "net")]
                    try:
                        self.reply(msg, messages.NamespaceFds(), nsfds)
                    finally:
                        for fd in nsfds:
                            os.close(fd)
                case messages.NewInotify():
                    inotify, ifd = watchops.new_inotify()
                    self._reply_fd(msg, inotify, ifd)
                case messages.AddWatch():
                    self.reply(msg, watchops.add_watch(msg, fds))
                case messages.OpenPty():
                    pty, pair = ptyops.open_pty(msg)
                    try:
                        self.reply(msg, pty, pair)
                    finally:
                        for fd in pair:
                            os.close(fd)
                case _:  # mypy: every ToInit op has its case above
                    assert_never(msg)
        except Exception as err:  # noqa: BLE001 - a bad request must never take the room down
            self.reply(msg, error_reply(err))
        finally:
            if not taken:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass  # a handler that closed it already must not end the room

    def _reply_fd(self, msg: messages.ToInit, result: Reply, fd: int) -> None:
        try:
            self.reply(msg, result, [fd])
        finally:
            os.close(fd)

    def _step_job(self, msg: messages.ToInit, job: Job) -> None:
        result: Reply | None
        try:
            result = job.step()
        except Exception as err:  # noqa: BLE001 - a bad job must never take the room down
            result = error_reply(err)
        if result is None:
            return
        self.sel.unregister(job.fd)
        job.close()
        self.reply(msg, result)

    # --- ports (portops.py): connects inside the room's network namespace ----------------------

    def _connect(self, msg: messages.Connect) -> None:
        job = portops.Connector(msg)
        try:
            done = job.start()
        except BaseException:
            job.close()
            raise
        if done is not None:
            self._finish_connect(job, done)
            return
        self.connects.add(job)
        self.sel.register(job.fd, selectors.EVENT_WRITE, job)

    def _step_connect(self, job: portops.Connector) -> None:
        self.sel.unregister(job.fd)
        try:
            done = job.step()
        except Exception as err:  # noqa: BLE001 - a failed connect is an answer, not a crash
            self.connects.discard(job)
            job.close()
            self.reply(job.msg, error_reply(err))
            return
        if done is None:  # refused on 127.0.0.1: trying ::1 now
            self.sel.register(job.fd, selectors.EVENT_WRITE, job)
            return
        self.connects.discard(job)
        self._finish_connect(job, done)

    def _finish_connect(self, job: portops.Connector, done: messages.Connected) -> None:
        try:
            self.reply(job.msg, done, [job.fd])
        finally:
            job.close()

    def _connect_timeout(self) -> float | None:
        if not self.connects:
            return None
        return max(0.0, min(j.deadline for j in self.connects) - time.monotonic())

    def _expire_connects(self) -> None:
        if not self.connects:
            return
        now = time.monotonic()
        for job in [j for j in self.connects if j.expired(now)]:
            self.connects.discard(job)
            self.sel.unregister(job.fd)
            job.close()
            self.reply(job.msg, error_reply(job.timeout_error()))

    # --- payloads -----------------------------------------------------------------------------

    def spawn(self, msg: messages.Spawn, fds: list[int]) -> int:
        if len(fds) < 3:
            raise OSError(errno.EINVAL, "spawn needs stdin, stdout and stderr fds")
        if self._fast_path_ok(msg):
            return self._spawn_fast(msg, fds)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        self._oom(PAYLOAD_OOM_SCORE_ADJ)  # inherited by the child
        try:
            pid = os.fork()
        except BaseException:
            self._oom(0)
            raise
        if pid == 0:
            os.close(err_r)
            _payload(msg, fds, err_w)  # never returns
        self._oom(0)
        os.close(err_w)
        self.runs[pid] = (msg.run, err_r)
        self.started[pid] = time.monotonic()
        return pid

    def _oom(self, value: int) -> None:
        # Any process may raise its own score and lower it back down to 0 (its
        # oom_score_adj_min) without privilege: the init stays at 0 while everything it starts
        # runs at PAYLOAD_OOM_SCORE_ADJ.
        os.pwrite(self.oom_fd, str(value).encode(), 0)

    def _fast_path_ok(self, msg: messages.Spawn) -> bool:
        # posix_spawn cannot change the uid or set rlimits in the child, and a pids-limited run
        # cgroup would count the init itself while it stands in it.
        return (msg.user == "root" and set(msg.rlimits) <= {"core"} and not msg.tty
                and not msg.pids_limited and bool(self.home_fds or not msg.ncg))

    def _spawn_fast(self, msg: messages.Spawn, fds: list[int]) -> int:
        """posix_spawn (vfork + exec): ~0.5 ms where fork() of this 35 MB process costs ~2-5.

        What the fork path does in the child is done here around the spawn instead: the init
        steps into the run's cgroup (the child is born inside it) and into the run's cwd, and
        steps back; setsid, stdio and signal dispositions are posix_spawn attributes; the
        bounding set, no_new_privs and the seccomp filter are the init's own, inherited.
        """
        run, argv, env, ncg, cwd = msg.run, msg.argv, msg.env, msg.ncg, msg.cwd
        try:
            enter_cwd(cwd)
        except OSError as err:
            return self._failed(run, fds[2], "chdir", err, f"cwd {cwd}", 1)
        try:
            try:
                exe = find_executable(argv[0], env.get("PATH", os.defpath))
            except OSError as err:
                code = 127 if err.errno == errno.ENOENT else 126
                return self._failed(run, fds[2], "exec", err, argv[0], code)
            cgroup.enter(fds[3:3 + ncg])  # an OSError here is the sandbox's: the caller's XX
            self._oom(PAYLOAD_OOM_SCORE_ADJ)  # inherited by the child
            try:
                pid = os.posix_spawn(
                    exe, argv, env, setsid=True, setsigmask=(), setsigdef=_RESET_SIGNALS,
                    file_actions=[(os.POSIX_SPAWN_DUP2, fds[i], i) for i in range(3)])
            except OSError as err:
                if err.errno not in _EXEC_ERRNOS:
                    raise
                code = 127 if err.errno == errno.ENOENT else 126
                return self._failed(run, fds[2], "exec", err, argv[0], code)
            finally:
                self._oom(0)
                if ncg:
                    cgroup.enter(self.home_fds)
        finally:
            os.chdir("/")
        self.runs[pid] = (run, -1)
        self.started[pid] = time.monotonic()
        return pid

    def _failed(self, run: str, stderr: int, stage: str, err: OSError, what: str,
                code: int) -> int:
        """A payload that could not start: say why on its stderr, exit as a shell would."""
        num = err.errno or errno.EIO
        try:
            os.write(stderr, f"sandboxd: {what}: {os.strerror(num)}\n".encode())
        except OSError:
            pass
        channel.send(self.ctl, messages.Exit(run=run, status=code << 8,
                                             failure=messages.Failure(stage=stage, errno=num)))
        return 0

    def kill(self, run: str, sig: int) -> bool:
        for pid, (rid, _) in self.runs.items():
            if rid == run:
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        return False
                return True
        return False

    def killall(self) -> None:
        # From PID 1, kill(-1) reaches every process of the namespace except ourselves.
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            entry = self.runs.pop(pid, None)
            if entry is None:
                continue  # an orphan the room left behind: reaping it is all PID 1 owes it
            run, err_r = entry
            failure = None
            if err_r >= 0:
                try:
                    data = os.read(err_r, 256)
                    if data:
                        stage, _, num = data.decode().partition(":")
                        failure = messages.Failure(stage=stage, errno=int(num or 0))
                finally:
                    os.close(err_r)
            channel.send(self.ctl, messages.Exit(
                run=run, status=status,
                rusage=messages.Rusage(utime=ru.ru_utime, stime=ru.ru_stime,
                                       maxrss_kb=ru.ru_maxrss),
                failure=failure,
                # CLOCK_MONOTONIC is one clock for the room and the daemon (no time namespace):
                # the daemon splits a run's wall time into spawn, program and report.
                t=(self.started.pop(pid, 0.0), time.monotonic())))


# --- resolving a run's cwd and program inside the room ------------------------------------------
# The init's fd table holds directories of its own cgroup leaves on the *host's* cgroupfs
# (home_fds, opened before unshare). A plain chdir()/execvp() in the init, or in a payload child
# before exec, resolves /proc/self/fd/N (directly or through a symlink the room planted) through
# that table: ``cwd: /proc/self/fd/3`` put payloads on the host cgroupfs, from where ``..`` walked
# the host's mount tree (issue 10, C1/H1), and ``/proc/self/exe`` ran the host's Python inside the
# room (M6, the runc CVE-2019-5736 precondition). Every lookup below is openat2 with
# RESOLVE_NO_MAGICLINKS from the room's root: no /proc/<pid>/{fd/*,cwd,root,exe} on the way.
_AT_FDCWD = -100
_NO_MAGIC = sc.RESOLVE_NO_MAGICLINKS


def enter_cwd(cwd: str) -> None:
    """chdir into ``cwd`` as resolved inside the room; fchdir checks search permission."""
    fd = sc.openat2(_AT_FDCWD, cwd, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0, _NO_MAGIC)
    try:
        os.fchdir(fd)
    finally:
        os.close(fd)


def find_executable(name: str, path_env: str) -> str:
    """The file ``execvp(name)`` would run, looked up without magic links (see above).

    Like execvp: a name with a slash is taken as it is (relative to the cwd), otherwise each
    PATH entry in turn (an empty one is the cwd); the first regular file with an execute bit
    wins, and EACCES is remembered over ENOENT. The kernel checks the permission itself at exec.
    """
    if not name:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    candidates = [name] if "/" in name else [
        os.path.join(d or ".", name) for d in path_env.split(":")]
    failure: OSError | None = None
    for cand in candidates:
        try:
            fd = sc.openat2(_AT_FDCWD, cand, os.O_PATH | os.O_CLOEXEC, 0, _NO_MAGIC)
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.ENOTDIR) or failure is None:
                failure = OSError(err.errno, os.strerror(err.errno or errno.EIO), cand)
            continue
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return cand
        failure = OSError(errno.EACCES, os.strerror(errno.EACCES), cand)
    if failure is None or failure.errno in (errno.ENOENT, errno.ENOTDIR):
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    raise failure


def _payload(msg: messages.Spawn, fds: list[int], err_w: int) -> None:
    """The payload child, between fork and exec. Reports a failed step on ``err_w``."""
    stage = "setsid"
    argv = msg.argv
    try:
        # A session of its own: no controlling terminal to inject into (TIOCSTI), and a process
        # group the init can signal as a whole.
        os.setsid()
        stage = "cgroup"
        # The room cannot see /sys/fs/cgroup: the daemon passed the run cgroup's fds.
        cgroup.enter(fds[3:3 + msg.ncg])
        stage = "stdio"
        for i in range(3):
            os.dup2(fds[i], i)
        if msg.tty:
            stage = "tty"
            ptyops.take_controlling_tty(SANDBOX_UID if msg.user == "sandbox" else None)
        stage = "signals"
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in range(1, signal.NSIG):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        stage = "rlimits"
        import resource

        for name, value in msg.rlimits.items():
            which = getattr(resource, RLIMIT_NAMES[name])
            resource.setrlimit(which, (value, value))
        stage = "user"
        if msg.user == "sandbox":
            os.setgroups([])
            os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        stage = "chdir"
        enter_cwd(msg.cwd)
        stage = "privileges"
        caps.drop_privileges()
        stage = "exec"
        env = msg.env
        # Resolved while this child still holds the init's fds (CLOEXEC, gone only at exec):
        # /proc/self/fd/N here is the init's table, so the lookup must refuse magic links.
        exe = find_executable(argv[0], env.get("PATH", os.defpath))
        stage = "fds"
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 1 << 20)
        stage = "exec"
        os.execve(exe, argv, env)
    except BaseException as err:  # noqa: BLE001 - nothing may unwind past fork
        num = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
        try:
            if stage in ("exec", "chdir"):
                what = argv[0] if stage == "exec" else f"cwd {msg.cwd}"
                os.write(2, f"sandboxd: {what}: {os.strerror(num)}\n".encode())
            os.write(err_w, f"{stage}:{num}".encode())
        finally:
            code = 127 if stage == "exec" and num == errno.ENOENT else 126 if stage == "exec" else 1
            os._exit(code)
    os._exit(127)


def main(spec: messages.RoomSpec, ctl: socket.socket, parent_gone: int,
         home_fds: list[int] | None = None, scratch_fd: int = -1) -> None:
    """Entry from the set-up process's fork; never returns."""
    try:
        caps.set_name(f"sandboxd: room {spec.room_id} init")
        # The zygote writes here once it has reaped our set-up process, i.e. once we are its
        # child: only now does PDEATHSIG point at the right parent. EOF: the zygote died.
        if os.read(parent_gone, 1) != b"g":
            os._exit(1)
        os.close(parent_gone)
        caps.die_with_parent()
        # Dumpable during set-up only (the uid change in the set-up process cleared it), so
        # that /proc/self of the fresh procfs is ours to open; see the end of set-up.
        caps.set_dumpable(True)
        init = Init(spec, ctl, home_fds, scratch_fd)
        init.setup()
        # Only now (set-up opened its /proc/self files): nothing may ptrace the init or read
        # its memory, not even a payload of the same uid.
        caps.non_dumpable()
        channel.send(ctl, messages.Ready(pid=os.getpid()))
    except BaseException as err:  # noqa: BLE001
        try:
            channel.send(ctl, messages.Failed(error=f"{type(err).__name__}: {err}"))
        finally:
            os._exit(1)
    try:
        init.serve()
    except BaseException as err:  # noqa: BLE001 - garbage from the channel (BadMessage) too
        print(f"sandboxd room init: {type(err).__name__}: {err}", file=sys.stderr)
        os._exit(1)
    os._exit(0)
