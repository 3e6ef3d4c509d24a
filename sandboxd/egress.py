"""Controlled egress for a room (issue 14; docs/network.md has the design and threat model).

Theory of operation. A room's network namespace has loopback only. A room with a ``network``
policy gets, inside that namespace:

* two sockets made by the room's init on its loopback and handed to the daemon (``Listen``): a
  TCP listener per address family (the **forwarder**) and a UDP socket per family (the room's
  **DNS server**);
* a default route over ``lo`` and a netfilter table (``nft``, run by ``jail/netns_exec.py`` as
  root of the room's user namespace — the daemon owns it — in the room's network namespace only)
  that redirects every TCP connection not to the room's own loopback to the forwarder, every DNS
  query (UDP port 53, to any address) to the DNS server, and rejects everything else leaving the
  loopback at once (TCP reset, ICMP admin-prohibited), so a refused program fails fast.

The DNS server answers only names the policy allows (or pins in ``hosts``), each with an address
of its own from 198.18.0.0/15 that stands for that name in this room: so when the program
connects, the forwarder knows which **name** it asked for, whatever address the name has. It
then reads the connection's first bytes (briefly: a protocol where the server speaks first
sends none) for a TLS ClientHello's SNI or an HTTP Host header, which must be allowed too (a
shared address cannot open what else it serves), resolves the name on the host (``hosts``
first), applies the SSRF guard (``netpolicy.classify``), connects from the daemon and copies
both ways, under the room's bandwidth (a token bucket per direction in the forwarder). A
connection to a literal address is decided on IP/CIDR entries alone. A refused connection is
reset at once and logged; counters and the log are the room's (``stats``, ``getNetworkLog``).

TLS is never intercepted: the forwarder reads the ClientHello, it does not terminate it.
Everything is torn down with the room (the sockets are the daemon's; the namespace and its
rules die with the room), or by ``setNetworkPolicy {network: null}``, which also closes the
room's open connections.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import errors, netpolicy, protocol, sniff
from .jail import messages as jm
from .roomfiles import init_op

if TYPE_CHECKING:
    from .config import DaemonConfig
    from .protocol import NetworkOptions
    from .rooms import Room

log = logging.getLogger("sandboxd.egress")

FAKE_NET = ipaddress.IPv4Network("198.18.0.0/15")
MAX_NAMES = 4096  # fake addresses per room
SNIFF_S = 0.3  # how long the forwarder waits for a client's first bytes
CONNECT_TIMEOUT_S = 10.0
CHUNK = 64 * 1024
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number
MECHANISM = "nftables redirect to the daemon's forwarder and DNS"


def available() -> tuple[bool, str]:
    """Whether this host can give rooms egress (the ``nft`` and ``ip`` binaries)."""
    missing = [b for b in ("nft", "ip") if shutil.which(b, path=_PATH) is None]
    if missing:
        return False, f"missing {', '.join(missing)} (Debian: nftables, iproute2)"
    return True, ""


_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def ruleset(tcp4: int, tcp6: int, dns4: int, dns6: int) -> str:
    return f"""table ip sandboxd {{
    chain nat_out {{
        type nat hook output priority -100; policy accept;
        udp dport 53 redirect to :{dns4}
        ip daddr 127.0.0.0/8 return
        meta l4proto tcp redirect to :{tcp4}
    }}
    chain filter_out {{
        type filter hook output priority 0; policy accept;
        ct state established,related accept
        ip daddr 127.0.0.0/8 accept
        meta l4proto tcp reject with tcp reset
        reject with icmp type admin-prohibited
    }}
}}
table ip6 sandboxd {{
    chain nat_out {{
        type nat hook output priority -100; policy accept;
        udp dport 53 redirect to :{dns6}
        ip6 daddr ::1 return
        meta l4proto tcp redirect to :{tcp6}
    }}
    chain filter_out {{
        type filter hook output priority 0; policy accept;
        ct state established,related accept
        ip6 daddr ::1 accept
        meta l4proto tcp reject with tcp reset
        reject with icmpv6 type admin-prohibited
    }}
}}
"""


def original_dst(sock: Any) -> tuple[netpolicy.Address, int]:
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        return ipaddress.IPv6Address(raw[8:24]), struct.unpack("!H", raw[2:4])[0]
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return ipaddress.IPv4Address(raw[4:8]), struct.unpack("!H", raw[2:4])[0]


class Bucket:
    """A token bucket: ``rate`` bytes per second, bursts of a tenth of a second."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.burst = max(16 * 1024, rate // 10)
        self.tokens = float(self.burst)
        self.last = time.monotonic()

    async def take(self, n: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


@dataclass
class LogEntry:
    time: float
    proto: str
    address: str
    port: int
    allowed: bool
    name: str | None = None
    reason: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    def wire(self) -> protocol.NetworkLogEntry:
        from .rooms import iso
        return protocol.NetworkLogEntry(
            time=iso(self.time), protocol=self.proto, address=self.address, port=self.port,
            allowed=self.allowed, name=self.name, reason=self.reason, bytes_in=self.bytes_in,
            bytes_out=self.bytes_out)


class Egress:
    def __init__(self, room: Room, policy: netpolicy.Policy, cfg: DaemonConfig) -> None:
        self.room = room
        self.policy: netpolicy.Policy | None = policy
        self.cfg = cfg
        self.fake: dict[str, ipaddress.IPv4Address] = {}
        self.names: dict[ipaddress.IPv4Address, str] = {}
        self.next_fake = 1
        self.servers: list[asyncio.AbstractServer] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.conns: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.own: set[tuple[netpolicy.Address, int]] = set()
        self.log: collections.deque[LogEntry] = collections.deque(maxlen=cfg.network_log_entries)
        self.bytes_in = self.bytes_out = self.connections = self.refused = 0
        self.buckets = self._buckets(policy)
        self.closed = False

    @staticmethod
    def _buckets(policy: netpolicy.Policy | None) -> tuple[Bucket, Bucket] | None:
        if policy is None or policy.bandwidth is None:
            return None
        return Bucket(policy.bandwidth), Bucket(policy.bandwidth)

    # -- set-up

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        ports: dict[tuple[str, int], int] = {}
        for kind in ("tcp", "udp"):
            for family in (4, 6):
                try:
                    reply, fds = await init_op(self.room, jm.Listen(kind=kind, family=family),
                                               "egress")
                except errors.SandboxError:
                    if family == 6:
                        continue  # a host without IPv6: the v4 half alone
                    raise
                fam = socket.AF_INET if family == 4 else socket.AF_INET6
                sock = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp"
                                     else socket.SOCK_DGRAM, fileno=fds[0])
                sock.setblocking(False)
                ports[(kind, family)] = reply.port
                self.own.add((ipaddress.ip_address(reply.address), reply.port))
                if kind == "tcp":
                    self.servers.append(await asyncio.start_server(
                        self._accept, sock=sock, limit=CHUNK))
                else:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _Dns(self), sock=sock)
                    self.transports.append(transport)
        await self._configure(ports)

    async def _configure(self, ports: dict[tuple[str, int], int]) -> None:
        rules = ruleset(ports[("tcp", 4)], ports.get(("tcp", 6), ports[("tcp", 4)]),
                        ports[("udp", 4)], ports.get(("udp", 6), ports[("udp", 4)]))
        _, fds = await init_op(self.room, jm.Namespaces(), "egress")
        try:
            # (src: without it a connection's source is 0.0.0.0, the forwarder's answers
            # are not to loopback)
            script = ("ip route replace default dev lo src 127.0.0.1 && "
                      "{ ip -6 route replace default dev lo src ::1 2>/dev/null || "
                      "ip -6 route replace default dev lo 2>/dev/null || true; } && nft -f -")
            argv = [sys.executable, "-m", "sandboxd.jail.netns_exec", str(fds[0]), str(fds[1]),
                    "/bin/sh", "-c", script]
            env = {"PATH": _PATH, "PYTHONPATH": os.pathsep.join(sys.path)}
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=fds, env=env)
            try:
                _, err = await asyncio.wait_for(proc.communicate(rules.encode()), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                err = b"ip/nft did not finish within 30 s"
        finally:
            for fd in fds:
                os.close(fd)
        if proc.returncode != 0:
            raise errors.LimitUnavailable(
                f"egress for sandbox {self.room.id}: configuring its network failed: "
                f"{err.decode(errors='replace').strip()[-500:]}", limit="network")

    # -- policy

    def set_policy(self, policy: netpolicy.Policy | None) -> None:
        self.policy = policy
        self.buckets = self._buckets(policy)
        if policy is None:
            for w in list(self.writers):
                _reset(w)

    def fake_for(self, name: str) -> ipaddress.IPv4Address | None:
        addr = self.fake.get(name)
        if addr is not None:
            return addr
        if len(self.fake) >= MAX_NAMES:
            old, gone = next(iter(self.fake.items()))
            del self.fake[old]
            del self.names[gone]
        addr = FAKE_NET[self.next_fake]
        self.next_fake = self.next_fake % (FAKE_NET.num_addresses - 2) + 1
        self.fake[name] = addr
        self.names[addr] = name
        return addr

    def record(self, entry: LogEntry) -> None:
        self.log.append(entry)
        if not entry.allowed:
            self.refused += 1

    # -- the forwarder

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.conns.add(task)
        self.writers.add(writer)
        try:
            await self._forward(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.conns.discard(task)
            self.writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        dst, port = original_dst(sock)
        entry = LogEntry(time.time(), "tcp", str(dst), port, False)
        policy = self.policy
        name = self.names.get(dst) if isinstance(dst, ipaddress.IPv4Address) \
            and dst in FAKE_NET else None
        if name is not None:
            entry.name = name
        reason = None
        if policy is None:
            reason = "the sandbox has no network"
        elif (dst, port) in self.own:
            reason = "the forwarder itself"
        elif len(self.conns) > self.cfg.max_egress_connections_per_room:
            reason = f"more than {self.cfg.max_egress_connections_per_room} open connections"
        elif isinstance(dst, ipaddress.IPv4Address) and dst in FAKE_NET and name is None:
            reason = f"{dst} stands for no name (resolve the name again)"
        if reason is not None or policy is None:
            return self._refuse(writer, entry, reason or "refused")
        first = b""
        if name is not None:
            first, asked = await _sniff(reader)
            if asked is not None and asked != name and not policy.name_allowed(asked, port):
                what = "SNI" if first[:1] == b"\x16" else "Host"
                return self._refuse(writer, entry,
                                    f"{what} {asked} is not allowed on port {port}")
            addrs = await self._resolve(policy, name, port)
            if not addrs:
                return self._refuse(writer, entry, f"{name} does not resolve")
            chosen = None
            for addr in addrs:
                reason = policy.decide(name, addr, port)
                if reason is None:
                    chosen = addr
                    break
            if chosen is None:
                return self._refuse(writer, entry, reason or "refused")
            target: netpolicy.Address = chosen
        else:
            reason = policy.decide(None, dst, port)
            if reason is not None:
                return self._refuse(writer, entry, reason)
            target = dst
        entry.address = str(target)
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(str(target), port, limit=CHUNK), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as err:
            return self._refuse(writer, entry, f"connect to {target}:{port} failed: "
                                f"{getattr(err, 'strerror', None) or err or 'timed out'}")
        entry.allowed = True
        self.connections += 1
        self.log.append(entry)
        self.writers.add(up_w)
        try:
            if first:
                await self._take(1, len(first))
                up_w.write(first)
                entry.bytes_out += len(first)
                self.bytes_out += len(first)
            await asyncio.gather(self._pump(reader, up_w, entry, out=True),
                                 self._pump(up_r, writer, entry, out=False))
        finally:
            self.writers.discard(up_w)
            with contextlib.suppress(Exception):
                up_w.close()

    async def _resolve(self, policy: netpolicy.Policy, name: str,
                       port: int) -> list[netpolicy.Address]:
        pinned = policy.hosts.get(name)
        if pinned is not None:
            return [pinned]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, port, type=socket.SOCK_STREAM)
        except OSError:
            return []
        out: list[netpolicy.Address] = []
        for info in infos:
            with contextlib.suppress(ValueError):
                addr = ipaddress.ip_address(info[4][0])
                if addr not in out:
                    out.append(addr)
        return out

    async def _take(self, direction: int, n: int) -> None:
        if self.buckets is not None:
            await self.buckets[direction].take(n)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, entry: LogEntry,
                    *, out: bool) -> None:
        try:
            while True:
                limit = CHUNK if self.buckets is None else min(CHUNK, self.buckets[0].burst)
                data = await src.read(limit)
                if not data:
                    break
                await self._take(1 if out else 0, len(data))
                dst.write(data)
                await dst.drain()
                if out:
                    entry.bytes_out += len(data)
                    self.bytes_out += len(data)
                else:
                    entry.bytes_in += len(data)
                    self.bytes_in += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if dst.can_write_eof():
                    dst.write_eof()

    def _refuse(self, writer: asyncio.StreamWriter, entry: LogEntry, reason: str) -> None:
        entry.reason = reason
        self.record(entry)
        _reset(writer)

    # -- the end

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.policy = None
        for server in self.servers:
            server.close()
        for transport in self.transports:
            transport.close()
        for w in list(self.writers):
            _reset(w)
        for task in list(self.conns):
            task.cancel()

    def stats(self) -> protocol.NetworkStats:
        return protocol.NetworkStats(bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                                     connections=self.connections, refused=self.refused)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0): the program sees ECONNRESET at once."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _sniff(reader: asyncio.StreamReader) -> tuple[bytes, str | None]:
    """The client's first bytes (up to sniff.MAX_SNIFF, for at most SNIFF_S) and the name they
    ask for, if any."""
    data = b""
    deadline = time.monotonic() + SNIFF_S
    while len(data) < sniff.MAX_SNIFF:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            chunk = await asyncio.wait_for(reader.read(sniff.MAX_SNIFF - len(data)), left)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        asked = sniff.first_name(data)
        if asked != sniff.NEED_MORE:
            return data, asked
    asked = sniff.first_name(data) if data else None
    return data, None if asked == sniff.NEED_MORE else asked


class _Dns(asyncio.DatagramProtocol):
    def __init__(self, egress: Egress) -> None:
        self.egress = egress
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: Any) -> None:
        q = sniff.dns_question(data)
        if q is None or self.transport is None:
            return
        qid, name, qtype, flags, question = q
        eg = self.egress
        policy = eg.policy
        if policy is None or not policy.name_allowed(name):
            eg.record(LogEntry(time.time(), "dns", "", 53, False, name=name,
                               reason="the sandbox has no network" if policy is None
                               else f"{name} is not allowed"))
            self.transport.sendto(sniff.dns_answer(qid, flags, question, sniff.RCODE_NXDOMAIN,
                                                   []), addr)
            return
        answers: list[netpolicy.Address] = []
        if qtype == sniff.QTYPE_A:
            fake = eg.fake_for(name)
            if fake is not None:
                answers = [fake]
        self.transport.sendto(sniff.dns_answer(qid, flags, question, sniff.RCODE_NOERROR,
                                               answers), addr)


# --- the rooms' hook (rooms.Network) -------------------------------------------------------------


class Network:
    """Installed in the RoomManager by the daemon: checks ``network`` options and gives a room
    its egress once it is ready."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        ok, why = available()
        self.available = ok and cfg.egress
        self.why = why if not ok else ("disabled by the daemon's configuration (egress = false)"
                                       if not cfg.egress else "")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"available": self.available, "mechanism": MECHANISM,
                               "bandwidth": "forwarder token bucket"}
        if not self.available:
            out["reason"] = self.why
        return out

    def check(self, options: NetworkOptions | None) -> netpolicy.Policy | None:
        if options is None:
            return None
        policy = netpolicy.parse(options)
        if not self.available:
            raise errors.LimitUnavailable(f"this host cannot give sandboxes a network: {self.why}",
                                          limit="network")
        return policy

    async def attach(self, room: Room, options: NetworkOptions | None) -> None:
        policy = self.check(options)
        if policy is None:
            return
        eg = Egress(room, policy, self.cfg)
        room.egress = eg
        try:
            await eg.start()
        except BaseException:
            eg.close()
            room.egress = None
            raise

    async def set_policy(self, room: Room, options: NetworkOptions | None) -> None:
        policy = self.check(options)
        if room.egress is None:
            if policy is None:
                return
            await self.attach(room, options)
            return
        room.egress.set_policy(policy)

    def detach(self, room: Room) -> None:
        if room.egress is not None:
            room.egress.close()
