"""Boot a real systemd in systemd-nspawn for the service tests, and clean up after it.

Theory of operation
-------------------
``build-tree.sh`` builds (once, cached outside the checkout) a small Debian trixie tree with
systemd.
``Container`` boots it with ``systemd-nspawn -b``:

* ``--volatile=overlay``: the cached tree is the read-only lower layer and every write of a run
  goes to a tmpfs, so the cache stays pristine and runs cannot leak into each other.
* ``--register=no --keep-unit``: there is no machined and no host D-Bus on the machines we run on
  (PID 1 is not systemd), so nspawn must neither register a machine nor ask for a scope.
* nspawn is started from a cgroup of its own (in every hierarchy the host mounts) that we remove
  afterwards: nspawn leaves empty cgroups behind otherwise.
* ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``: the container gets a pure cgroup2 tree even though the
  host is hybrid. Its systemd (257) needs that, and the host binds every controller to v1, so the
  container's cgroup2 has no controllers: sandboxd there falls back to a non-v2 backend.
* ``--notify-ready=yes`` with our own ``NOTIFY_SOCKET``: nspawn forwards READY=1 once the
  container's systemd reached its default target, so we learn it is up without polling.
* Commands run in the container through ``nsenter -t <container PID 1> -a`` (all namespaces, its
  root and working directory) with a clean environment; ``as_user`` adds ``setpriv`` to drop to a
  container user with that user's supplementary groups.
* Shutdown: SIGTERM to nspawn makes it ask the container's systemd to power off; SIGKILL after a
  bounded wait.

Only the standard library is used: this module also runs where sandboxd is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The tree installed into the container; SANDBOXD_NSPAWN_SRC points at another checkout (e.g. a
# patched copy) without touching this one.
CHECKOUT = Path(os.environ.get("SANDBOXD_NSPAWN_SRC") or HERE.parent.parent)
BUILD_SCRIPT = HERE / "build-tree.sh"
PIP_CACHE = Path(os.environ.get("SANDBOXD_NSPAWN_PIP_CACHE", "/var/cache/sandboxd-ci/pip"))
CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing_requirements() -> str | None:
    """Why the nspawn tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn and mmdebstrap)"
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "flock"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def build_tree(timeout: float = 1800) -> Path:
    """Build the tree if needed (minutes the first time, nothing later) and return its path."""
    out = subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE,
                         timeout=timeout, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


# --- cgroups -------------------------------------------------------------------------------------

def _cgroup_dirs(name: str) -> list[Path]:
    """Our cgroup in every writable hierarchy the host has (v1 named, v2 unified or pure v2)."""
    dirs = []
    for root in CGROUP_ROOTS:
        if os.path.exists(os.path.join(root, "cgroup.procs")):
            dirs.append(Path(root, name))
    # Pure cgroup2 hosts mount it at /sys/fs/cgroup itself; hybrid ones at .../unified.
    if Path("/sys/fs/cgroup/unified/cgroup.procs").exists():
        dirs = [d for d in dirs if d.parent != Path("/sys/fs/cgroup")]
    return dirs


def _remove_cgroup_tree(top: Path) -> None:
    """rmdir bottom-up; cgroupfs refuses rmdir of a non-empty one, so kill stragglers first."""
    if not top.exists():
        return
    for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda e: -len(e[0])):
        procs = Path(dirpath, "cgroup.procs")
        with contextlib.suppress(OSError):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for _ in range(50):
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


# --- the container -------------------------------------------------------------------------------

class Container:
    """One booted container; use as a context manager."""

    def __init__(self, tree: Path, *, binds_ro: Sequence[tuple[str, str]] = (),
                 binds: Sequence[tuple[str, str]] = (), boot_timeout: float = 60) -> None:
        self.tree = tree
        self.binds_ro = list(binds_ro)
        self.binds = list(binds)
        self.boot_timeout = boot_timeout
        self.name = f"sandboxd-ci-{uuid.uuid4().hex[:8]}"
        self.cgroups = _cgroup_dirs(self.name)
        self.workdir = Path(tempfile.mkdtemp(prefix="sandboxd-nspawn-"))
        self.log_path = self.workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.boot_seconds = 0.0
        self.poweroff_seconds = 0.0

    # -- lifecycle --

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(self) -> None:
        for d in self.cgroups:
            d.mkdir()
        notify_path = self.workdir / "notify.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(0.5)
        args = ["systemd-nspawn", "--quiet", "--boot", f"--directory={self.tree}",
                f"--machine={self.name}", "--volatile=overlay", "--register=no", "--keep-unit",
                "--notify-ready=yes", "--console=read-only", "--resolv-conf=copy-host",
                "--timezone=off", "--link-journal=no"]
        args += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro]
        args += [f"--bind={src}:{dst}" for src, dst in self.binds]
        # The child joins our cgroups before exec, so nspawn (and with it the whole container)
        # lives in a subtree we own and remove in close().
        joins = " && ".join(f"echo $$ > {d}/cgroup.procs" for d in self.cgroups) or "true"
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "NOTIFY_SOCKET": str(notify_path), "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
               "SYSTEMD_LOG_LEVEL": "warning"}
        start = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["/bin/sh", "-c", f'{joins} && exec "$@"', "sh", *args],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        try:
            deadline = start + self.boot_timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode} during "
                                       f"boot:\n{self.console_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"container not ready after {self.boot_timeout}s:\n"
                                       f"{self.console_tail()}")
                try:
                    msg = notify.recv(4096).decode(errors="replace")
                except TimeoutError:
                    continue
                if "READY=1" in msg.split("\n"):
                    break
        finally:
            notify.close()
        self.boot_seconds = time.monotonic() - start
        self.leader = self._find_leader()

    def _find_leader(self) -> int:
        """The container's PID 1 seen from here: a child of nspawn whose innermost pid is 1."""
        assert self.proc is not None
        for _ in range(50):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                with contextlib.suppress(OSError):
                    status = Path("/proc", entry, "status").read_text()
                    fields = dict(line.split(":\t", 1) for line in status.splitlines()
                                  if ":\t" in line)
                    nspid = fields.get("NSpid", "").split()
                    if (fields.get("PPid", "").strip() == str(self.proc.pid)
                            and len(nspid) > 1 and nspid[-1] == "1"):
                        return int(entry)
            time.sleep(0.1)
        raise RuntimeError("cannot find the container's PID 1")

    def poweroff(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)  # nspawn -b: ask the container's systemd to power off
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.poweroff_seconds = time.monotonic() - start

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.poweroff()
        for d in self.cgroups:
            _remove_cgroup_tree(d)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- running things inside --

    def run(self, argv: Sequence[str], *, user: str | None = None, check: bool = True,
            timeout: float = 120, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv in the container as root, or as `user` with that user's groups."""
        if not self.leader:
            raise RuntimeError("container is not booted")
        inner = list(argv)
        if user is not None:
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                     "--reset-env", *inner]
        full_env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
        full_env.update(env or {})
        cmd = ["nsenter", "-t", str(self.leader), "-a", "env", "-i",
               *(f"{k}={v}" for k, v in full_env.items()), *inner]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL if input is None else None,
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv), proc.stdout,
                                                proc.stderr)
        return proc

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run(["/bin/sh", "-ec", script], **kw)  # type: ignore[arg-type]

    def read(self, path: str) -> str:
        return self.run(["cat", path]).stdout


class Local(Container):
    """The machine this runs on, driven like a Container: the VM tier's guest (tests/vm), booted
    by its own systemd with sandboxd installed in its image by ``scripts/install.sh``, so the
    service tests run there on real cgroup v2 with every controller. Nothing to boot or clean."""

    def __init__(self) -> None:
        self.proc = None
        self.leader = 1
        self.boot_seconds = 0.0
        self.poweroff_seconds = 0.0

    def close(self) -> None:
        pass

    def run(self, argv: Sequence[str], *, user: str | None = None, check: bool = True,
            timeout: float = 120, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        inner = list(argv)
        if user is not None:
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                     "--reset-env", *inner]
        full_env = {"PATH": CONTAINER_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
        full_env.update(env or {})
        cmd = ["env", "-i", *(f"{k}={v}" for k, v in full_env.items()), *inner]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL if input is None else None,
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv), proc.stdout,
                                                proc.stderr)
        return proc

    def poweroff(self, timeout: float = 30) -> None:
        """The guest powers itself off when its test unit is done."""


@contextlib.contextmanager
def booted(**kw: object) -> Iterator[Container]:
    tree = build_tree()
    with Container(tree, **kw) as c:  # type: ignore[arg-type]
        yield c


def run_in_tree(tree: Path, argv: Sequence[str], *, binds_ro: Sequence[tuple[str, str]] = (),
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one command in the tree without booting it (nspawn's non-boot mode, volatile)."""
    name = f"sandboxd-ci-{uuid.uuid4().hex[:8]}"
    cgroups = _cgroup_dirs(name)
    for d in cgroups:
        d.mkdir()
    joins = " && ".join(f"echo $$ > {d}/cgroup.procs" for d in cgroups) or "true"
    args = ["systemd-nspawn", "--quiet", f"--directory={tree}", f"--machine={name}",
            "--volatile=overlay", "--register=no", "--keep-unit", "--console=pipe",
            "--timezone=off", "--link-journal=no", "--resolv-conf=off",
            *(f"--bind-ro={s}:{d}" for s, d in binds_ro), *argv]
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
    try:
        return subprocess.run(["/bin/sh", "-c", f'{joins} && exec "$@"', "sh", *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=env)
    finally:
        for d in cgroups:
            _remove_cgroup_tree(d)
