"""What the egress forwarder reads of a connection's first bytes, and the room's DNS wire format
(issue 14; docs/network.md). Pure functions over bytes the room controls: every length is
checked, nothing is trusted, and nothing here allocates more than its input.

* :func:`first_name` — the server name a connection asks for: a TLS ClientHello's SNI, or an
  HTTP/1 request's Host header; None when the bytes are neither (a database protocol, ssh), and
  ``NEED_MORE`` while they could still become one.
* :func:`dns_question` / :func:`dns_answer` — one query in, one answer out (A records, or none).
"""

from __future__ import annotations

import ipaddress
import struct

NEED_MORE = "\x00more"
MAX_SNIFF = 16 * 1024
_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ",
            b"CONNECT ", b"TRACE ")


def _tls_sni(data: bytes) -> str | None:
    """SNI of a ClientHello starting ``data`` (one record), NEED_MORE, or None."""
    if len(data) < 5:
        return NEED_MORE
    rec_len = struct.unpack_from("!H", data, 3)[0]
    if len(data) < 5 + rec_len:
        return NEED_MORE if 5 + rec_len <= MAX_SNIFF else None
    body = data[5:5 + rec_len]
    if len(body) < 4 or body[0] != 1:  # handshake type ClientHello
        return None
    p = 4 + 2 + 32  # header, client version, random
    if p >= len(body):
        return None
    p += 1 + body[p]  # session id
    if p + 2 > len(body):
        return None
    p += 2 + struct.unpack_from("!H", body, p)[0]  # cipher suites
    if p >= len(body):
        return None
    p += 1 + body[p]  # compression methods
    if p + 2 > len(body):
        return None
    end = min(len(body), p + 2 + struct.unpack_from("!H", body, p)[0])
    p += 2
    while p + 4 <= end:
        kind, size = struct.unpack_from("!HH", body, p)
        p += 4
        if kind == 0 and p + size <= end and size >= 5:  # server_name
            q = p + 2  # list length
            if body[q] == 0:  # host_name
                n = struct.unpack_from("!H", body, q + 1)[0]
                raw = body[q + 3:q + 3 + n]
                try:
                    return raw.decode("ascii").lower().rstrip(".")
                except UnicodeDecodeError:
                    return None
        p += size
    return None


def _http_host(data: bytes) -> str | None:
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return NEED_MORE if len(data) < MAX_SNIFF else None
    for line in data[:head_end].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace").lower()
            if host.startswith("["):
                return host[1:host.find("]")] if "]" in host else None
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return None


def first_name(data: bytes) -> str | None:
    """The name the connection asks for, NEED_MORE, or None (not TLS or HTTP, or no name)."""
    if not data:
        return NEED_MORE
    if data[0] == 0x16:  # TLS handshake record
        if len(data) >= 2 and data[1] != 3:
            return None
        return _tls_sni(data)
    probe = data[:8]
    if any(m.startswith(probe) or probe.startswith(m) for m in _METHODS):
        if len(data) < 8 and any(m.startswith(data) for m in _METHODS):
            return NEED_MORE
        return _http_host(data)
    return None


# --- DNS ---------------------------------------------------------------------------------------

QTYPE_A = 1
QTYPE_AAAA = 28
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_NXDOMAIN = 3
RCODE_REFUSED = 5


def dns_question(packet: bytes) -> tuple[int, str, int, int, bytes] | None:
    """(id, name, qtype, flags, the question section) of a standard query, or None."""
    if len(packet) < 12 or len(packet) > 512:
        return None
    qid, flags, qd, _an, _ns, _ar = struct.unpack_from("!HHHHHH", packet, 0)
    if flags & 0x8000 or (flags >> 11) & 0xF != 0 or qd != 1:
        return None
    p = 12
    labels = []
    while True:
        if p >= len(packet):
            return None
        n = packet[p]
        if n == 0:
            p += 1
            break
        if n > 63 or p + 1 + n > len(packet):
            return None  # (compression pointers never appear in a question)
        labels.append(packet[p + 1:p + 1 + n])
        p += 1 + n
        if len(labels) > 127:
            return None
    if p + 4 > len(packet):
        return None
    qtype, qclass = struct.unpack_from("!HH", packet, p)
    if qclass != 1:
        return None
    try:
        name = b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    return qid, name, qtype, flags, packet[12:p + 4]


def dns_answer(qid: int, flags: int, question: bytes, rcode: int,
               addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
               ttl: int = 30) -> bytes:
    """A response to the query: ``addresses`` as A/AAAA records of the question's name."""
    rd = flags & 0x0100
    out_flags = 0x8000 | 0x0400 | rd | 0x0080 | (rcode & 0xF)  # QR AA RD RA
    answers = b""
    for addr in addresses:
        rtype = QTYPE_A if addr.version == 4 else QTYPE_AAAA
        answers += struct.pack("!HHHIH", 0xC00C, rtype, 1, ttl, len(addr.packed)) + addr.packed
    return struct.pack("!HHHHHH", qid, out_flags, 1, len(addresses), 0, 0) + question + answers
