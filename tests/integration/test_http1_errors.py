"""HTTP/1.1 errors the proxy makes itself (issue 3, reference 3.5), with real sockets.

* Malformed requests (a bad request line that still passes detection, headers
  over 64 KiB, an invalid chunk size) get 400 / 431 with ``l5d-proxy-error``, an
  empty body, and their connection closed, while a concurrent keep-alive
  connection through the same proxy carries on untouched.
* A backend that refuses connections gives 502; one that accepts and never
  answers, with ``MESHPROXY_HTTP_RESPONSE_TIMEOUT=1s``, gives 504 after about 1 s;
  both are counted in ``*_http_errors_total``.

Parametrised over both twins and both topologies (one proxy's outbound; a pair).
In the pair the entry proxy (A's outbound) is the one that parses the client's
bytes, so it answers malformed requests; a refused backend sits behind B, so B's
inbound makes the 502 and A passes it on. B names the cause in ``l5d-proxy-error``
only to a meshed (identified) client (ref 3.4), so the 502 test also runs A -> B
over mTLS ("meshed-pair"), with a CA made in the test.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from tests.fakes.h1_upstream import Closed, H1Upstream, Reader, read_response
from tests.integration.test_http1_transparency import (  # noqa: F401 - world, worlds: shared fixtures (module-scoped here too)
    World,
    chain,
    start_all,
    stop_all,
    token,
    world,
    worlds,
)
from tests.support import make_proxy, metric_value, wait_until


@pytest.fixture(params=("one", "pair"))
def topology(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def upstream():
    server = H1Upstream()
    yield server
    server.close()


class Neighbour:
    """A well-formed keep-alive connection that must not notice anything."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.reader = Reader(self.sock)

    def get(self, target: str) -> None:
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: neighbour\r\n\r\n".encode())
        resp = read_response(self.reader)
        assert resp.status == 200 and resp.body == f"GET {target}\n".encode()
        assert (resp.get(b"connection") or b"").lower() != b"close"

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def neighbour(port: int, t: str):
    n = Neighbour(port)
    try:
        n.get(f"/before?t={t}")
        yield n
        n.get(f"/after?t={t}")  # the same connection: it was neither closed nor confused
    finally:
        n.close()


def assert_closed(reader: Reader) -> None:
    """The proxy closed the connection after its response (EOF, or a reset: both are bounded by the timeout)."""
    try:
        rest = reader.to_eof()
    except ConnectionResetError:
        return
    except TimeoutError:
        pytest.fail("the connection was left open after the error response")
    assert rest == b"", f"bytes after the error response: {rest[:200]!r}"


def assert_proxy_error(resp, status: int) -> None:
    assert resp.status == status, resp.raw[:500]
    assert resp.get(b"l5d-proxy-error"), f"no l5d-proxy-error in {resp.raw[:500]!r}"
    assert resp.body == b"" and resp.get(b"content-length") == b"0"


def malformed(port: int, *parts: bytes, pause: float = 0.0):
    """Send ``parts`` (pausing between them) on a fresh connection; return the response and the reader."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    reader = Reader(s)
    for i, part in enumerate(parts):
        if i:
            time.sleep(pause)
        s.sendall(part)
    return s, reader, read_response(reader)


# ---------------------------------------------------------------- malformed requests


def test_bad_request_line_gets_400_and_close(world, topology):
    t = token()
    port = world.entry(topology)
    with neighbour(port, t):
        # Passes detection (method, space, non-space target, space, HTTP/1.1) but \x01 is no URI character.
        s, reader, resp = malformed(port, f"GET /\x01bad?t={t} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with s:
            assert_proxy_error(resp, 400)
            assert_closed(reader)
    assert [r.target for r in world.seen(t)] == [f"/before?t={t}".encode(), f"/after?t={t}".encode()]


def test_headers_over_64k_get_431_and_close(world, topology):
    t = token()
    port = world.entry(topology)
    fill = "".join(f"X-Fill-{i:03d}: {'v' * 1000}\r\n" for i in range(80))  # ~80 KiB of headers
    with neighbour(port, t):
        s, reader, resp = malformed(port, f"GET /big-head?t={t} HTTP/1.1\r\nHost: x\r\n{fill}\r\n".encode())
        with s:
            assert_proxy_error(resp, 431)
            assert_closed(reader)
    assert [r.target for r in world.seen(t)] == [f"/before?t={t}".encode(), f"/after?t={t}".encode()]


def test_invalid_chunk_size_gets_400_and_close(world, topology):
    """The request is already on its way to the server (which reads the whole body before it
    answers) when the bad chunk size arrives: the proxy answers 400 itself."""
    t = token()
    port = world.entry(topology)
    with neighbour(port, t):
        s, reader, resp = malformed(
            port,
            f"POST /hash?t={t} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode(),
            b"ZZ\r\nworld\r\n0\r\n\r\n",
            pause=0.3,
        )
        with s:
            assert_proxy_error(resp, 400)
            assert_closed(reader)
    # The server never saw a complete body (it records a request once the body is read) ...
    assert [r.target for r in world.seen(t)] == [f"/before?t={t}".encode(), f"/after?t={t}".encode()]
    # ... and the request it had started to receive was given up: its connection closed, on every hop.
    try:
        wait_until(lambda: [r for r in list(world.up.aborted) if t.encode() in r.target], 2, what="the backend connection closed")
    except TimeoutError:
        pytest.fail(f"{topology}: 2 s after the 400 the backend still holds the cut request's connection open")


# ---------------------------------------------------------------- backends that fail


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connects are refused
    return port


TRUST_DOMAIN = "cluster.local"
A_ID = "client.default.serviceaccount.identity.linkerd.cluster.local"
B_ID = "web.default.serviceaccount.identity.linkerd.cluster.local"


def identity_env(directory, issuer, name: str) -> dict[str, str]:
    """Files for a proxy's identity ``name``, issued by the test's CA."""
    from cryptography.hazmat.primitives import serialization

    from proxy.tls import ca

    root_cert, _root_key, issuer_cert, issuer_key = issuer
    leaf, key = ca.issue_leaf(issuer_cert, issuer_key, name, 3600)
    directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (directory / "cert.pem").write_bytes(leaf.public_bytes(pem) + issuer_cert.public_bytes(pem))
    (directory / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return {
        "MESHPROXY_IDENTITY_DISABLED": "false",
        "MESHPROXY_IDENTITY_CERT_FILE": str(directory / "cert.pem"),
        "MESHPROXY_IDENTITY_KEY_FILE": str(directory / "key.pem"),
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": root_cert.public_bytes(pem).decode(),
        "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": name,
    }


@contextlib.contextmanager
def meshed_pair(pure: bool, target: int, tmp_path):
    """A -> B over mTLS: A's discovery file names B's inbound as an endpoint with B's identity."""
    from proxy.tls import ca

    issuer = ca.make_ca(TRUST_DOMAIN)
    b = make_proxy(pure=pure, MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{target}", **identity_env(tmp_path / "b", issuer, B_ID))
    discovery = tmp_path / "discovery.toml"
    discovery.write_text(f'[[services]]\nauthority = "web.default.svc.cluster.local"\nport = 80\n'
                         f'[[services.endpoints]]\naddr = "127.0.0.1:{b.inbound}"\nidentity = "{B_ID}"\n')
    a = make_proxy(pure=pure, MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{b.inbound}", MESHPROXY_DISCOVERY_FILE=str(discovery),
                   **identity_env(tmp_path / "a", issuer, A_ID))
    start_all(a, b)
    try:
        yield a.outbound, [a, b], b
    finally:
        assert stop_all(a, b) == [0, 0], "a proxy did not exit cleanly:\n" + a.read_output() + b.read_output()


@pytest.mark.parametrize("path", ["one", "pair", "meshed-pair"])
def test_refused_backend_gives_502(twin, path, tmp_path):
    """``pair`` is plaintext, so A is no identified client of B; ``meshed-pair`` runs A -> B over mTLS."""
    port = dead_port()
    proxies_cm = meshed_pair(twin, port, tmp_path) if path == "meshed-pair" else chain(twin, path, port)
    with proxies_cm as (entry, proxies, last):
        with socket.create_connection(("127.0.0.1", entry), timeout=5) as s:
            s.sendall(b"GET /refused HTTP/1.1\r\nHost: x\r\n\r\n")
            reader = Reader(s)
            resp = read_response(reader)
            if path == "pair":
                # B's inbound tells only meshed (identified) clients why (ref 3.4): same 502, no reason.
                assert resp.status == 502 and resp.body == b"" and resp.get(b"content-length") == b"0", resp.raw
                assert resp.get(b"l5d-proxy-error") is None, resp.raw
            else:
                assert_proxy_error(resp, 502)
            # An I/O error is fatal (ref 3.5): the connection goes too. Over the meshed pair's HTTP/2
            # hop B says so with l5d-proxy-connection: close, and A closes its client's connection.
            assert_closed(reader)
        if path == "one":
            text = wait_until(lambda: (t := last.metrics()) and "outbound_http_errors_total{" in t and t, 5, what="error counted")
            assert metric_value(text, "outbound_http_errors_total", error="i/o") == 1
        else:
            # B's inbound could not reach its app: B makes the 502 and counts it; A only relays a response.
            text = wait_until(lambda: (t := last.metrics()) and "inbound_http_errors_total{" in t and t, 5, what="error counted")
            assert metric_value(text, "inbound_http_errors_total", error="i/o") == 1
            if path == "meshed-pair":  # the request did cross the hop over mTLS, from A's identity
                assert metric_value(text, "request_total", direction="inbound", tls="true", client_id=A_ID) == 1
        text = wait_until(lambda: (t := proxies[0].metrics()) and "response_total{" in t and t, 5, what="response counted")
        assert metric_value(text, "response_total", direction="outbound", status_code="502", classification="failure") == 1


def test_silent_backend_gives_504_after_the_response_timeout(twin, topology, upstream):
    t = token()
    outer = {"MESHPROXY_HTTP_RESPONSE_TIMEOUT": "1s"}
    with chain(twin, topology, upstream.port, outer=outer) as (entry, proxies, _last):
        with socket.create_connection(("127.0.0.1", entry), timeout=8) as s:
            started = time.monotonic()
            s.sendall(f"GET /hang?t={t} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            reader = Reader(s)
            try:
                resp = read_response(reader)
            except (Closed, TimeoutError) as exc:
                pytest.fail(f"no response after {time.monotonic() - started:.1f}s: {exc!r}")
            elapsed = time.monotonic() - started
            assert_proxy_error(resp, 504)
            assert 0.8 <= elapsed <= 3, f"504 after {elapsed:.2f}s"
        (seen,) = [r for r in list(upstream.requests) if t.encode() in r.target]
        # The request is given up all the way down: every hop closes its connection towards the
        # backend, so nothing stays held open waiting for an answer nobody will read.
        try:
            wait_until(lambda: seen.hung_up is not None, 2, what="the backend connection closed")
        except TimeoutError:
            pytest.fail(f"{topology}: 2 s after the 504 the backend still holds the request's connection open")
        text = wait_until(lambda: (x := proxies[0].metrics()) and "outbound_http_errors_total{" in x and x, 5, what="error counted")
        assert metric_value(text, "outbound_http_errors_total", error="response timeout") == 1
        assert metric_value(text, "response_total", direction="outbound", status_code="504", classification="failure") == 1


def test_a_client_that_leaves_mid_request_cancels_it(twin, topology, upstream):
    """The client closes its connection while its request waits for an answer: like hyper
    (``http1_half_close`` off, Linkerd's setting) the proxy drops the request and closes its
    connection towards the backend, on every hop, instead of holding both until the backend
    answers (which a drain would then wait for, up to the grace period)."""
    t = token()
    with chain(twin, topology, upstream.port) as (entry, _proxies, _last):
        s = socket.create_connection(("127.0.0.1", entry), timeout=5)
        with s:
            s.sendall(f"GET /hang?t={t} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            (seen,) = wait_until(lambda: [r for r in list(upstream.requests) if t.encode() in r.target], 5, what="request at the backend")
        try:
            wait_until(lambda: seen.hung_up is not None, 2, what="the backend connection closed")
        except TimeoutError:
            pytest.fail(f"{topology}: 2 s after the client left, the backend still holds its request's connection open")
