"""sandboxd main(): config, logging, signals, cgroup bootstrap, readiness, orderly shutdown.

Start-up order: config -> logging -> the state-dir lock (one daemon per state dir) -> cgroup
backend (v2 bootstrap moves us into a leaf *before* anything forks) -> the zygote -> reconcile
what a crashed instance left -> the seccomp filter -> listen (or take the socket systemd passed)
-> READY=1.

Shutdown on SIGTERM/SIGINT, in a fixed order: STOPPING=1 -> stop accepting -> destroy every room
-> close connections -> remove the socket -> stop the zygote -> exit 0 (within 5 s). Teardowns
that have not finished after SHUTDOWN_DEADLINE_S are cut short: every room init left is SIGKILLed
and we exit 1. A second signal forces the same at once.

The zygote dying (killed, a bug) takes the room inits it forked with it (their PDEATHSIG): their
rooms answer SANDBOX_UNAVAILABLE (reason "killed"), and a new zygote is started for new rooms. A
zygote that keeps dying stops the daemon with exit code 1, so Restart=on-failure applies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

from . import __version__, egress, errors, kernel, persistence
from . import config as configmod
from .coderun.service import CodeRunService
from .config import DaemonConfig
from .context import Services
from .facts import HostFacts
from .jail import caps
from .jail import user as idmaps
from .jail.cgroup.detect import detect as detect_cgroups
from .jail.cgroup.interface import CgroupBackend
from .jail.handles import Zygote
from .rooms import RoomManager
from .server import Server

log = logging.getLogger("sandboxd")

#: Past this, a shutdown stops waiting for room teardowns: it SIGKILLs every room init left and
#: exits 1 (the unit's TimeoutStopSec= is 30 s; a stop must never hang).
SHUTDOWN_DEADLINE_S = 10.0
#: More zygote deaths than this within a minute: something is wrong with the host, not a fluke.
ZYGOTE_RESTARTS_PER_MIN = 3


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.zygote = Zygote()
        self.server = Server(config)
        self.backend: CgroupBackend | None = None
        self.rooms: RoomManager | None = None
        self.facts: HostFacts | None = None
        self.seccomp: dict[str, Any] = {"enabled": False}
        # How rooms are mapped (subordinate slices, or the single-id fallback): decided in run().
        self.ids: idmaps.IdPlan = idmaps.IdPlan("single", os.getuid(), os.getgid(),
                                                reason="not decided yet")
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._zygote_deaths: list[float] = []
        self._zygote_restart: asyncio.Future[None] | None = None
        self._signals = 0
        self._lock_fd = -1
        self.started = time.time()

    # --- life cycle ---------------------------------------------------------------------------

    def _lock_state_dir(self) -> None:
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.config.state_dir, "sandboxd.lock"),
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise errors.ValidationError(
                f"another sandboxd uses the state dir {self.config.state_dir}") from err

    def _build_seccomp(self) -> bytes | None:
        # Fail closed (nsjail once dropped its filter silently, PR #285): without a filter the
        # daemon does not start unless the config says seccomp = false.
        if not self.config.seccomp:
            self.seccomp = {"enabled": False, "reason": "disabled by configuration"}
            log.warning("seccomp disabled by configuration: rooms run without a syscall filter")
            return None
        from .jail import seccomp

        t = time.perf_counter()
        try:
            bpf = seccomp.build_filter()
        except Exception as err:
            raise errors.InternalError(f"cannot build the seccomp filter: {err}") from err
        self.seccomp = {"enabled": True, "rules": len(seccomp.RULES),
                        "buildMs": round((time.perf_counter() - t) * 1000, 1)}
        return bpf

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        # Same-uid host processes must not ptrace us or read our memory and environment through
        # /proc (bubblewrap PR #114); that includes anything that ever runs as our uid.
        caps.non_dumpable()
        # Take a socket systemd passed before anything forks, so LISTEN_* is gone from the
        # environment of everything we start.
        inherited = _inherited_socket()
        self._lock_state_dir()
        self.ids = _id_plan()
        if self.ids.mode == "single":
            log.warning("id mapping: single (%s); cost: %s", self.ids.reason, idmaps.SINGLE_COST)
        else:
            log.info("id mapping: %d slices of %d subordinate ids from uid %d", self.ids.slices,
                     self.ids.slice_size, self.ids.uid_start)
        # v1 rooms go under a directory of this instance (keyed by the state dir), so that a
        # second daemon of the same user cannot reconcile them away (nor we its rooms).
        instance = "i-" + hashlib.sha256(os.path.realpath(self.config.state_dir).encode()
                                         ).hexdigest()[:12]
        backend = detect_cgroups(self.config.cgroup_backend, parent=self.config.cgroup_parent,
                                  instance=instance)
        self.backend = backend
        backend.bootstrap()
        log.info("cgroup backend: %s", backend.describe())
        await self.zygote.start()
        self.zygote.on_death = self._zygote_died
        rooms = RoomManager(self.config, backend, self.zygote, self.ids, self._build_seccomp())
        rooms.sleeper = persistence.Sleeper(rooms)
        rooms.network = egress.Network(self.config)
        self.rooms = rooms
        features = kernel.probe()
        for f in features:
            if not f.present:
                log.log(logging.ERROR if f.required else logging.WARNING,
                        "kernel lacks %s (since %s): %s", f.name, f.since, f.cost)
        self.facts = HostFacts(self.config, backend, self.ids, self.seccomp,
                               kernel=kernel.summary(features),
                               egress=rooms.network.describe())
        self.server.services = Services(rooms=rooms, config=self.config, facts=self.facts,
                                        coderun=CodeRunService(self.config.rootfs))
        cleaned = rooms.reconcile()
        if cleaned:
            log.warning("reconciled leftovers of a previous instance: %s", ", ".join(cleaned))
        swept = persistence.Store(self.config.state_dir).sweep()
        if swept:
            log.warning("removed %d half-written backup file(s) of a previous instance", swept)
        busy = self.ids.quarantine_busy()
        if busy:
            log.warning("id slices %s still own host processes: not used until restart", busy)
        await self.server.start(self.config.socket, inherited, self.config.socket_group)
        reaper = asyncio.ensure_future(rooms.reap_idle())
        watchdog = asyncio.ensure_future(_watchdog())
        _notify("READY=1\nSTATUS=serving")
        log.info("sandboxd %s listening on %s (rootfs %s)", __version__, self.config.socket,
                 self.config.rootfs)
        await self._stop.wait()
        _notify("STOPPING=1")
        log.info("shutting down")
        t = time.monotonic()
        self.server.stop_accepting()
        reaper.cancel()
        watchdog.cancel()
        code = self._exit_code
        try:
            await asyncio.wait_for(rooms.shutdown(), SHUTDOWN_DEADLINE_S)
        except TimeoutError:
            # A teardown that cannot finish must not keep the service from stopping: kill what
            # is left (the rooms' pid namespaces die with their inits) and say so.
            log.error("rooms not destroyed within %.0f s: killing %d room(s) and exiting",
                      SHUTDOWN_DEADLINE_S, len(rooms.rooms))
            rooms.kill_all()
            code = 1
        except Exception:
            log.exception("shutdown of the rooms failed")
            rooms.kill_all()
            code = 1
        try:
            backend.release()
        except Exception:
            log.exception("shutdown step: releasing the cgroup backend failed")
            code = 1
        for name, step in (("server.close", self.server.close), ("zygote.stop", self.zygote.stop)):
            try:
                await asyncio.wait_for(step(), 5)
            except Exception:
                log.exception("shutdown step %s failed", name)
                code = 1
        log.info("shutdown complete in %.0f ms", (time.monotonic() - t) * 1000)
        return code

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self._stop.set()
            return
        log.error("second signal: forcing exit")
        if self.rooms is not None:
            self.rooms.kill_all()
        os._exit(1)

    def _zygote_died(self) -> None:
        """The zygote is gone (and the room inits it forked died with it: their PDEATHSIG).
        Start a new one so new rooms can be made; if it keeps dying, stop with a non-zero code
        so that the service manager (Restart=on-failure) takes over."""
        if self._stop.is_set():
            return
        now = time.monotonic()
        self._zygote_deaths = [t for t in self._zygote_deaths if now - t < 60] + [now]
        if len(self._zygote_deaths) > ZYGOTE_RESTARTS_PER_MIN:
            log.critical("the zygote died %d times within a minute: stopping",
                         len(self._zygote_deaths))
            self._exit_code = 1
            self._stop.set()
            return
        log.error("the zygote died: its rooms are lost; starting a new one")
        self._zygote_restart = asyncio.ensure_future(self._restart_zygote())

    async def _restart_zygote(self) -> None:
        try:
            await self.zygote.reap()
            await self.zygote.start()
            self.zygote.on_death = self._zygote_died
            log.warning("zygote restarted (generation %d)", self.zygote.generation)
        except Exception as err:  # noqa: BLE001 - any failure to restart means: stop
            log.critical("cannot restart the zygote (%s): stopping", err)
            self._exit_code = 1
            self._stop.set()


def _id_plan() -> idmaps.IdPlan:
    import pwd

    uid, gid = os.getuid(), os.getgid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return idmaps.plan(name, uid, gid)


def _notify(state: str) -> None:
    try:
        from . import _systemd
    except ImportError:
        return
    _systemd.notify(state)


def _inherited_socket() -> socket.socket | None:
    try:
        from . import _systemd
    except ImportError:
        return None
    socks = _systemd.listen_fds()
    return socks[0] if socks else None


async def _watchdog() -> None:
    try:
        from . import _systemd
    except ImportError:
        return
    interval = _systemd.watchdog_interval()
    if not interval:
        return
    while True:
        _systemd.notify("WATCHDOG=1")
        await asyncio.sleep(interval / 2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sandboxd", description="rootless local sandbox daemon")
    p.add_argument("--socket", help="Unix socket path (default: $SANDBOXD_SOCKET, "
                   "/run/sandboxd/sandboxd.sock as root, else $XDG_RUNTIME_DIR/sandboxd/...)")
    p.add_argument("--state-dir", help="state directory (default /var/lib/sandboxd as root, "
                   "else $XDG_STATE_HOME/sandboxd)")
    p.add_argument("--rootfs", help="runtime tree directory, or 'host' (default: the built "
                   "tree if present, else host)")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--log-level", default=None,
                   choices=["debug", "info", "warning", "error", "critical"])
    p.add_argument("--version", action="version", version=f"sandboxd {__version__}")
    return p.parse_args(argv)


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every room and run holds fds in the daemon, and
    the usual soft 1024 ran out under a few tenants' load (issue 10, H5). The zygote puts the
    soft limit back down for rooms (zygote.main)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("RLIMIT_NOFILE soft %d -> %d", soft, hard)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        cfg = configmod.load(args.config, {"socket": args.socket, "state_dir": args.state_dir,
                                           "rootfs": args.rootfs, "log_level": args.log_level})
    except errors.SandboxError as err:
        print(f"sandboxd: {err.message}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_fd_limit()
    try:
        code = asyncio.run(Daemon(cfg).run())
    except errors.SandboxError as err:
        log.critical("%s", err.message)
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
