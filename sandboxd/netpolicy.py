"""A room's egress policy (issue 14; docs/network.md): parsing and deciding, no I/O.

    network: {allow: [ENTRY...], hosts?: {NAME: IP}, bandwidthBytesPerSec?: N}
    ENTRY:   NAME[:PORT]    an exact name, or *.domain for any name below domain
             IP[:PORT]      IPv4, or [IPv6]:PORT (a bare IPv6 address has no port)
             CIDR[:PORT]    10.0.0.0/8, [fd00::/8]:443

A connection is decided on what the program asked for: the **name** it resolved (the room's DNS
answers only allowed names, each with an address that stands for that name, so the forwarder
knows it), the name its TLS ClientHello (SNI) or HTTP request (Host) carries, the **port**, and
the **address** the name resolves to on the host. Addresses in the ranges a room must never reach
by accident — loopback, RFC 1918 and ULA, link-local (169.254.169.254 among them), multicast,
unspecified, and the rest ``ipaddress`` calls non-global — are refused even through an allowed
name, unless an IP or CIDR entry names them (the SSRF guard).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from . import errors

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_ENTRIES = 256
MAX_HOSTS = 256
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


@dataclass(frozen=True)
class Entry:
    text: str
    port: int | None = None
    name: str | None = None  # lower case; "*.example.org" kept with its "*."
    net: Network | None = None

    def admits_port(self, port: int) -> bool:
        return self.port is None or self.port == port

    def admits_name(self, name: str) -> bool:
        if self.name is None:
            return False
        name = name.lower().rstrip(".")
        if self.name.startswith("*."):
            return name.endswith(self.name[1:]) and len(name) > len(self.name) - 1
        return name == self.name


def _port(text: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise errors.ValidationError(f"network.allow: {text!r}: port {raw!r} is not 1-65535",
                                     entry=text)
    return int(raw)


def parse_entry(text: str) -> Entry:
    bad = errors.ValidationError(f"network.allow: {text!r} is not NAME[:PORT], IP[:PORT] or "
                                 "CIDR[:PORT]", entry=text)
    if not isinstance(text, str) or not text or len(text) > 300 or text != text.strip():
        raise bad
    port: int | None = None
    host = text
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise bad
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise bad
            port = _port(text, rest[1:])
        try:
            return Entry(text, port, net=ipaddress.ip_network(host, strict=False))
        except ValueError:
            raise bad from None
    if text.count(":") == 1:
        host, raw = text.split(":")
        port = _port(text, raw)
    try:
        return Entry(text, port, net=ipaddress.ip_network(host, strict=False))
    except ValueError:
        pass
    if ":" in host or not _NAME.match(host) or host.replace(".", "").isdigit():
        raise bad
    return Entry(text, port, name=host.lower())


def classify(addr: Address) -> str | None:
    """Why ``addr`` is guarded (a name may not lead there), or None for a global address."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return classify(addr.ipv4_mapped)
    if addr.is_loopback:
        return "loopback"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if addr.is_private:
        return "private"
    if addr.is_reserved or not addr.is_global:
        return "reserved"
    return None


@dataclass
class Policy:
    entries: list[Entry] = field(default_factory=list)
    hosts: dict[str, Address] = field(default_factory=dict)
    bandwidth: int | None = None

    @property
    def names(self) -> list[Entry]:
        return [e for e in self.entries if e.name is not None]

    def name_allowed(self, name: str, port: int | None = None) -> bool:
        """Whether an entry admits ``name`` (on ``port``; any port when None: DNS)."""
        return any(e.admits_name(name) and (port is None or e.admits_port(port))
                   for e in self.entries) or (port is None and name.lower() in self.hosts)

    def literal(self, addr: Address, port: int) -> Entry | None:
        """An IP/CIDR entry naming ``addr`` (and ``port``)."""
        for e in self.entries:
            if e.net is not None and addr.version == e.net.version and addr in e.net \
                    and e.admits_port(port):
                return e
        return None

    def decide(self, name: str | None, addr: Address, port: int) -> str | None:
        """None when a connection to ``addr``:``port`` (asked for as ``name``, if by name) is
        allowed; else the reason it is refused."""
        if name is not None:
            if not any(e.admits_name(name) and e.admits_port(port) for e in self.entries):
                return f"{name}:{port} is not allowed"
            guarded = classify(addr)
            if guarded is not None and self.literal(addr, port) is None:
                return f"{name} resolves to {addr} ({guarded}); only an entry naming it allows that"
            return None
        if self.literal(addr, port) is None:
            return f"{addr}:{port} is not allowed"
        return None


def parse(network: object) -> Policy:
    """The wire ``network`` option (config.NetworkOptions) as a Policy; VALIDATION_FAILED
    naming the entry that does not parse."""
    allow = list(getattr(network, "allow", None) or [])
    hosts = dict(getattr(network, "hosts", None) or {})
    if len(allow) > MAX_ENTRIES:
        raise errors.ValidationError(f"network.allow: more than {MAX_ENTRIES} entries",
                                     limit=MAX_ENTRIES)
    if len(hosts) > MAX_HOSTS:
        raise errors.ValidationError(f"network.hosts: more than {MAX_HOSTS} names",
                                     limit=MAX_HOSTS)
    entries = [parse_entry(e) for e in allow]
    pinned: dict[str, Address] = {}
    for name, ip in hosts.items():
        if not isinstance(name, str) or not _NAME.match(name) or name.startswith("*."):
            raise errors.ValidationError(f"network.hosts: {name!r} is not a host name",
                                         entry=name)
        try:
            pinned[name.lower()] = ipaddress.ip_address(ip)
        except ValueError:
            raise errors.ValidationError(f"network.hosts: {name}: {ip!r} is not an IP address",
                                         entry=name) from None
    return Policy(entries, pinned, getattr(network, "bandwidth_bytes_per_sec", None))
