"""The webhook guard and its POST: guard decisions against a stubbed resolver (no real DNS), and real POSTs only to
receivers these tests start on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from muse.core.destinations import Allowlist, Refused, Resolver, Sent, check, parse_url, post, public, system_resolver

pytestmark = pytest.mark.anyio

LOCAL = Allowlist.parse("127.0.0.1")
NOTHING = Allowlist.parse("")


def stub(table: dict[str, list[str]]) -> Resolver:
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


LOOPBACK = stub({"hook.test": ["127.0.0.1"]})


async def never(host: str, port: int) -> list[str]:
    raise AssertionError(f"an IP literal was looked up: {host}")


async def numeric(host: str, port: int) -> list[str]:
    # The C library's own reading of odd IPv4 spellings, without ever asking DNS.
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )
    return [str(info[4][0]) for info in infos]


# --- URLs ---


def test_a_url_is_split_into_what_the_request_needs() -> None:
    target = parse_url("HTTPS://Hook.Example.COM/a/b?c=d&e=%20#fragment")
    assert (target.scheme, target.host, target.port, target.target) == (
        "https",
        "hook.example.com",
        443,
        "/a/b?c=d&e=%20",
    )
    assert target.url == "HTTPS://Hook.Example.COM/a/b?c=d&e=%20#fragment"
    assert parse_url("http://[2606:4700::1111]:8080").host == "2606:4700::1111"
    assert parse_url("http://[2606:4700::1111]:8080").target == "/"
    assert parse_url("http://example.com:8080?x").target == "/?x"
    assert parse_url("http://example.com/").port == 80
    assert parse_url("http://example.com/é").target == "/%C3%A9"
    assert parse_url("http://[::FFFF:127.0.0.1]/").host == "::ffff:127.0.0.1"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com:70/_",
        "javascript:alert(1)",
        "example.com/hook",
        "http://user:pass@example.com/",
        "http://user@example.com/",
        "http://evil.example\\@127.0.0.1/",
        "http:///path",
        "http://",
        "http:example.com",
        "http://:80/",
        "http://example.com:0/",
        "http://example.com:65536/",
        "http://example.com:http/",
        "http://example.com:80:81/",
        "http://[::1/",
        "http://[fe80::1%25eth0]/",
        "http://ex ample.com/",
        " http://example.com/",
        "http://example.com/\n",
        "http://example.com\t/",
        "http://exa\u200bmple.com/",
        "http://ex%41mple.com/",
        "http://127.0.0.1\\.example.com/",
        "http://bücher.example/",
        "http://" + "a" * 2048 + ".example/",
    ],
)
def test_urls_the_guard_refuses(url: str) -> None:
    with pytest.raises(Refused) as refused:
        parse_url(url)
    message = str(refused.value)
    assert message.endswith(".") and message[0].isupper() and ":" not in message.split()[0]


def test_the_length_limit_counts_utf8_bytes() -> None:
    head = "http://example.com/"
    assert parse_url(head + "a" * (2048 - len(head))).target.startswith("/a")
    with pytest.raises(Refused, match="2048 bytes"):
        parse_url(head + "a" * (2049 - len(head)))
    with pytest.raises(Refused, match="2048 bytes"):
        parse_url(head + "é" * 1020)  # 1020 characters, 2040 bytes


# --- the allow-list ---


def test_the_allow_list_takes_names_addresses_and_networks() -> None:
    allow = Allowlist.parse(" 127.0.0.1, Receiver.Internal ,10.0.0.0/8,,[::1],fd00::/8")
    assert allow.names == frozenset({"receiver.internal"})
    assert len(allow.networks) == 4
    assert allow.allows("RECEIVER.internal", "192.168.1.1")
    assert allow.allows("other.internal", "10.20.30.40")
    assert allow.allows("other.internal", "::ffff:10.20.30.40")
    assert allow.allows("other.internal", "::1")
    assert allow.allows("other.internal", "fd00:ec2::254")
    assert not allow.allows("other.internal", "192.168.1.1")
    assert not allow.allows("other.internal", "not an address")
    assert Allowlist(frozenset(), ()) == NOTHING


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "10.0.0.0/33", "bad host!", "http://receiver", "a..b", "::1::2"])
def test_a_bad_allow_list_entry_is_named(entry: str) -> None:
    with pytest.raises(ValueError, match="'" + entry.replace(".", r"\.").replace("*", r"\*") + "'"):
        Allowlist.parse("127.0.0.1," + entry)


# --- addresses ---

NOT_PUBLIC = [
    "127.0.0.1",
    "127.255.0.1",
    "::1",
    "10.1.2.3",
    "172.16.5.4",
    "172.31.255.255",
    "192.168.1.1",
    "fc00::1",
    "fd12:3456::1",
    "169.254.1.1",
    "fe80::1",
    "100.64.0.1",
    "100.127.255.254",
    "169.254.169.254",  # AWS, GCP, Azure metadata
    "fd00:ec2::254",  # AWS metadata over IPv6
    "100.100.100.200",  # Alibaba metadata
    "192.0.0.192",  # Oracle metadata
    "0.0.0.0",
    "::",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0:127.0.0.1",
    "::127.0.0.1",
    "2002:7f00:1::",  # 6to4 around 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 around the metadata address
    "64:ff9b::169.254.169.254",  # NAT64 around it
    "64:ff9b:1::1",
    "2001::1",  # Teredo
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "ff0e::1",
    "255.255.255.255",
    "198.18.0.1",
    "192.0.2.1",
    "2001:db8::1",
    "fec0::1",
    "240.0.0.1",
    "not an address",
]
PUBLIC = ["93.184.215.14", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::8.8.8.8"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses(address: str) -> None:
    assert not public(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address: str) -> None:
    assert public(address)


# --- guard decisions ---


async def test_a_public_address_passes() -> None:
    target, addresses = await check("https://hook.example/x", NOTHING, stub({"hook.example": ["93.184.215.14"]}))
    assert (target.host, addresses) == ("hook.example", ["93.184.215.14"])


@pytest.mark.parametrize("address", [a for a in NOT_PUBLIC if a != "not an address"])
async def test_a_name_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    with pytest.raises(Refused, match=re.escape(f"hook.example resolves to {address}, which is not a public address")):
        await check("https://hook.example/", NOTHING, stub({"hook.example": [address]}))


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/", "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://169.254.169.254/latest"]
)
async def test_an_address_in_the_url_is_judged_without_a_lookup(url: str) -> None:
    with pytest.raises(Refused, match="is not a public address"):
        await check(url, NOTHING, never)
    target, addresses = await check(url, Allowlist.parse("127.0.0.0/8,::/64,169.254.0.0/16,::ffff:0:0/96"), never)
    assert addresses == [target.host]


@pytest.mark.parametrize("host", ["2130706433", "0x7f.0.0.1", "127.1", "017700000001"])
async def test_odd_spellings_are_judged_by_what_they_resolve_to(host: str) -> None:
    with pytest.raises(Refused, match=re.escape("resolves to 127.0.0.1")):
        await check(f"http://{host}/", NOTHING, numeric)


async def test_one_private_address_among_public_ones_is_refused() -> None:
    resolver = stub({"hook.example": ["93.184.215.14", "10.0.0.1", "8.8.8.8"]})
    with pytest.raises(Refused, match=re.escape("10.0.0.1")):
        await check("https://hook.example/", NOTHING, resolver)
    # Allowing that one address is not allowing the others.
    resolver = stub({"hook.example": ["10.0.0.1", "127.0.0.1"]})
    with pytest.raises(Refused, match=re.escape("127.0.0.1")):
        await check("https://hook.example/", Allowlist.parse("10.0.0.1"), resolver)


@pytest.mark.parametrize("spec", ["hook.internal", "HOOK.Internal", "10.0.0.1", "10.0.0.0/8", "127.0.0.1,10.0.0.0/24"])
async def test_the_allow_list_lets_a_private_destination_through(spec: str) -> None:
    resolver = stub({"hook.internal": ["10.0.0.1", "93.184.215.14"]})
    _, addresses = await check("http://hook.internal:9000/", Allowlist.parse(spec), resolver)
    assert addresses == ["10.0.0.1", "93.184.215.14"]


async def test_a_name_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(Refused, match="does not resolve"):
        await check("https://nowhere.example/", NOTHING, stub({}))
    with pytest.raises(Refused, match="does not resolve"):
        await check("https://empty.example/", NOTHING, stub({"empty.example": []}))


async def test_the_system_resolver_answers_an_address_itself() -> None:
    assert await system_resolver("127.0.0.1", 80) == ["127.0.0.1"]
    assert await system_resolver("::1", 80) == ["::1"]


# --- receivers on 127.0.0.1 ---


@dataclass
class Request:
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(receiver: Receiver, reader: asyncio.StreamReader) -> Request:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    line, *fields = head.split("\r\n")[:-2]
    method, target, _ = line.split(" ")
    assert method == "POST"
    headers = {name.lower(): value.strip() for name, value in (f.split(":", 1) for f in fields)}
    request = Request(target, headers, await reader.readexactly(int(headers["content-length"])))
    receiver.requests.append(request)
    receiver.arrived.set()
    return request


@contextlib.asynccontextmanager
async def receiving(
    respond: Callable[[Receiver, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[Receiver]:
    tasks: set[asyncio.Task[object]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        receiver.connections += 1
        try:
            await respond(receiver, reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    receiver = Receiver(server.sockets[0].getsockname()[1])
    try:
        yield receiver
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def answering(response: bytes) -> Callable[[Receiver, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def respond(receiver: Receiver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(receiver, reader)
        writer.write(response)
        await writer.drain()

    return respond


HEADERS = {"Content-Type": "application/json", "webhook-id": "msg_1", "webhook-signature": "v1,abc="}


async def test_a_2xx_is_delivered_with_the_body_and_headers() -> None:
    async with receiving(answering(b"HTTP/1.1 204 No Content\r\n\r\n")) as receiver:
        sent = await post(f"http://127.0.0.1:{receiver.port}/hook?x=1", b'{"a": 1}', HEADERS, allow=LOCAL)
    assert sent == Sent(204) and sent.delivered
    [request] = receiver.requests
    assert request.target == "/hook?x=1" and request.body == b'{"a": 1}'
    assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert request.headers["content-length"] == "8"
    assert request.headers["connection"] == "close"
    assert request.headers["user-agent"] == "Muse-Webhooks"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == "msg_1" and request.headers["webhook-signature"] == "v1,abc="


async def test_a_500_is_not_delivered() -> None:
    async with receiving(answering(b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nOops")) as receiver:
        sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", HEADERS, allow=LOCAL)
    assert sent == Sent(500) and not sent.delivered


async def test_a_redirect_is_returned_not_followed() -> None:
    async with receiving(answering(b"HTTP/1.1 204 No Content\r\n\r\n")) as elsewhere:
        redirect = f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{elsewhere.port}/\r\n\r\n".encode()
        async with receiving(answering(redirect)) as receiver:
            sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", HEADERS, allow=LOCAL)
    assert sent == Sent(302) and not sent.delivered
    assert len(receiver.requests) == 1 and elsewhere.connections == 0


async def test_a_receiver_that_never_answers_times_out() -> None:
    async def silent(receiver: Receiver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(receiver, reader)
        await asyncio.Event().wait()

    async with receiving(silent) as receiver:
        start = time.monotonic()
        sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", HEADERS, allow=LOCAL, timeout=0.5)
        took = time.monotonic() - start
    assert sent == Sent(None, "timed out after 0.5 s") and not sent.delivered
    assert 0.45 < took < 1.5 and len(receiver.requests) == 1


async def test_a_resolver_that_never_answers_times_out() -> None:
    async def stuck(host: str, port: int) -> list[str]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    start = time.monotonic()
    sent = await post("http://hook.test/", b"{}", HEADERS, allow=LOCAL, timeout=0.2, resolver=stuck)
    assert sent == Sent(None, "timed out after 0.2 s") and time.monotonic() - start < 1


async def test_an_endless_body_is_never_read() -> None:
    async def endless(receiver: Receiver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(receiver, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n")
        while True:
            writer.write(b"x" * 65536)
            await writer.drain()

    async with receiving(endless) as receiver:
        start = time.monotonic()
        sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", HEADERS, allow=LOCAL, timeout=5)
        took = time.monotonic() - start
    assert sent == Sent(200) and took < 1


@pytest.mark.parametrize(("size", "delivered"), [(15_000, True), (16_500, False), (100_000, False)])
async def test_a_response_head_over_16_kib_is_an_error(size: int, delivered: bool) -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (size - 30) + b"\r\n\r\n"
    async with receiving(answering(head)) as receiver:
        sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", HEADERS, allow=LOCAL)
    assert sent == (Sent(200) if delivered else Sent(None, "response head over 16 KiB"))


async def test_a_closed_port_is_connection_refused() -> None:
    with socket.socket() as bound:  # bound, never listening: the port cannot be taken meanwhile
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        sent = await post(f"http://127.0.0.1:{port}/", b"{}", HEADERS, allow=LOCAL)
    assert sent == Sent(None, "connection refused")


async def test_a_receiver_closing_without_an_answer_is_an_error() -> None:
    async def hang_up(receiver: Receiver, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(receiver, reader)
        writer.close()

    async with receiving(hang_up) as receiver:
        sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", HEADERS, allow=LOCAL)
    assert sent.status is None and sent.error


async def test_without_the_allow_list_nothing_is_sent() -> None:
    async with receiving(answering(b"HTTP/1.1 204 No Content\r\n\r\n")) as receiver:
        sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", HEADERS, allow=NOTHING)
        hooked = await post(f"http://hook.test:{receiver.port}/", b"{}", HEADERS, allow=NOTHING, resolver=LOOPBACK)
    assert sent == Sent(None, "refused: 127.0.0.1 is not a public address.")
    assert hooked == Sent(None, "refused: hook.test resolves to 127.0.0.1, which is not a public address.")
    assert receiver.connections == 0


async def test_a_refused_url_comes_back_as_an_error() -> None:
    sent = await post("file:///etc/passwd", b"{}", HEADERS, allow=LOCAL)
    assert sent == Sent(None, "refused: The URL must start with http:// or https://.")


async def test_the_connection_goes_to_the_checked_address() -> None:
    async with receiving(answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")) as receiver:
        url = f"http://hook.test:{receiver.port}/in"
        sent = await post(url, b"{}", HEADERS, allow=Allowlist.parse("hook.test"), resolver=LOOPBACK)
    assert sent == Sent(200)
    assert receiver.requests[0].headers["host"] == f"hook.test:{receiver.port}"


async def test_a_failed_connect_moves_on_to_the_next_address() -> None:
    # ::1 has nothing on the receiver's port (or no IPv6 at all): either way that connect fails.
    resolver = stub({"hook.test": ["::1", "127.0.0.1"]})
    async with receiving(answering(b"HTTP/1.1 202 Accepted\r\n\r\n")) as receiver:
        url = f"http://hook.test:{receiver.port}/"
        sent = await post(url, b"{}", HEADERS, allow=Allowlist.parse("hook.test"), resolver=resolver)
    assert sent == Sent(202) and len(receiver.requests) == 1


async def test_the_callers_headers_cannot_change_the_framing() -> None:
    async with receiving(answering(b"HTTP/1.1 204 No Content\r\n\r\n")) as receiver:
        headers = {**HEADERS, "Content-Length": "999", "Host": "elsewhere", "Transfer-Encoding": "chunked"}
        sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", headers, allow=LOCAL)
    assert sent == Sent(204)
    assert receiver.requests[0].headers["host"] == f"127.0.0.1:{receiver.port}"
    assert "transfer-encoding" not in receiver.requests[0].headers


async def test_a_header_that_cannot_be_sent_is_an_error_not_an_exception() -> None:
    async with receiving(answering(b"HTTP/1.1 204 No Content\r\n\r\n")) as receiver:
        sent = await post(f"http://127.0.0.1:{receiver.port}/", b"{}", {"X-Bad": "a\r\nb"}, allow=LOCAL)
    assert sent.status is None and "header" in sent.error and receiver.requests == []


# --- TLS ---


def certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name`: its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@contextlib.asynccontextmanager
async def receiving_tls(cert_file: Path, key_file: Path, names: list[str | None]) -> AsyncIterator[Receiver]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    respond = answering(b"HTTP/1.1 204 No Content\r\n\r\n")
    receiver = Receiver(0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # TLS inside the handler, so that a client rejecting the certificate is the handler's business.
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await writer.start_tls(context)
            await respond(receiver, reader, writer)
        writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    try:
        yield receiver
    finally:
        server.close()


async def test_https_verifies_the_certificate(tmp_path: Path) -> None:
    cert_file, key_file = certificate(tmp_path, "hook.test")
    names: list[str | None] = []
    async with receiving_tls(cert_file, key_file, names) as receiver:
        url = f"https://hook.test:{receiver.port}/"
        sent = await post(url, b"{}", HEADERS, allow=Allowlist.parse("hook.test"), resolver=LOOPBACK)
    assert sent.status is None and sent.error.startswith("TLS certificate not accepted")
    assert receiver.requests == [] and names == ["hook.test"]


async def test_https_sends_the_host_name_for_sni(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert_file, key_file = certificate(tmp_path, "hook.test")
    trusting = ssl.create_default_context

    def trusting_ours() -> ssl.SSLContext:
        return trusting(cafile=str(cert_file))

    monkeypatch.setattr(ssl, "create_default_context", trusting_ours)
    names: list[str | None] = []
    async with receiving_tls(cert_file, key_file, names) as receiver:
        url = f"https://hook.test:{receiver.port}/tls"
        sent = await post(url, b"{}", HEADERS, allow=Allowlist.parse("hook.test"), resolver=LOOPBACK)
    assert sent == Sent(204) and names == ["hook.test"]
    assert receiver.requests[0].headers["host"] == f"hook.test:{receiver.port}"
