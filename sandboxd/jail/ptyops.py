"""Terminals, the init's side: a pty pair of the room's own devpts (issue 15).

Theory of operation. The room's /dev/ptmx is its devpts instance's (``mnt.py``: newinstance,
max=PTY_MAX), so the pair opened here is the room's, never the host's (CVE-2017-5226 class).
The init opens the master, unlocks it, opens the slave through the master (TIOCGPTPEER: no path
lookup that room code could race), sets the window size and passes both fds to the daemon
(``messages.PtyOpened``). The daemon then spawns the terminal's program as a run with the slave
as its stdin, stdout and stderr (``Spawn.tty``): the payload, already a session leader (its
setsid), makes the slave its controlling terminal (TIOCSCTTY) and, for the sandbox user, owns
it. The daemon keeps the master: it reads the program's output, writes input and resizes it
(TIOCSWINSZ on the master: the kernel sends SIGWINCH to the foreground process group).
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios

from . import messages

#: ioctl(master, TIOCGPTPEER, flags) -> an fd of the slave (Linux 4.13; not in termios)
TIOCGPTPEER = getattr(termios, "TIOCGPTPEER", 0x5441)
TIOCSPTLCK = getattr(termios, "TIOCSPTLCK", 0x40045431)
TIOCGPTN = getattr(termios, "TIOCGPTN", 0x80045430)


def set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_pty(msg: messages.OpenPty) -> tuple[messages.PtyOpened, list[int]]:
    """(the reply, [master, slave]) — fds the caller sends and closes."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        (num,) = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, struct.pack("I", 0)))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            set_size(master, msg.cols, msg.rows)
        except BaseException:
            os.close(slave)
            raise
    except BaseException:
        os.close(master)
        raise
    return messages.PtyOpened(name=f"/dev/pts/{num}"), [master, slave]


def take_controlling_tty(user_uid: int | None) -> None:
    """In the payload (a session leader with the slave on 0, 1, 2): make it the controlling
    terminal; ``user_uid``: the slave's new owner (the run's user, when not root)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    if user_uid is not None:
        os.fchown(0, user_uid, -1)
