"""Where webhooks may go, and the one POST that takes them there.

A webhook URL is chosen by a client but fetched by the server, from inside its network: unguarded, it is a way to
reach the loopback interface, the LAN and the cloud's metadata service (SSRF). So a URL is resolved once, every
address it resolves to must be public (or allowed by the operator's --webhook-allow-hosts), and the connection goes
to one of exactly those addresses: resolving the name again at connect time would let a DNS server with a short TTL
answer differently the second time (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import h11

Resolver = Callable[[str, int], Awaitable[list[str]]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_BYTES = 2048
MAX_HEAD_BYTES = 16 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
# Headers that describe our own framing: the caller's copies would contradict it.
OWN_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding", "user-agent"})
# Special-purpose blocks that some Python versions' is_global still calls global: 192.0.0.192 is Oracle Cloud's
# metadata service, fec0::/10 the old site-local range, 64:ff9b:1::/48 local-use NAT64, and 2001::/23 (Teredo's
# 2001::/32 among it) no receiver's address.
NOT_PUBLIC = tuple(
    ipaddress.ip_network(n) for n in ("192.0.0.0/24", "192.88.99.0/24", "fec0::/10", "64:ff9b:1::/48", "2001::/23")
)
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# IPv4-compatible (::a.b.c.d, deprecated) and SIIT-translated (::ffff:0:a.b.c.d) addresses: on some hosts the
# kernel still delivers them to the IPv4 address inside.
EMBEDDING = (ipaddress.IPv6Network("::/96"), ipaddress.IPv6Network("::ffff:0:0:0/96"), NAT64)
HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
NETLOC = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::(?P<port>[0-9]*))?")
PRINTABLE = "".join(map(chr, range(0x21, 0x7F)))


class Refused(Exception):
    """A destination the guard will not send to; str(exc) is one clear sentence for a 422 (no field name prefix)."""


@dataclass(frozen=True)
class Allowlist:
    """--webhook-allow-hosts: comma-separated host names (exact, case-insensitive), IP addresses or CIDR networks
    (e.g. "127.0.0.1,receiver.internal,10.0.0.0/8") that may be sent to although they resolve to non-public addresses.
    """

    names: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Allowlist:
        names: set[str] = set()
        networks: list[Network] = []
        for entry in (e.strip() for e in spec.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.removeprefix("[").removesuffix("]")))
                continue
            except ValueError as exc:
                if "/" in entry:
                    raise ValueError(f"{entry!r} is not a valid CIDR network ({exc})") from None
            if not HOST_NAME.fullmatch(entry.lower()):
                raise ValueError(f"{entry!r} is neither a host name, an IP address nor a CIDR network")
            names.add(entry.lower())
        return cls(frozenset(names), tuple(networks))

    def allows(self, host: str, address: str) -> bool:
        if host.lower() in self.names:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        candidates = [ip, *_embedded(ip)]
        return any(c in n for c in candidates for n in self.networks)


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str  # "http" | "https"
    host: str  # as in the URL, lower-cased, IPv6 without brackets
    port: int  # explicit or 80/443
    target: str  # path + query for the request line ("/" if empty)


def parse_url(url: str) -> Target:
    # urlsplit quietly drops some whitespace and control characters: what it parsed would not be what was given.
    if " " in url or not url.isprintable():
        raise Refused("The URL contains whitespace or control characters.")
    if len(url.encode()) > MAX_URL_BYTES:
        raise Refused(f"The URL is longer than {MAX_URL_BYTES} bytes.")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise Refused("The URL is not a valid URL.") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise Refused("The URL must start with http:// or https://.")
    if "@" in parts.netloc:
        raise Refused("The URL may not contain a user name or password.")
    netloc = NETLOC.fullmatch(parts.netloc)
    if netloc is None:
        raise Refused("The URL's host and port are not valid.")
    if netloc["v6"] is not None:
        host = netloc["v6"].lower()
        # A zone (fe80::1%eth0) names one of this server's interfaces: never a receiver's address.
        if "%" in host or not _literal(host):
            raise Refused("The URL's IPv6 address is not valid.")
    else:
        host = netloc["name"].lower()
        if not host:
            raise Refused("The URL has no host.")
        if not host.isascii():
            raise Refused("The URL's host must be ASCII (write an international name in its xn-- form).")
        if not HOST_NAME.fullmatch(host):
            raise Refused("The URL's host is not a valid host name.")
    port = int(netloc["port"]) if netloc["port"] else DEFAULT_PORTS[scheme]
    if not 0 < port < 65536:
        raise Refused("The URL's port is not between 1 and 65535.")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, scheme, host, port, quote(target, safe=PRINTABLE))


async def system_resolver(host: str, port: int) -> list[str]:
    if _literal(host):
        return [host]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    inner = _embedded(ip)
    if inner:
        return all(public(str(i)) for i in inner)
    return ip.is_global and not ip.is_multicast and not any(ip in n for n in NOT_PUBLIC)


async def check(url: str, allow: Allowlist, resolver: Resolver = system_resolver) -> tuple[Target, list[str]]:
    """Parse, resolve, and return the addresses that may be connected to. Refused if the name does not resolve,
    or if ANY resolved address is not public and neither the host name nor that address is allowed (a name that
    resolves to one public and one private address is refused: an attacker controls which one a client picks)."""
    target = parse_url(url)
    if _literal(target.host):
        addresses = [target.host]
    else:
        try:
            addresses = list(dict.fromkeys(await resolver(target.host, target.port)))
        except (OSError, UnicodeError):
            addresses = []
        if not addresses:
            raise Refused(f"The host name {target.host} does not resolve.")
    for address in addresses:
        if not public(address) and not allow.allows(target.host, address):
            if address == target.host:
                raise Refused(f"{address} is not a public address.")
            raise Refused(f"{target.host} resolves to {address}, which is not a public address.")
    return target, addresses


@dataclass(frozen=True)
class Sent:
    status: int | None  # the HTTP status, None when no response came
    error: str = ""  # why not, in a few words ("timed out after 10 s", "connection refused", "refused: ...")

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


async def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    allow: Allowlist,
    timeout: float = 10.0,
    resolver: Resolver = system_resolver,
) -> Sent:
    """One POST: check() the URL, connect to a checked address (the next one if a connect fails), TLS with SNI and
    certificate verification for https, send the body, read the response's status line and headers only, close.
    Redirects are never followed (a 3xx is just returned). The whole exchange is bounded by `timeout`. A response's
    body is never read; response heads over 16 KiB are an error. Never raises for network problems or refusals:
    they come back as Sent(None, error)."""
    try:
        async with asyncio.timeout(timeout):
            target, addresses = await check(url, allow, resolver)
            return await _send(target, addresses, body, headers)
    except Refused as exc:
        return Sent(None, f"refused: {exc}")
    except TimeoutError:
        return Sent(None, f"timed out after {timeout:g} s")


async def _send(target: Target, addresses: list[str], body: bytes, headers: Mapping[str, str]) -> Sent:
    context = ssl.create_default_context() if target.scheme == "https" else None
    failure: OSError = ConnectionError("no address to connect to")
    for address in addresses:
        try:
            reader, writer = await asyncio.open_connection(
                address, target.port, ssl=context, server_hostname=target.host if context else None
            )
        except OSError as exc:
            failure = exc
            continue
        try:
            return await _exchange(reader, writer, target, body, headers)
        except OSError as exc:
            # Not retried on the next address: the request may already have arrived.
            return Sent(None, _describe(exc))
        finally:
            # abort, not close: a graceful (TLS) close would wait on a peer that may never answer.
            writer.transport.abort()
    return Sent(None, _describe(failure))


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Target, body: bytes, headers: Mapping[str, str]
) -> Sent:
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    host = f"[{target.host}]" if ":" in target.host else target.host
    if target.port != DEFAULT_PORTS[target.scheme]:
        host = f"{host}:{target.port}"
    fields = [("Host", host), ("User-Agent", "Muse-Webhooks")]
    fields += [(k, v) for k, v in headers.items() if k.lower() not in OWN_HEADERS]
    fields += [("Content-Length", str(len(body))), ("Connection", "close")]
    try:
        writer.write(connection.send(h11.Request(method="POST", target=target.target, headers=fields)) or b"")
    except (h11.LocalProtocolError, ValueError) as exc:
        return Sent(None, f"bad request header: {exc}")
    writer.write(connection.send(h11.Data(data=body)) or b"")
    writer.write(connection.send(h11.EndOfMessage()) or b"")
    await writer.drain()
    received = 0
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            too_long = received > MAX_HEAD_BYTES
            return Sent(None, "response head over 16 KiB" if too_long else f"bad response: {exc}")
        if event is h11.NEED_DATA:
            # Small reads: whatever follows the head is the body, which is never wanted.
            data = await reader.read(4096)
            received += len(data)
            connection.receive_data(data)
        elif isinstance(event, h11.Response):
            # h11 only bounds a head still incomplete; one that arrived whole is measured here.
            if received - len(connection.trailing_data[0]) > MAX_HEAD_BYTES:
                return Sent(None, "response head over 16 KiB")
            return Sent(event.status_code)
        elif isinstance(event, h11.ConnectionClosed):
            return Sent(None, "connection closed without a response")


def _describe(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    return exc.strerror or str(exc) or type(exc).__name__


def _literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _embedded(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, compatible), which is where it would go."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if any(ip in n for n in EMBEDDING) and int(ip) > 1:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []
