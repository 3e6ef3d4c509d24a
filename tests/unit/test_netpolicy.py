"""The egress policy and what the forwarder reads, without a network (issue 14): entries parse
or are refused by name, the SSRF classifier knows every guarded range (these addresses are only
ever classified here, never connected to), names match as names, SNI comes out of a real
ClientHello, Host out of a request, DNS questions and answers round-trip."""

from __future__ import annotations

import ipaddress
import ssl
import struct

import pytest

from sandboxd import errors, netpolicy, sniff
from sandboxd.protocol import NetworkOptions

ip = ipaddress.ip_address


@pytest.mark.parametrize(("text", "name", "net", "port"), [
    ("example.org", "example.org", None, None),
    ("API.Example.org:443", "api.example.org", None, 443),
    ("*.example.org", "*.example.org", None, None),
    ("203.0.113.7", None, "203.0.113.7/32", None),
    ("203.0.113.7:8080", None, "203.0.113.7/32", 8080),
    ("10.0.0.0/8:5432", None, "10.0.0.0/8", 5432),
    ("2001:db8::1", None, "2001:db8::1/128", None),
    ("[2001:db8::1]:443", None, "2001:db8::1/128", 443),
    ("[fd00::/8]:80", None, "fd00::/8", 80),
])
def test_entries_parse(text: str, name: str | None, net: str | None, port: int | None) -> None:
    e = netpolicy.parse_entry(text)
    assert (e.name, str(e.net) if e.net else None, e.port) == (name, net, port)


@pytest.mark.parametrize("text", ["", " x.org", "x.org:0", "x.org:70000", "x.org:http", "-a.org",
                                  "a..org", "*.", "**.a.org", "a.*.org", "[::1", "[::1]x",
                                  "1.2.3.4.5", "x.org:1:2", "a_b.org", "1.2.3.4/33"])
def test_bad_entries_are_refused_by_name(text: str) -> None:
    with pytest.raises(errors.ValidationError) as exc:
        netpolicy.parse_entry(text)
    assert exc.value.context["entry"] == text


@pytest.mark.parametrize(("addr", "why"), [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("fd12::1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("100.64.0.1", "reserved"), ("198.18.0.1", "private"), ("240.0.0.1", "private"),
    ("93.184.216.34", None), ("2606:4700::1111", None), ("8.8.8.8", None),
])
def test_the_ssrf_classifier(addr: str, why: str | None) -> None:
    assert netpolicy.classify(ip(addr)) == why


def policy(*allow: str, **hosts: str) -> netpolicy.Policy:
    return netpolicy.parse(NetworkOptions(allow=list(allow), hosts=hosts))


def test_names_are_matched_as_names() -> None:
    p = policy("*.example.org:443", "exact.test")
    assert p.decide("a.example.org", ip("93.184.216.34"), 443) is None
    assert p.decide("a.b.example.org", ip("93.184.216.34"), 443) is None
    assert p.decide("example.org", ip("93.184.216.34"), 443) is not None  # not below it
    assert p.decide("badexample.org", ip("93.184.216.34"), 443) is not None
    assert p.decide("a.example.org", ip("93.184.216.34"), 80) is not None  # another port
    assert p.decide("EXACT.test.", ip("93.184.216.34"), 22) is None
    # a literal address is decided on IP entries only, whatever name it might have
    assert p.decide(None, ip("93.184.216.34"), 443) is not None


def test_a_name_may_not_lead_to_a_guarded_address_unless_it_is_listed() -> None:
    p = policy("svc.test:80")
    for addr in ("127.0.0.1", "10.0.0.5", "169.254.169.254", "::1", "fd00::5"):
        assert "only an entry naming it" in (p.decide("svc.test", ip(addr), 80) or ""), addr
    p = policy("svc.test:80", "10.0.0.0/8", "169.254.169.254:80")
    assert p.decide("svc.test", ip("10.0.0.5"), 80) is None
    assert p.decide("svc.test", ip("169.254.169.254"), 80) is None
    assert p.decide("svc.test", ip("127.0.0.1"), 80) is not None


def test_hosts_and_limits() -> None:
    p = policy("a.test", **{"a.test": "127.0.0.1", "Pinned.test": "::1"})
    assert p.hosts == {"a.test": ip("127.0.0.1"), "pinned.test": ip("::1")}
    assert p.name_allowed("pinned.test") and not p.name_allowed("pinned.test", 80)
    with pytest.raises(errors.ValidationError, match="not an IP"):
        policy(**{"a.test": "not-an-ip"})
    with pytest.raises(errors.ValidationError, match="more than"):
        netpolicy.parse(NetworkOptions(allow=[f"h{i}.test" for i in range(257)]))


def client_hello(server_name: str) -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_sni_comes_out_of_a_real_client_hello() -> None:
    hello = client_hello("Allowed.Test")
    assert sniff.first_name(hello) == "allowed.test"
    assert sniff.first_name(hello[:40]) == sniff.NEED_MORE
    assert sniff.first_name(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is None  # not a hello
    assert sniff.first_name(b"SSH-2.0-OpenSSH_9.2\r\n") is None


def test_host_comes_out_of_an_http_request() -> None:
    assert sniff.first_name(b"GET / HTTP/1.1\r\nHost: a.test:8080\r\n\r\n") == "a.test"
    assert sniff.first_name(b"POST /x HTTP/1.1\r\nhost: [::1]:80\r\n\r\n") == "::1"
    assert sniff.first_name(b"GET / HTTP/1.1\r\nHost: a.test") == sniff.NEED_MORE
    assert sniff.first_name(b"GE") == sniff.NEED_MORE
    assert sniff.first_name(b"GET / HTTP/1.0\r\n\r\n") is None
    assert sniff.first_name(b"\x00\x01binary") is None


def test_dns_question_and_answer_round_trip() -> None:
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x03api\x04test\x00" + \
        struct.pack("!HH", 1, 1)
    qid, name, qtype, flags, question = sniff.dns_question(q) or (0, "", 0, 0, b"")
    assert (qid, name, qtype) == (0x1234, "api.test", sniff.QTYPE_A)
    ans = sniff.dns_answer(qid, flags, question, sniff.RCODE_NOERROR, [ip("198.18.0.7")])
    assert struct.unpack_from("!HHHH", ans) == (0x1234, 0x8580, 1, 1)
    assert ans.endswith(bytes([198, 18, 0, 7]))
    nx = sniff.dns_answer(qid, flags, question, sniff.RCODE_NXDOMAIN, [])
    assert struct.unpack_from("!HH", nx)[1] & 0xF == 3
    for bad in (b"", q[:11], q[:-2], struct.pack("!HHHHHH", 1, 0x8000, 1, 0, 0, 0),
                q[:12] + b"\xc0\x0c" + q[-4:], b"\x00" * 600):
        assert sniff.dns_question(bad) is None


def test_a_host_without_egress_fails_closed() -> None:
    from sandboxd import config, egress
    cfg = config.DaemonConfig(socket="/x", state_dir="/x", rootfs="host", egress=False)
    net = egress.Network(cfg)
    assert net.describe()["available"] is False and "egress = false" in net.describe()["reason"]
    assert net.check(None) is None  # no network asked: nothing to refuse
    with pytest.raises(errors.LimitUnavailable) as exc:
        net.check(NetworkOptions(allow=["a.test"]))
    assert exc.value.context["limit"] == "network"
    # a policy that does not parse is refused as such, before availability
    with pytest.raises(errors.ValidationError):
        net.check(NetworkOptions(allow=["a.test:0"]))
