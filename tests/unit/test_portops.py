"""The room init's ``Connect`` (jail/portops.py) through a real ``init.Init`` dispatch, on the
host's own loopback (unprivileged; the room's network namespace is the integration tier's):
the connected socket comes back as the reply's fd, a refused port and a stuck connect are typed
errors, ::1 is tried when 127.0.0.1 refuses, and a connect in progress blocks no other request."""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import skip_unless_ci
from test_init import Harness

from sandboxd.jail import messages, portops


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    for job in list(harness.init.connects):
        job.close()
    harness.close()


def _call(h: Harness, msg: messages.Connect) -> tuple[messages.FromInit, list[int]]:
    """Dispatch ``msg`` and run the init's loop steps for connects until it is answered."""
    msg = messages.Connect(id=next(h.ids), port=msg.port, timeout_ms=msg.timeout_ms)
    h.init.dispatch(msg, [])
    for _ in range(1000):
        ready, _, _ = select.select([h.daemon], [], [], 0)
        if ready:
            break
        for key, _ in h.init.sel.select(0.01):
            if isinstance(key.data, portops.Connector):
                h.init._step_connect(key.data)
        h.init._expire_connects()
    reply, fds = h.recv()
    assert isinstance(reply, messages.Reply) and reply.re == msg.id
    return reply, fds


def _listener(family: int = socket.AF_INET, host: str = "127.0.0.1",
              backlog: int = 8) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(backlog)
    return s


def _free_port() -> int:
    # A port nothing listens on, on 127.0.0.1 and on ::1.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connect_hands_back_a_connected_socket(h: Harness) -> None:
    with _listener() as srv:
        reply, fds = _call(h, messages.Connect(port=srv.getsockname()[1]))
        assert isinstance(reply, messages.Connected) and reply.address == "127.0.0.1"
        assert len(fds) == 1
        with socket.socket(fileno=fds[0]) as ours:
            peer, _ = srv.accept()
            with peer:
                ours.sendall(b"ping")
                assert peer.recv(4) == b"ping"
                peer.sendall(b"pong")
                assert ours.recv(4) == b"pong"
    assert not h.init.connects  # and the init kept no copy of the socket


def test_a_refused_port_is_econnrefused(h: Harness) -> None:
    reply, fds = _call(h, messages.Connect(port=_free_port()))
    assert isinstance(reply, messages.ErrorReply) and reply.errno == errno.ECONNREFUSED
    assert fds == []


def test_port_out_of_range_is_einval(h: Harness) -> None:
    reply, _ = _call(h, messages.Connect(port=70000))
    assert isinstance(reply, messages.ErrorReply) and reply.errno == errno.EINVAL


def test_ipv6_loopback_is_tried_when_ipv4_refuses(h: Harness) -> None:
    try:
        srv = _listener(socket.AF_INET6, "::1")
    except OSError:
        skip_unless_ci("this host has no ::1 loopback")
    with srv:
        port = srv.getsockname()[1]
        with socket.socket() as v4:  # nothing on 127.0.0.1:port
            with contextlib.suppress(OSError):
                v4.bind(("127.0.0.1", port))
            reply, fds = _call(h, messages.Connect(port=port))
        assert isinstance(reply, messages.Connected) and reply.address == "::1"
        socket.socket(fileno=fds[0]).close()


def test_a_stuck_connect_times_out_without_blocking_other_requests(h: Harness) -> None:
    """A server whose accept backlog is full: the connect stays in progress, the init answers
    a ping meanwhile, and the connect is ETIMEDOUT at its deadline."""
    with _listener(backlog=0) as srv:
        port = srv.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the backlog (nothing accepts)
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
                fillers.append(c)
            job_msg = messages.Connect(id=99, port=port, timeout_ms=50)
            h.init.dispatch(job_msg, [])
            if not h.init.connects:  # the kernel took it after all: nothing to test here
                reply, fds = h.recv()
                for fd in fds:
                    socket.socket(fileno=fd).close()
                skip_unless_ci("the loopback accept backlog did not fill")
            reply, _ = h.call(messages.Ping())
            assert isinstance(reply, messages.Pong)  # not blocked by the connect
            timeout = h.init._connect_timeout()
            assert timeout is not None and timeout <= 0.05
            time.sleep(0.06)
            h.init._expire_connects()
            reply, fds = h.recv()
            assert isinstance(reply, messages.ErrorReply) and reply.re == 99
            assert reply.errno == errno.ETIMEDOUT and fds == []
            assert not h.init.connects and h.init._connect_timeout() is None
        finally:
            for c in fillers:
                c.close()


def test_the_connector_alone_reports_in_progress_then_connected() -> None:
    with _listener() as srv:
        job = portops.Connector(messages.Connect(port=srv.getsockname()[1]), now=0.0)
        try:
            done = job.start()
            if done is None:  # in progress: the next writable step finishes it
                done = job.step()
            assert done == messages.Connected(address="127.0.0.1")
            assert job.fd >= 0 and job.expired(1e9) and not job.expired(0.0)
        finally:
            job.close()
        assert job.fd == -1
