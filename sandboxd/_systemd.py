"""The three pieces of the systemd service protocol sandboxd speaks, without libsystemd.

Theory of operation
-------------------
systemd talks to a service through its environment and one datagram socket:

* ``NOTIFY_SOCKET`` (Type=notify): the address of a Unix datagram socket; the service sends
  newline-separated ``KEY=VALUE`` assignments to it: ``READY=1`` when it serves, ``STOPPING=1`` when
  it starts shutting down, ``WATCHDOG=1`` as keep-alive, ``STATUS=...`` for ``systemctl status``.
  An address starting with ``@`` is in the abstract namespace. systemd attributes a message to the
  sender's pid (SCM_CREDENTIALS, added by the kernel), so with ``NotifyAccess=main`` only the
  daemon's main process may send - never the zygote or a room.
* ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` (socket activation): ``LISTEN_FDS`` sockets,
  already bound and listening, start at fd 3; they are ours only if ``LISTEN_PID`` is our pid
  (a child that inherited the environment must not take them). The variables are removed once
  read, so nothing we spawn sees them.
* ``WATCHDOG_USEC``/``WATCHDOG_PID``: when ``WatchdogSec=`` is set, the service must send
  ``WATCHDOG=1`` more often than every ``WATCHDOG_USEC`` microseconds (half of it is the advice),
  or systemd kills and restarts it.

See sd_notify(3), sd_listen_fds(3), sd_watchdog_enabled(3). No sandboxd imports: this is a leaf.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["LISTEN_FDS_START", "listen_fds", "listen_fds_with_names", "notify",
           "watchdog_interval"]

LISTEN_FDS_START = 3

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (e.g. ``"READY=1"``, ``"STOPPING=1"``, ``"WATCHDOG=1"``) to systemd.

    Returns True if it was sent, False when not started by systemd with ``NOTIFY_SOCKET`` or when
    sending failed (logged). Never raises: a daemon run by hand has nobody to notify.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace, as sd_notify does
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as err:
        log.warning("sd_notify(%r) to %s failed: %s", state, os.environ["NOTIFY_SOCKET"], err)
        return False
    return True


def listen_fds_with_names(unset_environment: bool = True) -> list[tuple[str, socket.socket]]:
    """Sockets passed by systemd socket activation, with their FileDescriptorName= names.

    Empty when not socket-activated or when the fds were meant for another process. The fds are
    made close-on-exec. With `unset_environment` (the default) the LISTEN_* variables are removed,
    so a second call returns nothing and children never see them.
    """
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    names = os.environ.get("LISTEN_FDNAMES", "")
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    try:
        if not pid or int(pid) != os.getpid():
            return []
        n = int(count) if count else 0
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid, count)
        return []
    labels = names.split(":") if names else []
    result = []
    for i, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + n)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)  # family and type are read from the fd
        except OSError as err:
            raise OSError(err.errno, f"LISTEN_FDS fd {fd}: {err.strerror}") from err
        result.append((labels[i] if i < len(labels) else "unknown", sock))
    return result


def listen_fds(unset_environment: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (fd 3 onwards); see listen_fds_with_names."""
    return [sock for _name, sock in listen_fds_with_names(unset_environment)]


def watchdog_interval(unset_environment: bool = False) -> float | None:
    """Seconds within which systemd expects ``WATCHDOG=1``, or None if no watchdog is armed.

    Send ``WATCHDOG=1`` every half of this, from the event loop itself, so that a stuck loop
    stops the pings and systemd restarts the service.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if unset_environment:
        for var in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(var, None)
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec) if usec else 0
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        return None
    return value / 1_000_000 if value > 0 else None
