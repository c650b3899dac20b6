"""HTTP/1 over HTTP/2 between proxies: the inbound orig-proto downgrade (ref 3.3).

A Linkerd outbound proxy sends its app's HTTP/1 requests to a meshed peer as
HTTP/2 streams marked ``l5d-orig-proto: HTTP/1.1``. Here the client plays that
outbound proxy (HTTP/2 prior knowledge with the h2 library over a plain
socket, minus the TLS) against the real meshproxy's inbound port; connections
there that were not redirected go to ``MESHPROXY_INBOUND_FALLBACK_ADDR``, an
HTTP/1-only app:

* ``tests/fakes/h1_upstream.py``, which records every request head byte for
  byte and the body's framing and hash, and answers with ``X-Reply-CaSe: 2``;
* a small app in this file for what that one does not do: stop reading a
  request body, reset the connection, die in the middle of a body.

Streams without the mark still go out as HTTP/2 (to tests/fakes/h2_upstream.py).
Every wait is bounded; every process and server is stopped in a finally.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.fakes.h1_upstream import H1Upstream, Reader, parse_head, read_chunked
from tests.support import ROOT, ThreadedServer, free_port, make_proxy, metric_value

pytest.importorskip("h2.connection")
from h2.config import H2Configuration  # noqa: E402
from h2.connection import H2Connection  # noqa: E402
from h2.events import (  # noqa: E402
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import StreamClosedError  # noqa: E402

FAKES = os.path.join(ROOT, "tests", "fakes")
MiB = 1 << 20
WAIT = 30.0  # bound of any one exchange, seconds
_tokens = iter(range(1, 1 << 30))


def token() -> str:
    """A path component no other test uses: finds this test's request among what the app saw."""
    return f"{os.getpid()}-{next(_tokens)}"


# ---------------------------------------------------------------- an HTTP/2 client


@dataclass
class Reply:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    informational: list[int] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    def get(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    @property
    def over(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """HTTP/2 with prior knowledge on a real socket, as a Linkerd outbound proxy
    talks to its peer's inbound (minus TLS). Request bodies are sent as the
    proxy's windows allow; a stream in ``stalled`` is read but its window is not
    reopened, like a client that stopped reading it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.replies: dict[int, Reply] = {}
        self.outgoing: dict[int, tuple[memoryview, list[tuple[bytes, bytes]] | None]] = {}
        self.sent: dict[int, int] = {}  # request body bytes sent per stream
        self.stalled: dict[int, int] = {}  # stream -> received bytes not acknowledged
        self.flush()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, method: bytes, path: bytes, *, orig: bytes | None = b"HTTP/1.1", authority: bytes | None = b"app.test:8080",
                headers: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None, length: bool = False,
                trailers: list[tuple[bytes, bytes]] | None = None) -> int:
        """Open a stream; ``length`` adds content-length for ``body``."""
        block = [(b":method", method), (b":scheme", b"http"), (b":path", path)]
        if authority is not None:
            block.append((b":authority", authority))
        if orig is not None:
            block.append((b"l5d-orig-proto", orig))
        if body is not None and length:
            block.append((b"content-length", str(len(body)).encode()))
        block += headers or []
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, block, end_stream=body is None)
        self.replies[sid] = Reply()
        if body is not None:
            self.outgoing[sid] = (memoryview(body), trailers)
            self.sent[sid] = 0
            self._send_bodies()
        self.flush()
        return sid

    def reset(self, sid: int) -> None:
        self.conn.reset_stream(sid, 8)  # CANCEL
        self.outgoing.pop(sid, None)
        self.flush()

    def unstall(self, sid: int) -> None:
        pending = self.stalled.pop(sid, 0)
        if pending:
            self.conn.acknowledge_received_data(pending, sid)
            self.flush()

    def _send_bodies(self) -> None:
        conn = self.conn
        for sid, (left, trailers) in list(self.outgoing.items()):
            try:
                while left:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    conn.send_data(sid, left[:window].tobytes())
                    self.sent[sid] += min(window, len(left))
                    left = left[window:]
                if left:
                    self.outgoing[sid] = (left, trailers)
                    continue
                del self.outgoing[sid]
                if trailers:
                    conn.send_headers(sid, trailers, end_stream=True)
                else:
                    conn.end_stream(sid)
            except StreamClosedError:
                self.outgoing.pop(sid, None)

    def _handle(self, event: object) -> None:
        if isinstance(event, ResponseReceived):
            reply = self.replies[event.stream_id]
            reply.headers = list(event.headers)
            reply.status = int(dict(event.headers)[b":status"])
        elif isinstance(event, InformationalResponseReceived):
            self.replies[event.stream_id].informational.append(int(dict(event.headers)[b":status"]))
        elif isinstance(event, DataReceived):
            self.replies[event.stream_id].body += event.data
            if event.stream_id in self.stalled:
                self.stalled[event.stream_id] += event.flow_controlled_length
                self.conn.increment_flow_control_window(event.flow_controlled_length)  # the connection only
            elif event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, TrailersReceived):
            self.replies[event.stream_id].trailers = list(event.headers)
        elif isinstance(event, StreamEnded):
            self.replies[event.stream_id].ended = True
        elif isinstance(event, StreamReset):
            self.replies[event.stream_id].reset = event.error_code
            self.outgoing.pop(event.stream_id, None)
        elif isinstance(event, (WindowUpdated, RemoteSettingsChanged)):
            self._send_bodies()

    def wait(self, predicate, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not reached in {timeout} s; replies: {self.summary()}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not data:
                raise ConnectionError(f"the proxy closed the connection; replies: {self.summary()}")
            for event in self.conn.receive_data(data):
                self._handle(event)
            self._send_bodies()
            self.flush()

    def run(self, *sids: int, timeout: float = WAIT) -> list[Reply]:
        """Wait until every stream in ``sids`` is over (ended or reset)."""
        self.wait(lambda: all(self.replies[s].over for s in sids), timeout)
        return [self.replies[s] for s in sids]

    def summary(self) -> str:
        return repr({s: (r.status, len(r.body), r.ended, r.reset) for s, r in self.replies.items()})


# ---------------------------------------------------------------- processes and apps


class Process:
    """A helper process printing ``listening <port>`` when ready."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self.lines.get(timeout=15)
            while not line.startswith("listening"):
                line = self.lines.get(timeout=15)
        except queue.Empty:
            self.stop()
            raise TimeoutError(f"{args[0]} did not start") from None
        self.port = int(line.split()[1])

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextlib.contextmanager
def running_proxy(target: str, pure: bool = False):
    proxy = make_proxy(pure=pure, MESHPROXY_INBOUND_FALLBACK_ADDR=target)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextlib.contextmanager
def h2_client(port: int):
    client = H2Client(port)
    try:
        yield client
    finally:
        client.close()


class OddApp:
    """An HTTP/1-only app for what h1_upstream does not do, chosen by path:

    /slow-reader   reads the head, then the (chunked) body only once ``release`` is set;
                   answers with the body's hash
    /rst           resets the connection on the request head (RST, no response)
    /cut           sends a head promising 100000 bytes, 7 of them, then resets
    /early         answers 413 at once, then reads and drops the body until the client closes
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.server = ThreadedServer(self.handle)
        self.port = self.server.port

    def handle(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        reader = Reader(conn)
        first, _headers = parse_head(reader.until(b"\r\n\r\n"))
        target = first.split(b" ")[1]
        if target.startswith(b"/slow-reader"):
            self.release.wait(WAIT)
            body, _ = read_chunked(reader)
            digest = hashlib.sha256(body).hexdigest().encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(digest), digest))
            return
        if target.startswith(b"/early"):
            conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlarge")
            while reader.some():
                pass
            return
        if target.startswith(b"/cut"):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
            time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST

    def close(self) -> None:
        self.release.set()
        self.server.close()


@pytest.fixture(scope="module")
def app():
    server = H1Upstream()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module", params=["cython", "python"])
def proxy(request, app):
    """The meshproxy whose inbound fallback is the HTTP/1 app; on both parser twins."""
    with running_proxy(f"127.0.0.1:{app.port}", pure=request.param == "python") as p:
        yield p


def seen(app: H1Upstream, t: str, timeout: float = 10.0):
    """The request the app received whose target carries token ``t``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in list(app.requests) if t.encode() in r.target]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"the app never received a request with {t}")


def no_hop_by_hop(reply: Reply) -> None:
    names = {n for n, _ in reply.headers}
    assert not names & {b"transfer-encoding", b"connection", b"keep-alive", b"upgrade", b"proxy-connection"}, names


# ---------------------------------------------------------------- requests


def test_get_becomes_an_http11_request(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        sid = client.request(b"GET", f"/p/get?t={t}".encode(), headers=[(b"x-client", b"yes"), (b"accept", b"*/*")])
        (reply,) = client.run(sid)
    got = seen(app, t)
    assert got.head == (
        f"GET /p/get?t={t} HTTP/1.1\r\n"
        "host: app.test:8080\r\n"
        "x-client: yes\r\n"
        "accept: */*\r\n\r\n"
    ).encode()
    assert got.framing == "none"
    assert reply.status == 200 and reply.ended
    assert reply.get(b"l5d-orig-proto") == b"HTTP/1.1"
    assert reply.get(b"x-reply-case") == b"2"  # the app's own header, in HTTP/2's lower case
    assert reply.get(b"content-type") == b"text/plain"
    assert bytes(reply.body) == f"GET /p/get?t={t}\n".encode()
    no_hop_by_hop(reply)


def test_host_field_without_authority(proxy, app):
    """RFC 9113 8.3.1: a request may carry ``host`` instead of ``:authority`` (h2 refuses the two if they differ)."""
    t = token()
    with h2_client(proxy.inbound) as client:
        sid = client.request(b"GET", f"/p/host?t={t}".encode(), authority=None, headers=[(b"host", b"other.test")])
        (reply,) = client.run(sid)
    assert reply.status == 200
    got = seen(app, t)
    assert [v for n, v in got.headers if n.lower() == b"host"] == [b"other.test"]


def test_absolute_form_target(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        (reply,) = client.run(client.request(b"GET", f"/p/abs?t={t}".encode(), orig=b"HTTP/1.1; absolute-form"))
    assert reply.status == 200 and reply.get(b"l5d-orig-proto") == b"HTTP/1.1"
    got = seen(app, t)
    assert got.target == f"http://app.test:8080/p/abs?t={t}".encode()
    assert got.version == b"HTTP/1.1"
    assert got.get(b"host") == b"app.test:8080"


def test_http10_original_is_sent_as_http11(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        (reply,) = client.run(client.request(b"GET", f"/p/ten?t={t}".encode(), orig=b"HTTP/1.0"))
    assert reply.status == 200 and reply.get(b"l5d-orig-proto") == b"HTTP/1.1"
    assert seen(app, t).version == b"HTTP/1.1"


def test_body_with_content_length(proxy, app):
    t = token()
    body = os.urandom(100_000)
    with h2_client(proxy.inbound) as client:
        (reply,) = client.run(client.request(b"POST", f"/hash?t={t}".encode(), body=body, length=True,
                                             headers=[(b"content-type", b"application/octet-stream")]))
    got = seen(app, t)
    assert got.framing == "length" and got.get(b"content-length") == b"100000"
    assert got.get(b"transfer-encoding") is None
    assert got.body_sha256 == hashlib.sha256(body).hexdigest()
    assert reply.status == 200
    assert bytes(reply.body) == f"sha256={got.body_sha256} len=100000 framing=length\n".encode()


def test_body_without_length_is_chunked(proxy, app):
    t = token()
    body = os.urandom(300_000)
    with h2_client(proxy.inbound) as client:
        (reply,) = client.run(client.request(b"PUT", f"/hash?t={t}".encode(), body=body))
    got = seen(app, t)
    assert got.framing == "chunked" and got.get(b"transfer-encoding") == b"chunked"
    assert got.get(b"content-length") is None
    assert got.body_sha256 == hashlib.sha256(body).hexdigest() and got.body_len == len(body)
    assert reply.status == 200 and b"framing=chunked" in reply.body


def test_request_trailers_end_the_chunked_body(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        sid = client.request(b"POST", f"/hash?t={t}".encode(), body=b"with trailers", trailers=[(b"x-sum", b"1")])
        (reply,) = client.run(sid)
    assert reply.status == 200
    got = seen(app, t)
    assert got.framing == "chunked" and got.body_sha256 == hashlib.sha256(b"with trailers").hexdigest()


def test_post_without_body_states_an_empty_one(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        (reply,) = client.run(client.request(b"POST", f"/hash?t={t}".encode()))
    got = seen(app, t)
    assert got.get(b"content-length") == b"0" and got.get(b"transfer-encoding") is None
    assert reply.status == 200 and b"len=0" in reply.body


def test_head_204_and_304_have_no_body(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        head = client.request(b"HEAD", f"/big?t={t}".encode())
        empty = client.request(b"GET", f"/status/204?t={t}".encode())
        cached = client.request(b"GET", f"/status/304?t={t}".encode())
        replies = client.run(head, empty, cached)
    assert [r.status for r in replies] == [200, 204, 304]
    assert all(r.ended and not r.body for r in replies)
    assert replies[0].get(b"content-length") == str(8 * MiB).encode()
    assert replies[2].get(b"etag") == b'"v1"'
    assert all(r.get(b"l5d-orig-proto") == b"HTTP/1.1" for r in replies)


def test_response_hop_by_hop_fields_are_dropped(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        (reply,) = client.run(client.request(b"GET", f"/hop?t={t}".encode()))
    assert reply.status == 200 and bytes(reply.body) == b"hop\n"
    assert reply.get(b"x-srv-keep") == b"yes"
    assert reply.get(b"x-srv-drop") is None  # named by the app's Connection field
    no_hop_by_hop(reply)


def test_chunked_and_close_delimited_responses(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        chunked = client.request(b"GET", f"/chunked/200000?t={t}".encode())
        closed = client.request(b"GET", f"/close/150000?t={t}".encode())
        replies = client.run(chunked, closed)
    assert bytes(replies[0].body) == app.blob[:200000]
    assert bytes(replies[1].body) == app.blob[:150000]
    for reply in replies:
        assert reply.status == 200 and reply.ended
        no_hop_by_hop(reply)


def test_expect_100_continue_is_relayed(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        sid = client.request(b"POST", f"/hash?t={t}".encode(), body=b"continued", length=True,
                             headers=[(b"expect", b"100-continue")])
        (reply,) = client.run(sid)
    assert reply.informational == [100]
    assert reply.status == 200 and b"len=9" in reply.body


def test_keep_alive_connection_is_reused(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        client.run(client.request(b"GET", f"/p/ka1?t={t}".encode()))
        client.run(client.request(b"GET", f"/p/ka2?t={t}".encode()))
    with h2_client(proxy.inbound) as client:  # another client connection: the same pool
        client.run(client.request(b"GET", f"/p/ka3?t={t}".encode()))
    conns = [r.conn for r in list(app.requests) if t.encode() in r.target]
    assert len(conns) == 3 and len(set(conns)) == 1, conns


def test_many_streams_on_one_connection(proxy, app):
    t = token()
    bodies = {i: os.urandom(50_000 + i * 1000) for i in range(10)}
    with h2_client(proxy.inbound) as client:
        gets = {i: client.request(b"GET", f"/chunked/{100_000 + i * 7919}?t={t}-{i}".encode()) for i in range(10)}
        posts = {i: client.request(b"POST", f"/hash?t={t}-p{i}".encode(), body=b, length=i % 2 == 0) for i, b in bodies.items()}
        client.run(*gets.values(), *posts.values())
    for i, sid in gets.items():
        reply = client.replies[sid]
        assert reply.status == 200 and bytes(reply.body) == app.blob[:100_000 + i * 7919]
    for i, sid in posts.items():
        reply = client.replies[sid]
        digest = hashlib.sha256(bodies[i]).hexdigest()
        assert reply.status == 200 and reply.body.startswith(f"sha256={digest}".encode()), i
    # Ten requests at a time: the app saw several connections, one exchange on each at a time.
    assert len({r.conn for r in list(app.requests) if t.encode() in r.target}) > 1


def test_large_upload_and_download(proxy, app):
    t = token()
    upload = os.urandom(4 * MiB)
    with h2_client(proxy.inbound) as client:
        down = client.request(b"GET", f"/chunked/{4 * MiB}?t={t}".encode())
        sized = client.request(b"GET", f"/big?t={t}".encode())
        up_streamed = client.request(b"POST", f"/hash?t={t}-s".encode(), body=upload)
        up_sized = client.request(b"POST", f"/hash?t={t}-l".encode(), body=upload, length=True)
        client.run(down, sized, up_streamed, up_sized, timeout=60)
    assert bytes(client.replies[down].body) == app.blob[:4 * MiB]
    assert bytes(client.replies[sized].body) == app.blob
    assert client.replies[sized].get(b"content-length") == str(8 * MiB).encode()
    digest = hashlib.sha256(upload).hexdigest()
    assert client.replies[up_streamed].body.startswith(f"sha256={digest} len={4 * MiB} framing=chunked".encode())
    assert client.replies[up_sized].body.startswith(f"sha256={digest} len={4 * MiB} framing=length".encode())


def dst_read_bytes(proxy) -> float:
    try:
        return metric_value(proxy.metrics(), "tcp_read_bytes_total", direction="inbound", peer="dst")
    except KeyError:
        return 0.0


def test_app_is_not_read_while_the_client_window_is_shut(proxy, app):
    """A client that stops reading one stream: the proxy stops reading the app
    (it holds about one window, not the 8 MiB body), and goes on when it reads again."""
    t = token()
    with h2_client(proxy.inbound) as client:
        client.run(client.request(b"GET", f"/p/warm?t={t}".encode()))
        before = dst_read_bytes(proxy)
        sid = client.request(b"GET", f"/big?t={t}".encode())
        client.stalled[sid] = 0
        client.wait(lambda: len(client.replies[sid].body) >= 65535)
        time.sleep(1.0)
        client.wait(lambda: True)
        held = dst_read_bytes(proxy) - before
        assert held < 2 * MiB, held
        other = client.request(b"GET", f"/p/other?t={t}".encode())  # the connection still serves other streams
        client.run(other)
        client.unstall(sid)
        (reply,) = client.run(sid, timeout=60)
    assert bytes(reply.body) == app.blob


def test_client_reset_mid_response(proxy, app):
    t = token()
    with h2_client(proxy.inbound) as client:
        sid = client.request(b"GET", f"/chunked/{4 * MiB}?t={t}".encode())
        client.stalled[sid] = 0
        client.wait(lambda: len(client.replies[sid].body) > 0)
        client.reset(sid)
        (after,) = client.run(client.request(b"GET", f"/p/after?t={t}".encode()))
    assert after.status == 200 and bytes(after.body) == f"GET /p/after?t={t}\n".encode()


def test_metrics_count_one_exchange_per_request(proxy, app):
    t = token()
    labels = {"direction": "inbound", "target_port": str(proxy.inbound)}  # not redirected: the original destination is the proxy

    def count(name: str, **more: str) -> float:
        try:
            return metric_value(proxy.metrics(), name, **labels, **more)
        except KeyError:
            return 0.0

    requests, ok = count("request_total"), count("response_total", status_code="200", classification="success")
    with h2_client(proxy.inbound) as client:
        replies = client.run(*[client.request(b"GET", f"/p/m{i}?t={t}".encode()) for i in range(5)])
    assert [r.status for r in replies] == [200] * 5, client.summary()
    assert count("request_total") - requests == 5
    assert count("response_total", status_code="200", classification="success") - ok == 5


# ---------------------------------------------------------------- failures


@pytest.fixture(scope="module")
def odd_app():
    server = OddApp()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def odd_proxy(odd_app):
    with running_proxy(f"127.0.0.1:{odd_app.port}") as p:
        yield p


def test_refused_connection_gives_502():
    with running_proxy(f"127.0.0.1:{free_port()}") as proxy, h2_client(proxy.inbound) as client:
        (reply,) = client.run(client.request(b"GET", b"/nobody-home"))
        (post,) = client.run(client.request(b"POST", b"/nobody-home", body=b"x" * 100_000))
    for r in (reply, post):
        assert r.status == 502 and r.ended and not r.body
        assert r.get(b"content-length") == b"0"
        assert r.get(b"l5d-orig-proto") == b"HTTP/1.1"
        # Plaintext: the client has no identity, so the proxy tells it nothing more (ref 3.4).
        assert r.get(b"l5d-proxy-error") is None


@contextlib.contextmanager
def module_alone(target: str, client_id: str):
    """``H2ServerConnection`` alone, in a thread of this process, for the inbound
    route an mTLS client with identity ``client_id`` gets: informational headers
    allowed. (tests/fakes/h2_proxy_harness.py gives inbound routes no error labels.)"""
    import asyncio

    from proxy.config import Addr
    from proxy.http.h2 import H2ServerConnection, H2Settings
    from proxy.http.stack import Clients, HttpRoute
    from proxy.metrics.families import ProxyMetrics
    from tests.fakes.h2_proxy_harness import Detect

    host, _, port = target.rpartition(":")
    addr = Addr(host, int(port))
    server_labels = (target, host, port, "", "default", "all-unauthenticated", port)
    labels = ("inbound", None, target, host, port, "true", None, client_id, None, *server_labels[3:], "", "default",
              "default", "", "default", "all-unauthenticated")
    route = HttpRoute("inbound", addr, labels, 1.0, None, True, server_labels, client_id=client_id)
    loop = asyncio.new_event_loop()
    listening: queue.Queue[int] = queue.Queue()

    def serve() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> None:
            metrics, clients = ProxyMetrics(), Clients(None)
            server = await loop.create_server(
                lambda: Detect(lambda: H2ServerConnection(route, metrics, clients, H2Settings())), "127.0.0.1", 0)
            listening.put(server.sockets[0].getsockname()[1])

        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listening.get(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_refused_connection_tells_a_meshed_client_why():
    with module_alone(f"127.0.0.1:{free_port()}", "web.ns.serviceaccount.identity.linkerd.cluster.local") as port, \
            h2_client(port) as client:
        (reply,) = client.run(client.request(b"GET", b"/nobody-home"))
    assert reply.status == 502 and reply.get(b"content-length") == b"0" and not reply.body
    assert (reply.get(b"l5d-proxy-error") or b"").startswith(b"connect to 127.0.0.1:")
    assert reply.get(b"l5d-proxy-connection") == b"close"  # the peer closes its app's connection (ref 3.4)
    assert reply.get(b"l5d-orig-proto") == b"HTTP/1.1"


def test_app_resetting_the_connection_gives_502(odd_proxy):
    with h2_client(odd_proxy.inbound) as client:
        (reply,) = client.run(client.request(b"GET", b"/rst"))
    assert reply.status == 502 and reply.get(b"l5d-orig-proto") == b"HTTP/1.1"


def test_app_dying_mid_body_resets_the_stream(odd_proxy):
    with h2_client(odd_proxy.inbound) as client:
        (reply,) = client.run(client.request(b"GET", b"/cut"))
    assert reply.status == 200 and bytes(reply.body) == b"partial"
    assert reply.reset is not None and not reply.ended


def test_early_response_stops_the_upload(odd_proxy):
    """The app answers before the body is in: the response goes out, and the client
    is asked to stop sending (RST_STREAM NO_ERROR, RFC 9113 8.1) instead of stalling."""
    with h2_client(odd_proxy.inbound) as client:
        sid = client.request(b"POST", b"/early", body=os.urandom(8 * MiB))
        client.wait(lambda: client.replies[sid].reset is not None)
        reply = client.replies[sid]
        assert reply.status == 413 and reply.ended and bytes(reply.body) == b"large"
        assert reply.reset == 0 and client.sent[sid] < 8 * MiB
        (after,) = client.run(client.request(b"GET", b"/rst"))  # the connection still serves streams
    assert after.status == 502


def test_request_body_is_acknowledged_only_as_the_app_takes_it(odd_app, odd_proxy):
    """The app does not read the body: the client's window stays shut once the
    socket buffers are full, instead of the proxy buffering 32 MiB."""
    body = os.urandom(32 * MiB)
    odd_app.release.clear()
    try:
        with h2_client(odd_proxy.inbound) as client:
            sid = client.request(b"POST", b"/slow-reader", body=body)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    client.wait(lambda: False, timeout=0.3)
            stuck_at = client.sent[sid]
            # Kernel buffers take a few MiB on loopback; the proxy itself holds about a window.
            assert stuck_at < 16 * MiB, stuck_at
            odd_app.release.set()
            (reply,) = client.run(sid, timeout=60)
    finally:
        odd_app.release.set()
    assert reply.status == 200 and bytes(reply.body) == hashlib.sha256(body).hexdigest().encode()


# ---------------------------------------------------------------- streams without the mark


@pytest.fixture(scope="module")
def h2_app():
    server = Process(os.path.join(FAKES, "h2_upstream.py"))
    try:
        yield server
    finally:
        server.stop()


def test_streams_without_the_mark_stay_http2(h2_app):
    with running_proxy(f"127.0.0.1:{h2_app.port}") as proxy, h2_client(proxy.inbound) as client:
        plain = client.request(b"GET", b"/headers", orig=None)
        unknown = client.request(b"GET", b"/headers", orig=b"HTTP/3")  # no HTTP/1 version: ignored (and removed)
        client.run(plain, unknown)
    for sid in (plain, unknown):
        reply = client.replies[sid]
        assert reply.status == 200 and reply.get(b"l5d-orig-proto") is None
        head = json.loads(bytes(reply.body))
        names = [name for name, _ in (head if isinstance(head, list) else head.items())]
        assert ":path" in names and "l5d-orig-proto" not in names
