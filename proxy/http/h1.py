"""HTTP/1.1 proxying: a client-facing server connection, upstream connections, pools.

Theory of operation: ``Http1Server`` parses requests (proxy.core.h1) from one
client connection and handles them strictly in order, one ``H1Exchange`` each.
An exchange takes an upstream connection from the endpoint's keep-alive
``H1Pool`` (or dials one), writes the request head, streams the body as it
arrives and streams the response back; nothing is buffered whole. Backpressure
runs both ways with pause_reading/resume_reading: a full write buffer on one
side stops reading on the other.

* Upgrade (websocket) and CONNECT: after a 101 (or a 2xx to CONNECT) both
  sockets are handed to the opaque relay, with the bytes already read.
* Errors before a response head become synthesized responses (ref 3.5) with
  ``l5d-proxy-error``; after a head, the client connection is closed.
* A request with no body whose reused connection died before any response
  byte is sent again once on a fresh connection (users.md A4); nothing else is
  replayed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from proxy.balance.queue import FailFast, LoadShed
from proxy.config import Addr
from proxy.http import errors, orig_proto, upgrade
from proxy.http.stack import Clients, Exchange, HttpRoute
from proxy.log import get_logger
from proxy.native import load
from proxy.tls.local import IdentityMismatch
from proxy.transport.connect import connect
from proxy.transport.relay import TcpSeries

if TYPE_CHECKING:
    from proxy.core.h1 import RequestHead, ResponseHead
    from proxy.http.pool import IdlePool
else:
    IdlePool = load("pool", "proxy.http.pool")[0].IdlePool  # compiled twin unless MESHPROXY_NO_EXTENSIONS=1

log = get_logger("proxy.http.h1")
h1 = load("h1parse", "proxy.core.h1")[0]  # the parser module: compiled twin unless MESHPROXY_NO_EXTENSIONS=1
# Bound once: per request these are one module-global lookup each instead of two.
response_parser = h1.response_parser
forwardable = h1.forwardable
encode_head = h1.encode_head
encode_response_head = h1.encode_response_head
encode_chunk = h1.encode_chunk
take_header = h1.take_header
LAST_CHUNK = h1.LAST_CHUNK

HOLD_LIMIT = 256 * 1024  # request body bytes held while the upstream connects
MAX_RETRY_BODY = 64 * 1024  # bodies up to 64 KiB are kept for a retry (ref 10.2)
MAX_RETRIES = 10  # a bound on one request's attempts; the retry budget is the real limit
STATUS_REASONS = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 431: b"Request Header Fields Too Large",
                  500: b"Internal Server Error", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout"}


def error_response(err: errors.ProxyError, informational: bool, close: bool) -> bytes:
    status, headers = errors.response_headers(err, grpc=False, informational=informational)
    lines = [b"HTTP/1.1 %d %s" % (status, STATUS_REASONS.get(status, b"Error"))]
    lines += [k.encode() + b": " + v.encode("latin-1", "replace") for k, v in headers]
    if close:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


# ------------------------------------------------------------------ upstream side


class H1Pool(IdlePool):
    """Idle keep-alive connections to one endpoint (per worker), for the HTTP/1 proxy."""

    def __init__(self, target: Addr, connect_timeout: float, idle_timeout: float, max_idle: int, pure: bool, max_head: int,
                 identity: str = "", local: Any = None, metrics: Any = None, dst_labels: tuple[Any, ...] | None = None) -> None:
        super().__init__(target, connect_timeout, idle_timeout, max_idle, identity, local, metrics, dst_labels)
        self.pure = pure
        self.max_head = max_head

    async def connect(self) -> UpstreamConnection:
        transport, conn = await connect(lambda: UpstreamConnection(self), self.target, self.connect_timeout, self.identity, self.local)
        if self.metrics is not None and self.dst_labels is not None:
            conn.series = TcpSeries(self.metrics, self.dst_labels)
        return conn


class UpstreamConnection:
    """One connection to the endpoint, serving one exchange at a time."""

    __slots__ = ("pool", "transport", "exchange", "parser", "reused", "got_bytes", "lost", "idle_since", "series")

    def __init__(self, pool: H1Pool) -> None:
        self.pool = pool
        self.transport: Any = None
        self.exchange: H1Exchange | None = None
        self.parser: Any = None
        self.reused = False
        self.got_bytes = False
        self.lost = False
        self.idle_since = 0.0
        self.series: Any = None  # tcp_* metrics of this connection (peer="dst")

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()  # bytes on an idle connection: it is no longer in a known state
            return
        self.got_bytes = True
        if self.series is not None:
            self.series.read.value += len(data)
        server = ex.server
        server.cork()  # head, body and last chunk of one read leave in one write (one syscall)
        try:
            self.parser.feed(data)
        except h1.Switch as switch:
            ex.upstream_switched(switch.remaining)
        except h1.ParseError as exc:
            ex.upstream_failed(errors.IO_ERROR.because(exc.reason))
        finally:
            server.flush()

    def eof_received(self) -> bool:
        ex = self.exchange
        if ex is not None:
            eof = getattr(self.parser, "eof", None)
            if eof is not None:
                try:
                    eof()
                except h1.ParseError:
                    pass
            if self.exchange is ex and not ex.response_done:
                ex.upstream_failed(errors.IO_ERROR.because("connection closed by the server"))
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if self.series is not None:
            self.series.closed("")
            self.series = None
        ex = self.exchange
        if ex is not None and not ex.response_done:
            ex.upstream_failed(errors.IO_ERROR.because(f"connection lost: {exc}" if exc else "connection closed by the server"))

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.server.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.server.resume_reading()

    def close(self) -> None:
        self.exchange = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


# ------------------------------------------------------------------ one request


class H1Exchange:
    """One request and its response. Also the response parser's handler."""

    __slots__ = (
        "server", "head", "metrics", "upstream", "held", "held_size", "request_done", "response_head", "response_done",
        "client_keep_alive", "response_chunked", "connect_task", "timer", "early", "retried", "close_after",
        "required_id", "endpoint", "load_handle", "backend", "retry_body", "retry_size", "retries", "discarding",
        "route_labels", "route_started", "in_flight", "started", "upgraded",
    )

    def __init__(self, server: Http1Server, head: RequestHead) -> None:
        self.server = server
        self.head = head
        self.metrics: Exchange | None = None
        self.upstream: UpstreamConnection | None = None
        self.held: list[bytes] | None = []
        self.held_size = 0
        self.request_done = False
        self.response_head: ResponseHead | None = None
        self.response_done = False
        self.client_keep_alive = head.keep_alive
        self.response_chunked = False
        self.connect_task: asyncio.Task[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.early = b""  # client bytes after an Upgrade/CONNECT head
        self.retried = False
        self.close_after = False
        self.required_id: bytes | None = None
        self.endpoint: Any = None  # the balanced endpoint serving this request, until its load is completed
        self.load_handle = 0.0
        self.backend: Any = None  # the concrete backend (after a traffic split) of a balanced request
        self.retry_body: list[bytes] | None = None  # retryable route: the (framed) body sent so far
        self.retry_size = 0
        self.retries = 0
        self.discarding = False  # the response being read is a failure that will be retried
        self.started = time.monotonic()
        self.route_labels: tuple[str, str, str] | None = None  # (direction, dst, rt_route) of a profile route
        self.route_started = 0.0
        self.in_flight = False
        self.upgraded = False  # the upstream is an HTTP/2 stream to a meshed peer (proxy.http.upgrade)

    # -- request side
    def start(self) -> None:
        server = self.server
        route = server.route
        limit = server.in_flight_limit
        if limit is not None:
            if limit[0] >= limit[1]:
                # Past max-in-flight: shed load at once (503, ref 3.5) rather than queue without bound.
                self.metrics = Exchange(server.metrics, route, False)
                self.fail(errors.LOADSHED.because(f"max in-flight requests ({limit[1]}) reached"))
                return
            limit[0] += 1
            self.in_flight = True
        # A request to forward as read has no l5d-* header (the scanner checked): nothing to take.
        as_read = self.head.forward is not None
        if server.outbound:
            if not as_read:
                self.required_id = self.take_header(b"l5d-require-id")
            logical = route.backend
            if route.ingress is not None:
                logical = self.ingress_backend(route) or logical
            if logical is not None:
                service = logical.service
                profile = service.route_for(self.head.method, self.head.target) if service is not None else None
                if profile is not None:
                    self.route_labels = ("outbound", logical.name, profile.name)
                    m = server.metrics
                    m.route_request_total.labels(*self.route_labels).value += 1
                    m.route_actual_request_total.labels(*self.route_labels).value += 1
                    self.route_started = server.loop.time()
                    if profile.timeout is not None and self.timer is None:
                        self.timer = server.loop.call_later(profile.timeout, self.timed_out)
                    if profile.is_retryable and not self.head.upgrade:
                        self.retry_body = []  # a copy of the body while it stays small enough to replay
                # A logical service: a traffic split picks the backend, P2C over peak-EWMA the endpoint (ref 4, 10.2).
                self.backend = logical.concrete(logical.queue.rng)
                self.dispatch_balanced()
                return
            self.metrics = Exchange(server.metrics, route, False)
            if self.upgradable(route.identity, route.protocol):
                self.dispatch_upgraded(route.target, route.identity, route.dst_labels)
            else:
                self.dispatch(server.pool(), route.identity)
            return
        self.metrics = Exchange(server.metrics, route, False)
        if not route.authorized:
            self.fail(errors.FORBIDDEN.because(f"unauthorized request on server {route.labels[11]}"))
            return
        # ref 3.4: set from the authenticated peer, and never trusted from the client (anti-spoofing).
        if not as_read:
            self.take_header(b"l5d-client-id")
        if route.client_id:
            self.head.headers.append((b"l5d-client-id", route.client_id.encode()))
        self.dispatch(server.pool(), "")

    def ingress_backend(self, route: HttpRoute) -> Any:
        """Ingress mode (ref 3.10): the service named by l5d-dst-override (always stripped: an
        ingress must not become an open relay), else by the Host header; default port 80."""
        override = self.take_header(b"l5d-dst-override")
        name = override
        if name is None:
            for n, v in self.head.headers:
                if n.lower() == b"host":
                    name = v
                    break
        if not name:
            return None
        authority = name.decode("latin-1").strip().lower()
        if ":" not in authority.rsplit("]", 1)[-1]:
            authority += ":80"
        return route.ingress(authority)

    def dispatch_balanced(self) -> None:
        backend = self.backend
        ep = backend.pick_now()
        if ep is None:
            # None ready: wait in the backend's queue until one is, or failfast (ref 3.9).
            if self.metrics is None:
                self.metrics = Exchange(self.server.metrics, self.server.route, False)
            self.connect_task = self.server.loop.create_task(self.wait_for_endpoint(backend))
            return
        self.dispatch_to(ep)

    def dispatch_to(self, ep: Any) -> None:
        """Send this request to one balanced endpoint (counted with that endpoint's labels)."""
        server = self.server
        route = server.route
        local = server.local
        meshed = local is not None and local.creds is not None
        cache = self.backend.labels
        labels = cache.get(ep.addr)
        if labels is None:
            labels = cache[ep.addr] = route.endpoint_labels(ep, self.backend.name, meshed)
        http_labels, dst_labels, identity = labels
        if self.metrics is None:
            self.metrics = Exchange(server.metrics, route, False, http_labels)
        self.endpoint = ep
        self.load_handle = ep.load.start(server.loop.time())
        if self.upgradable(identity, ep.endpoint.protocol):
            self.dispatch_upgraded(ep.addr, identity, dst_labels)
        else:
            self.dispatch(server.pool_for(ep.addr, identity, dst_labels), identity)

    async def wait_for_endpoint(self, backend: Any) -> None:
        try:
            ep = await backend.acquire()
        except FailFast:
            self.connect_task = None
            self.fail(errors.FAILFAST.because(f"no ready endpoints for {backend.name} for {backend.queue.failfast.timeout:g}s"))
            return
        except LoadShed:
            self.connect_task = None
            self.fail(errors.LOADSHED.because(f"queue of {backend.name} is full"))
            return
        self.connect_task = None
        if self.response_done or self.server.lost:
            return
        self.dispatch_to(ep)

    def upgradable(self, identity: str, protocol: str) -> bool:
        """Does this request go to a meshed peer as an HTTP/2 stream (ref 3.3)? Not an
        Upgrade or CONNECT (those need the connection itself), nor to an endpoint that
        discovery says speaks HTTP/1 only or is opaque."""
        return bool(identity) and self.server.h2_upgrade is not None and not self.head.upgrade and protocol not in ("http1", "opaque")

    def identity_allowed(self, identity: str) -> bool:
        required = self.required_id
        if required is not None and required.decode("latin-1") != identity:
            # ref 3.4: the request fails unless the endpoint's TLS identity is the one required.
            self.fail(errors.IDENTITY_REQUIRED.because(
                f"endpoint identity {identity or 'none'!r} is not the required {required.decode('latin-1')!r}"))
            return False
        server = self.server
        if server.response_timeout and self.timer is None:
            self.timer = server.loop.call_later(server.response_timeout, self.timed_out)
        return True

    def dispatch_upgraded(self, addr: Addr, identity: str, dst_labels: Any) -> None:
        """Send the request on the peer's shared HTTP/2 connection, marked l5d-orig-proto."""
        if not self.identity_allowed(identity):
            return
        server = self.server
        route = server.route
        head = self.head
        authority = self.backend.name if self.backend is not None else str(addr)
        fields = orig_proto.upgrade_request(head.method, head.target, head.version, head.headers, authority.encode())
        pool = upgrade.pool_for(server.clients, addr, identity, route.connect_timeout, server.h2_upgrade, server.local,
                                server.metrics, dst_labels)
        stream = upgrade.UpgradedStream(self, pool, fields, head.method)
        self.upgraded = True
        self.discarding = False
        self.upstream = stream  # type: ignore[assignment]
        held, self.held = self.held, None
        for chunk in held or ():
            stream.write(chunk)
        if self.request_done or not (head.chunked or head.content_length):
            stream.end_request()  # no body: HEADERS carry END_STREAM, so the peer knows there is none
        if self.held_size >= HOLD_LIMIT:
            server.resume_reading()
        stream.start()

    def dispatch(self, pool: H1Pool, identity: str) -> None:
        if not self.identity_allowed(identity):
            return
        self.upgraded = False
        server = self.server
        conn = pool.acquire()
        if conn is not None:
            self.attach(conn)
        else:
            self.connect_task = server.loop.create_task(self.connect(pool))

    def load_done(self, rtt: bool) -> None:
        """Complete this request's load on its endpoint; the RTT sample is taken at the first response byte."""
        ep = self.endpoint
        if ep is not None:
            self.endpoint = None
            now = self.server.loop.time()
            ep.load.complete(self.load_handle, now, rtt=(now - self.load_handle) if rtt else None)

    def take_header(self, name: bytes) -> bytes | None:
        """Remove every ``name`` header (lower-case); return the first value."""
        found, self.head.headers = take_header(self.head.headers, name)
        return found

    async def connect(self, pool: H1Pool) -> None:
        try:
            conn = await pool.connect()
        except TimeoutError:
            self.endpoint_failed()
            self.fail(errors.CONNECT_TIMEOUT.because(f"connect to {pool.target} timed out after {pool.connect_timeout:g}s"))
            return
        except IdentityMismatch as exc:
            self.endpoint_failed()
            self.fail(errors.IDENTITY_REQUIRED.because(str(exc)))
            return
        except OSError as exc:
            self.endpoint_failed()
            self.fail(errors.IO_ERROR.because(f"connect to {pool.target}: {exc.strerror or exc}"))
            return
        self.connect_task = None
        if self.response_done or self.server.lost:
            pool.release(conn)
            return
        self.attach(conn)

    def attach(self, conn: UpstreamConnection) -> None:
        self.discarding = False
        self.upstream = conn
        conn.exchange = self
        conn.got_bytes = False
        head = self.head
        # The connection's parser is kept from one response to the next when it can be (no llhttp
        # state, no HEAD/CONNECT/Upgrade framing): one object less to make per request.
        parser = conn.parser
        if parser is None or head.upgrade or not parser.reuse(self, head.method):
            conn.parser = response_parser(self, head.method, self.server.pure, self.server.max_head, head.upgrade, True)
        if head.forward is not None:
            out = [head.forward]  # the request as read: the lines below would write the same bytes
        else:
            out = [encode_head(head.method + b" " + head.target + b" HTTP/1.1", forwardable(head.headers, upgrade=head.upgrade))]
        if self.held:
            out.extend([encode_chunk(c) for c in self.held] if head.chunked else self.held)
        if self.request_done and head.chunked:
            out.append(LAST_CHUNK)
        if self.early:
            out.append(self.early)
            self.early = b""
        self.held = None
        conn.transport.write(b"".join(out))
        if self.held_size >= HOLD_LIMIT:
            self.server.resume_reading()

    def endpoint_failed(self) -> None:
        ep = self.endpoint
        if ep is not None and self.backend is not None:
            self.backend.failed(ep)  # back off from it (ref 1.5)

    def request_body(self, chunk: bytes) -> None:
        # Held and retry copies stay unframed: the upstream (HTTP/1 or an upgraded stream) frames them.
        if self.retry_body is not None:
            self.retry_size += len(chunk)
            if self.retry_size > MAX_RETRY_BODY:
                self.retry_body = None  # too large to replay: this request will not be retried (ref 10.2)
            else:
                self.retry_body.append(chunk)
        if self.held is not None:
            before = self.held_size
            self.held.append(chunk)
            self.held_size += len(chunk)
            if before < HOLD_LIMIT <= self.held_size:
                # Once, as the limit is crossed: one read can hold many chunks, and
                # attach() resumes once (the pause is a counter).
                self.server.pause_reading()
        elif self.upstream is not None and not self.upstream.lost:
            self.upstream.transport.write(encode_chunk(chunk) if self.head.chunked and not self.upgraded else chunk)

    def request_end(self) -> None:
        self.request_done = True
        if self.held is None and self.upstream is not None and not self.upstream.lost:
            if self.upgraded:
                self.upstream.end_request()  # type: ignore[attr-defined]
            elif self.head.chunked:
                self.upstream.transport.write(LAST_CHUNK)

    def client_bytes_after_switch(self, data: bytes) -> None:
        if self.upstream is not None and self.held is None and not self.upstream.lost:
            self.upstream.transport.write(data)
        else:
            self.early += data

    # -- response side (response parser handler)
    def on_head(self, head: ResponseHead) -> None:
        server = self.server
        if 100 <= head.status < 200 and head.status != 101:
            server.write(b"HTTP/1.1 %d %s\r\n\r\n" % (head.status, head.reason or b"Continue"))
            return
        if self.retry_body is not None and head.status >= 500 and self.should_retry():
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.response_head = head
        self.load_done(rtt=True)
        if self.backend is not None and self.backend.budget is not None:
            self.backend.budget.deposit(self.server.loop.time())
        if self.route_labels is not None:
            self.route_done(head.status)
        assert self.metrics is not None
        self.metrics.response_head(head.status)
        switching = head.status == 101 or (self.head.method == b"CONNECT" and 200 <= head.status < 300)
        no_body = self.head.method == b"HEAD" or head.status in (204, 304) or switching
        framed = no_body or head.chunked or head.content_length is not None
        self.response_chunked = head.chunked and not no_body
        keep = self.client_keep_alive and framed and head.keep_alive and not server.draining and not self.head.upgrade
        if keep and head.forward is not None and self.head.version != b"1.0" and not switching:
            server.write(head.forward)  # scanned: the same bytes the lines below would write
            return
        headers = forwardable(head.headers, upgrade=switching)
        if not switching:
            if not keep:
                headers.append((b"Connection", b"close"))
                self.client_keep_alive = False
            elif self.head.version == b"1.0":
                headers.append((b"Connection", b"keep-alive"))
        reason = head.reason or STATUS_REASONS.get(head.status, b"")
        server.write(encode_response_head(head.status, reason, headers))

    def route_done(self, status: int) -> None:
        m = self.server.metrics
        labels, self.route_labels = self.route_labels, None
        assert labels is not None
        code = str(status)
        m.route_response_total.labels(*labels, code, "failure" if status >= 500 else "success").value += 1
        m.route_response_latency_ms.labels(*labels, code).observe((self.server.loop.time() - self.route_started) * 1000.0)

    def log_access(self, status: int) -> None:
        server = self.server
        if server.access_log is None:
            return
        host = agent = b""
        for n, v in self.head.headers:
            low = n.lower()
            if low == b"host":
                host = v
            elif low == b"user-agent":
                agent = v
        server.access_log.record(server.client_addr, server.route.client_id, self.head.method, self.head.target,
                                 self.head.version, status, host, agent, self.started)

    def release_in_flight(self) -> None:
        limit = self.server.in_flight_limit
        if self.in_flight and limit is not None:
            self.in_flight = False
            limit[0] -= 1

    def should_retry(self) -> bool:
        """A failure on a retryable route: send the request again if the budget allows (ref 10.2)."""
        budget = self.backend.budget if self.backend is not None else None
        now = self.server.loop.time()
        if not self.request_done or self.retries >= MAX_RETRIES or budget is None:
            return False
        if not budget.try_withdraw(now):
            if self.route_labels is not None:
                self.server.metrics.route_retryable_total.labels(*self.route_labels, "no_budget").value += 1
            return False
        if self.route_labels is not None:
            m = self.server.metrics
            m.route_retryable_total.labels(*self.route_labels, "").value += 1
            m.route_actual_request_total.labels(*self.route_labels).value += 1
        conn = self.upstream
        if conn is not None:
            conn.exchange = None
            conn.close()  # the failed response's body is not wanted: this connection cannot be reused
            self.upstream = None
        self.discarding = True
        self.load_done(rtt=True)
        self.retries += 1
        self.held = list(self.retry_body or ())
        self.held_size = self.retry_size
        # Next loop iteration: the failed response's parser is still delivering this read.
        self.server.loop.call_soon(self.redispatch)
        return True

    def redispatch(self) -> None:
        if not self.response_done and not self.server.lost:
            self.dispatch_balanced()

    def on_body(self, chunk: bytes) -> None:
        if self.discarding:
            return
        self.server.write(encode_chunk(chunk) if self.response_chunked else chunk)

    def on_end(self) -> None:
        if self.discarding:
            return
        if self.response_head is None:
            return  # the end of an informational response
        if self.response_chunked:
            self.server.write(LAST_CHUNK)
        self.response_done = True
        assert self.metrics is not None
        self.metrics.end()
        conn = self.upstream
        self.upstream = None
        if conn is not None:
            if self.upgraded:
                conn.close()  # the stream ends here (cancelled if the client is still sending)
            elif self.request_done and self.response_head.keep_alive and not conn.lost:
                conn.exchange = None  # idle: bytes arriving now close it (data_received)
                conn.pool.release(conn)
            else:
                conn.close()
        if not self.request_done:
            self.client_keep_alive = False  # the rest of the request body cannot be skipped safely
        self.server.exchange_done(self)

    # -- switching protocols
    def upstream_switched(self, remaining: bytes) -> None:
        """101 (or 2xx to CONNECT): from now on both sockets are an opaque relay."""
        conn = self.upstream
        assert conn is not None and self.metrics is not None
        self.response_done = True
        self.metrics.end()
        conn.exchange = None
        self.upstream = None
        self.server.switch_to_relay(conn.transport, remaining, self.early)

    # -- failures
    def upstream_failed(self, err: errors.ProxyError) -> None:
        conn = self.upstream
        if (
            conn is not None and conn.reused and not conn.got_bytes and not self.retried and self.request_done
            and not self.head.chunked and not self.head.content_length and self.response_head is None
        ):
            # A reused keep-alive connection died before answering a bodiless request: send it once more.
            self.retried = True
            conn.exchange = None
            conn.close()
            self.upstream = None
            self.held = []
            self.connect_task = self.server.loop.create_task(self.connect(conn.pool))
            return
        if conn is not None:
            conn.exchange = None
            conn.close()
            self.upstream = None
        self.fail(err)

    def timed_out(self) -> None:
        self.timer = None
        if self.response_head is None and not self.response_done:
            if self.connect_task is not None:
                self.connect_task.cancel()
            conn = self.upstream
            if conn is not None:
                conn.exchange = None
                conn.close()
                self.upstream = None
            self.fail(errors.RESPONSE_TIMEOUT.because(f"response timeout after {self.server.route.response_timeout:g}s"))

    def fail(self, err: errors.ProxyError) -> None:
        if self.response_done:
            return
        self.response_done = True
        self.load_done(rtt=False)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert self.metrics is not None
        server = self.server
        if self.route_labels is not None:
            self.route_done(err.status)
        if self.response_head is None:
            self.metrics.response_head(err.status)
            self.metrics.proxy_error(err)
            self.metrics.end(None, "" if err.status < 500 else err.metric)
            log.info("proxy error", status=err.status, reason=err.message, target=str(server.route.target))
            if err.fatal or not self.request_done:
                self.client_keep_alive = False
            server.write(error_response(err, server.route.informational_headers, close=not self.client_keep_alive))
        else:
            # Too late for an error response: the head is out. Closing tells the client the body is cut.
            self.metrics.end(None, err.metric)
            self.client_keep_alive = False
        server.exchange_done(self)

    def abandon(self) -> None:
        """The client went away."""
        self.release_in_flight()
        self.load_done(rtt=False)
        if self.timer is not None:
            self.timer.cancel()
        if self.connect_task is not None:
            self.connect_task.cancel()
        conn = self.upstream
        if conn is not None:
            conn.close()
            self.upstream = None
        if not self.response_done and self.metrics is not None:
            self.response_done = True
            self.metrics.end(None, "unexpected" if self.response_head is None else "i/o")


# ------------------------------------------------------------------ client side


class Http1Server:
    """One client connection speaking HTTP/1.x."""

    def __init__(self, route: HttpRoute, metrics: Any, clients: Clients, pure: bool, max_head: int, pool_idle: float,
                 max_idle: int, live: set[Any], relay_factory: Any, src: Any = None, local: Any = None,
                 in_flight_limit: list[int] | None = None) -> None:
        self.local = local
        self.in_flight_limit = in_flight_limit  # [requests in flight, max] shared by the direction's connections
        self.access_log: Any = None  # inbound: an access_log.AccessLog when LINKERD2_PROXY_ACCESS_LOG is set
        self.client_addr = ""
        self.route = route
        self.src = src  # server-side TCP series of this connection (tcp_* metrics)
        self.metrics = metrics
        self.clients = clients
        self.pure = pure
        self.max_head = max_head
        self.pool_idle = pool_idle
        self.max_idle = max_idle
        self.live = live
        self.relay_factory = relay_factory  # (client transport, upstream transport, to_upstream, to_client) -> None
        self.loop = asyncio.get_running_loop()
        self.parser = h1.request_parser(self, pure, max_head)
        self.transport: Any = None
        self.queue: list[H1Exchange] = []
        self.switched = False  # the parser stopped at an Upgrade/CONNECT head
        self.paused = 0
        self.lost = False
        self.draining = False
        self.pending_error: errors.ProxyError | None = None
        self.corked: list[bytes] | None = None
        self.route_pool: H1Pool | None = None  # the route's pool, kept: the route is fixed per connection
        self.h2_upgrade: Any = None  # outbound with an identity: H2Settings of upgraded connections to meshed peers
        # The route is fixed for the connection: what every request asks of it, read once.
        self.outbound = route.direction == "outbound"
        self.response_timeout = route.response_timeout
        live.add(self)

    def pool_for(self, addr: Addr, identity: str, dst_labels: Any) -> H1Pool:
        route = self.route
        return self.clients.get("h1:" + identity, addr, lambda: H1Pool(
            addr, route.connect_timeout, self.pool_idle, self.max_idle, self.pure, self.max_head, identity, self.local,
            self.metrics, dst_labels))

    def pool(self) -> H1Pool:
        pool = self.route_pool
        if pool is None or pool.closed:  # a closed pool is replaced in Clients: look it up again
            pool = self.route_pool = self.route_pool_lookup()
        return pool

    def route_pool_lookup(self) -> H1Pool:
        route = self.route
        return self.clients.get("h1:" + route.identity, route.target, lambda: H1Pool(
            route.target, route.connect_timeout, self.pool_idle, self.max_idle, self.pure, self.max_head, route.identity, self.local,
            self.metrics, route.dst_labels))

    # -- asyncio protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.access_log is not None:
            peer = transport.get_extra_info("peername")
            self.client_addr = f"{peer[0]}:{peer[1]}" if peer else "-"

    def data_received(self, data: bytes) -> None:
        if self.src is not None:
            self.src.read.value += len(data)
        if self.switched:
            if self.queue and self.parser is not None:
                self.queue[-1].client_bytes_after_switch(data)
            return
        try:
            self.parser.feed(data)
        except h1.Switch as switch:
            self.switched = True
            if self.queue:
                self.queue[-1].client_bytes_after_switch(switch.remaining)
        except h1.ParseError as exc:
            err = (errors.HEADERS_TOO_LARGE if exc.status == 431 else errors.BAD_REQUEST).because(exc.reason)
            self.reject(err)

    def eof_received(self) -> bool:
        # The client left (HTTP/1 has no half-close): drop what it asked for, as Linkerd's
        # server does, rather than keep an upstream request, and the drain, waiting for it.
        return False  # connection_lost follows and abandons the exchanges in flight

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        for ex in self.queue:
            ex.abandon()
        self.queue.clear()
        self.live.discard(self)
        if self.src is not None:
            self.src.closed("")

    def pause_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None:
            self.queue[0].upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.queue and self.queue[0].upstream is not None and not self.queue[0].upstream.lost:
            self.queue[0].upstream.transport.resume_reading()

    # -- request parser handler
    def on_head(self, head: RequestHead) -> None:
        ex = H1Exchange(self, head)
        self.queue.append(ex)
        if len(self.queue) == 1:
            ex.start()
        else:
            self.pause_reading()  # pipelined: one request at a time, the next waits (bounded)

    def on_body(self, chunk: bytes) -> None:
        if self.queue:  # empty when the request already failed (e.g. l5d-require-id)
            self.queue[-1].request_body(chunk)

    def on_end(self) -> None:
        if self.queue:
            self.queue[-1].request_end()

    # -- used by exchanges
    def write(self, data: bytes) -> None:
        if self.corked is not None:
            self.corked.append(data)
            return
        if not self.lost:
            self.transport.write(data)
            if self.src is not None:
                self.src.write.value += len(data)

    def cork(self) -> None:
        if self.corked is None:
            self.corked = []

    def flush(self) -> None:
        out, self.corked = self.corked, None
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))

    def pause_reading(self) -> None:
        self.paused += 1
        if self.paused == 1 and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused:
            self.paused -= 1
            if self.paused == 0 and not self.lost:
                self.transport.resume_reading()

    def exchange_done(self, ex: H1Exchange) -> None:
        ex.release_in_flight()
        if self.access_log is not None:
            ex.log_access(ex.response_head.status if ex.response_head is not None else (ex.metrics.status if ex.metrics else 0) or 0)
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        if not ex.client_keep_alive or self.draining or self.switched:
            self.close()
            return
        if self.queue:
            self.resume_reading()
            self.queue[0].start()
        elif self.pending_error is not None:
            self.reject(self.pending_error)

    def reject(self, err: errors.ProxyError) -> None:
        """A malformed request: answer it (400 / 431, reason in l5d-proxy-error) and close."""
        self.parser = None
        self.switched = True  # nothing more is parsed from this connection
        if self.queue and not self.queue[-1].request_done:
            # The request in flight is the malformed one (e.g. a bad chunk size): fail it now.
            ex = self.queue[-1]
            ex.client_keep_alive = False
            if ex.upstream is not None:
                ex.upstream.close()
                ex.upstream = None
            if ex.connect_task is not None:
                ex.connect_task.cancel()
            ex.fail(err)
            return
        if self.queue:
            self.pending_error = err  # answer once the requests before it are done
            self.transport.pause_reading()
            return
        family = self.metrics.inbound_http_errors_total if self.route.direction == "inbound" else self.metrics.outbound_http_errors_total
        family.labels(err.metric, *self.route.error_labels).value += 1
        log.info("malformed request", status=err.status, reason=err.message)
        self.write(error_response(err, True, close=True))
        self.close()

    def switch_to_relay(self, upstream_transport: Any, to_client: bytes, to_upstream: bytes) -> None:
        self.queue.clear()
        self.live.discard(self)
        self.flush()
        src, self.src = self.src, None  # the relay owns the connection's metrics from here
        self.relay_factory(self.transport, upstream_transport, to_upstream, to_client, src)

    def close(self) -> None:
        self.flush()
        if not self.lost and not self.transport.is_closing():
            self.transport.close()

    def shutdown(self) -> None:
        """Drain: close now if idle, else after the response in flight."""
        self.draining = True
        if not self.queue:
            self.close()
