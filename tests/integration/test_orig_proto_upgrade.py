"""HTTP/1 between meshed proxies travels as HTTP/2 (ref 3.3): the outbound upgrade end to end.

A raw HTTP/1.1 client -> meshproxy outbound -> mTLS -> meshproxy inbound -> the
recording HTTP/1 app (tests/fakes/h1_upstream.py). The app must see the request
its client wrote, byte for byte and header case included, plus the inbound's
``l5d-client-id``; the hop between the proxies must be HTTP/2, as the inbound
proxy's own protocol detection counts it. A CA is made in the test; every
process and server is stopped in a finally.
"""

from __future__ import annotations

import socket

import pytest

from proxy.tls import ca
from tests.fakes.h1_upstream import H1Upstream, Reader, read_response
from tests.integration.test_identity_mtls import CLIENT_ID, SERVER_ID, TRUST_DOMAIN, write_identity
from tests.support import make_proxy, metric_value

WAIT = 30.0


@pytest.fixture(scope="module")
def issuer():
    return ca.make_ca(TRUST_DOMAIN)


class Pair:
    def __init__(self, tmp_path, issuer, pure: bool, protocol: str = "") -> None:
        self.app = H1Upstream()
        self.server = self.client = None
        try:
            self.server = make_proxy(pure, MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{self.app.port}",
                                     **write_identity(tmp_path / "server", issuer, SERVER_ID)).start()
            hint = f'protocol = "{protocol}"\n' if protocol else ""
            discovery = tmp_path / "discovery.toml"
            discovery.write_text(f'[[services]]\nauthority = "web.default.svc.cluster.local"\nport = 80\n'
                                 f'[[services.endpoints]]\naddr = "127.0.0.1:{self.server.inbound}"\n'
                                 f'identity = "{SERVER_ID}"\n{hint}')
            self.client = make_proxy(pure, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{self.server.inbound}",
                                     MESHPROXY_DISCOVERY_FILE=str(discovery),
                                     **write_identity(tmp_path / "client", issuer, CLIENT_ID)).start()
        except BaseException:
            self.stop()
            raise

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.client.outbound), timeout=WAIT)
        return sock

    def stop(self) -> None:
        for p in (self.client, self.server):
            if p is not None:
                p.stop()
        self.app.close()


@pytest.fixture
def pair(tmp_path, issuer, twin):
    p = Pair(tmp_path, issuer, twin)
    yield p
    p.stop()


def count(text: str, name: str, **labels: str) -> float:
    """A counter's value; a series never touched is not exported, which means 0."""
    try:
        return metric_value(text, name, **labels)
    except KeyError:
        return 0.0


def with_client_id(head: bytes) -> bytes:
    """What the app must see for ``head``: the same bytes, plus the inbound's l5d-client-id."""
    assert head.endswith(b"\r\n\r\n")
    return head[:-2] + b"l5d-client-id: " + CLIENT_ID.encode() + b"\r\n\r\n"


def exchange(sock: socket.socket, reader: Reader, request: bytes, method: bytes = b"GET"):
    sock.sendall(request)
    return read_response(reader, method)


def test_app_sees_the_original_request_and_the_hop_is_http2(pair):
    heads = [
        b"GET /first?q=1 HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\nX-Mixed-CaSe: a\r\nuser-agent: raw/1\r\n"
        b"ACCEPT: */*\r\nX-Mixed-CaSe: b\r\n\r\n",
        b"POST /hash HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n"
        b"X-Request-Id: 42\r\n\r\n",
        b"HEAD /big HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\nAccept: */*\r\n\r\n",
    ]
    sock = pair.connect()
    reader = Reader(sock)
    try:
        first = exchange(sock, reader, heads[0])
        posted = exchange(sock, reader, heads[1] + b"hello world", b"POST")
        head_only = exchange(sock, reader, heads[2], b"HEAD")
    finally:
        sock.close()
    assert first.status == 200 and first.body == b"GET /first?q=1\n"
    assert posted.status == 200 and b"len=11 framing=length" in posted.body
    assert head_only.status == 200 and head_only.body == b"" and head_only.get(b"content-length") == str(8 << 20).encode()
    # The app's own spelling of its reply's field names comes back too (X-Reply-CaSe).
    assert b"X-Reply-CaSe: 2" in first.heads
    seen = pair.app.requests
    assert [s.head for s in seen] == [with_client_id(h) for h in heads]
    # The proxies' hop: one connection, detected as HTTP/2 by the inbound proxy, three requests on it.
    inbound = pair.server.metrics()
    assert metric_value(inbound, "inbound_tcp_detect_http_results_total", result="http/2") == 1
    assert count(inbound, "inbound_tcp_detect_http_results_total", result="http/1") == 0
    assert metric_value(inbound, "request_total", direction="inbound", tls="true", client_id=CLIENT_ID) == 3
    outbound = pair.client.metrics()
    assert metric_value(outbound, "request_total", direction="outbound", tls="true", server_id=SERVER_ID) == 3
    assert metric_value(outbound, "tcp_open_total", direction="outbound", peer="dst", tls="true") == 1


def test_chunked_upload_and_many_client_connections_share_one_hop(pair):
    body = b"x" * 300_000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536]) for i in range(0, len(body), 65536))
    head = b"PUT /hash HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\nTransfer-Encoding: chunked\r\nX-Up: 1\r\n\r\n"
    socks = [pair.connect() for _ in range(4)]
    try:
        for s in socks:
            s.sendall(head + chunks + b"0\r\n\r\n")
        replies = [read_response(Reader(s), b"PUT") for s in socks]
    finally:
        for s in socks:
            s.close()
    import hashlib

    digest = hashlib.sha256(body).hexdigest().encode()
    for r in replies:
        assert r.status == 200 and b"sha256=" + digest in r.body and b"framing=chunked" in r.body
    for s in pair.app.requests:
        names = [n for n, _ in s.headers]
        assert b"Transfer-Encoding" in names and b"X-Up" in names and b"Host" in names
    assert metric_value(pair.server.metrics(), "inbound_tcp_detect_http_results_total", result="http/2") == 1
    assert metric_value(pair.client.metrics(), "tcp_open_total", direction="outbound", peer="dst", tls="true") == 1


def test_an_endpoint_hinted_http1_is_not_upgraded(tmp_path, issuer):
    p = Pair(tmp_path, issuer, False, protocol="http1")
    try:
        sock = p.connect()
        try:
            reply = exchange(sock, Reader(sock), b"GET /plain HTTP/1.1\r\nHost: web\r\nX-CaSe: 1\r\n\r\n")
        finally:
            sock.close()
        assert reply.status == 200
        assert p.app.requests[0].head == with_client_id(b"GET /plain HTTP/1.1\r\nHost: web\r\nX-CaSe: 1\r\n\r\n")
        inbound = p.server.metrics()
        assert metric_value(inbound, "inbound_tcp_detect_http_results_total", result="http/1") == 1
        assert count(inbound, "inbound_tcp_detect_http_results_total", result="http/2") == 0
    finally:
        p.stop()


def test_responses_are_those_of_the_app_byte_for_byte(pair):
    """Status line, field names as the app spelled them, order and framing survive the HTTP/2 hop."""
    for path in (b"/plain", b"/chunked/100000", b"/status/204", b"/status/404", b"/close/5000"):
        request = b"GET " + path + b" HTTP/1.1\r\nHost: web.default.svc.cluster.local\r\n\r\n"
        direct = socket.create_connection(("127.0.0.1", pair.app.port), timeout=WAIT)
        meshed = pair.connect()
        try:
            want = exchange(direct, Reader(direct), request)
            got = exchange(meshed, Reader(meshed), request)
        finally:
            direct.close()
            meshed.close()
        if path.startswith(b"/close/"):
            # A close-delimited body cannot cross HTTP/2 as such: it arrives chunked, with the same bytes.
            assert got.get(b"transfer-encoding") == b"chunked" and got.body == want.body
            continue
        assert got.heads == want.heads, path
        assert got.body == want.body, path
