"""Attacks on the egress walls (issue 14; docs/network.md, "Threat model"). Each one must fail,
and the host's own loopback service (a canary listening on 127.0.0.1 and ::1) must see no
connection from any room but the one that was allowed to reach it by name.

Every address a room tries here either never leaves the room (its own loopback), or is refused
by the forwarder before any connection is made; no test connects anywhere but the host's
loopback.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import sec_helpers as h

sec_user = h.sec_user
client_users = h.client_users
sec_daemon = h.sec_daemon
sec_client = h.sec_client
rooms = h.rooms

pytestmark = [pytest.mark.security, pytest.mark.integration]

CONNECT = ("import socket, sys\nfam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
           "s = socket.socket(fam)\ns.settimeout(5)\n"
           "try:\n    s.connect((sys.argv[1], int(sys.argv[2])))\n    s.sendall(b'x')\n"
           "    print('data', s.recv(10))\nexcept OSError as e:\n    print('error', e.errno)")


class Canary:
    """A host loopback service that records every connection it accepts."""

    def __init__(self) -> None:
        self.socks = []
        self.accepted: list[tuple[str, int]] = []
        s4 = socket.socket()
        s4.bind(("127.0.0.1", 0))
        self.port = s4.getsockname()[1]
        s6 = socket.socket(socket.AF_INET6)
        with contextlib.suppress(OSError):
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s6.bind(("::1", self.port))
            s6.listen()
            self.socks.append(s6)
        s4.listen()
        self.socks.append(s4)
        for s in self.socks:
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        while True:
            try:
                c, addr = s.accept()
            except OSError:
                return
            self.accepted.append(addr[:2])
            with contextlib.suppress(OSError):
                c.sendall(b"canary")
                c.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


def attempt(sb: Any, host: str, port: int) -> str:
    return str(sb.exec("python3", ["-c", CONNECT, host, str(port)]).stdout)


def test_a_room_without_network_reaches_nothing(rooms: Any, canary: Canary) -> None:
    (sb,) = rooms(1)
    for host in ("127.0.0.1", "::1", "198.18.0.1", "10.0.0.1", "169.254.169.254"):
        assert attempt(sb, host, canary.port).startswith("error"), host
    assert canary.accepted == []


def test_a_room_with_network_cannot_reach_the_host_but_by_an_allowed_name(
        rooms: Any, canary: Canary) -> None:
    a, other = rooms(2)
    # a may reach the canary as allowed.test (and nothing else); other has a policy of its own
    a.get({"network": {"allow": [f"allowed.test:{canary.port}", "127.0.0.1"],
                       "hosts": {"allowed.test": "127.0.0.1", "pinned.test": "127.0.0.1"}}})
    other.get({"network": {"allow": ["elsewhere.test:1"], "hosts": {"allowed.test": "127.0.0.1"}}})
    # literal loopback addresses are the room's own loopback, never the host's
    assert attempt(a, "127.0.0.1", canary.port).startswith("error")
    assert attempt(a, "::1", canary.port).startswith("error")
    # a name pinned to the host's loopback but not allowed; an allowed name on another port
    assert attempt(a, "pinned.test", canary.port).startswith("error")
    assert attempt(a, "allowed.test", canary.port + 1 if canary.port < 65535 else 1
                   ).startswith("error")
    # an address of the fake range that stands for no name, and the ranges of the SSRF guard
    for host in ("198.18.255.254", "10.0.0.1", "169.254.169.254", "100.64.0.1", "::ffff:127.0.0.1",
                 "fd00::1"):
        assert attempt(a, host, canary.port).startswith("error"), host
    # the other room, whose policy does not list it, resolves the name but may not connect
    assert attempt(other, "allowed.test", canary.port).startswith("error")
    assert canary.accepted == []
    # and the allowed way in works (so the refusals above were the policy, not a broken room)
    assert attempt(a, "allowed.test", canary.port).startswith("data")
    assert len(canary.accepted) == 1


def test_the_forwarder_and_dns_sockets_are_no_way_out(rooms: Any, canary: Canary) -> None:
    (sb,) = rooms(1)
    sb.get({"network": {"allow": ["127.0.0.1"], "hosts": {}}})
    # the room's own listening sockets (the forwarder's, owned by the daemon): connecting to
    # them directly is refused, never forwarded to the host's port of the same number
    ports = sb.exec("ss -Htln | awk '{print $4}' | sed 's/.*://'").stdout.split()
    assert ports, "no forwarder listener in the room"
    for port in ports:
        assert attempt(sb, "127.0.0.1", int(port)).startswith("error"), port
    # a DNS query for a name the policy does not know gets no address
    r = sb.exec("python3", ["-c", "import socket\ntry: print(socket.gethostbyname('evil.test'))\n"
                                  "except OSError: print('nxdomain')"])
    assert r.stdout == "nxdomain\n", r.raw
    assert canary.accepted == []
