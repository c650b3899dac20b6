"""HTTP/1 carried over HTTP/2 to a meshed peer: the outbound orig-proto upgrade (ref 3.3, client side).

Theory of operation
-------------------
Between meshed proxies Linkerd sends an app's HTTP/1 requests as HTTP/2 streams
marked ``l5d-orig-proto``: many requests share one mTLS connection per peer
instead of one connection per request in flight, and the peer's inbound proxy
turns each stream back into an HTTP/1 request (proxy.http.orig_proto, inbound).

``UpgradedStream`` is both sides of that translation for one request:

* to the HTTP/1 exchange (proxy.http.h1.H1Exchange) it is the upstream: body
  bytes go in through ``transport.write`` (unframed), the request ends with
  ``end_request``, and ``pause_reading``/``resume_reading`` say whether the
  client can take more of the response;
* to the endpoint's HTTP/2 connection pool (proxy.http.h2.H2Pool) it is a
  stream: it is opened, receives the response head, DATA and the end, or
  is reset or lost, exactly like a forwarded HTTP/2 stream.

Flow control runs both ways: request bytes the peer's window does not admit
yet stay in the stream's ``_Flow`` and, past ``BODY_HIGH``, the client is not
read; response DATA is acknowledged to the peer only once written to a client
transport that is not paused. The response is re-framed by the exchange: by
its ``content-length``, else chunked.
"""

from __future__ import annotations

from typing import Any

from proxy.http import errors, orig_proto
from proxy.http.h2 import _CANCEL, H2Pool, H2Settings, _Flow, h2_error_label

# Request body held for want of HTTP/2 window before the client is paused
# (one default stream window): memory per upgraded request stays bounded.
BODY_HIGH = 65536
BODY_LOW = BODY_HIGH // 2


def pool_for(clients: Any, addr: Any, identity: str, connect_timeout: float, settings: H2Settings, local: Any,
             metrics: Any, dst_labels: Any) -> H2Pool:
    """The shared HTTP/2 connection (per worker) to one meshed endpoint."""
    return clients.get("h2-upgrade:" + identity, addr, lambda: H2Pool(
        addr, connect_timeout, settings, identity, local, metrics, dst_labels))


class UpgradedStream:
    """One HTTP/1 exchange's request as an HTTP/2 stream (see the module doc)."""

    __slots__ = ("exchange", "server", "pool", "headers", "method", "request", "up", "up_sid", "unsent", "client_paused",
                 "acks_paused", "acks_held", "response_ended", "done", "lost", "reused", "got_bytes")

    def __init__(self, exchange: Any, pool: H2Pool, headers: list[tuple[bytes, bytes]], method: bytes) -> None:
        self.exchange = exchange
        self.server = exchange.server  # the client connection: paused while the peer's window is shut
        self.pool = pool
        self.headers: list[tuple[bytes, bytes]] | None = headers  # the HTTP/2 request head, until sent
        self.method = method
        self.request = _Flow(self, self, 0)  # type: ignore[arg-type]  # its source is this stream: see ack()
        self.up: Any = None
        self.up_sid = 0
        self.unsent = 0  # request bytes taken from the client, not yet sent to the peer
        self.client_paused = False
        self.acks_paused = False  # the client's transport is full: hold the peer's window
        self.acks_held = 0
        self.response_ended = False
        self.done = False
        # What H1Exchange reads of any upstream: never lost under it, never a reused
        # keep-alive connection (no silent replay), bytes seen for the current response.
        self.lost = False
        self.reused = False
        self.got_bytes = False

    def start(self) -> None:
        self.pool.submit(self)  # type: ignore[arg-type]  # the stream protocol H2Pool expects

    # -- the exchange's side (HTTP/1 client)
    @property
    def transport(self) -> UpgradedStream:
        return self

    @property
    def response(self) -> UpgradedStream:
        return self  # H2ClientConnection hands response DATA to ``stream.response``

    def write(self, data: bytes) -> None:
        """Request body bytes from the client, without HTTP/1 framing."""
        if self.done or not data:
            return
        self.unsent += len(data)
        self.request.received(data, len(data), False)
        if self.unsent >= BODY_HIGH and not self.client_paused:
            self.client_paused = True
            self.server.pause_reading()

    def end_request(self) -> None:
        if not self.done:
            self.request.end()

    def is_closing(self) -> bool:
        return self.done

    def pause_reading(self) -> None:
        self.acks_paused = True

    def resume_reading(self) -> None:
        self.acks_paused = False
        held, self.acks_held = self.acks_held, 0
        if held and self.up is not None:
            self.up.ack(self.up_sid, held)

    def close(self) -> None:
        """The exchange is done with this stream: cancel it unless both directions ended."""
        self.exchange = None
        self._finish(reset=not (self.response_ended and self.request.finished))

    # -- the request flow's source (what _Flow calls when it sent our bytes)
    def ack(self, _sid: int, size: int) -> None:
        self.unsent -= size
        if self.client_paused and self.unsent < BODY_LOW:
            self.client_paused = False
            self.server.resume_reading()

    # -- the HTTP/2 side (H2Pool / H2ClientConnection)
    def opened(self, up: Any, up_sid: int, ended: bool) -> None:
        self.up = up
        self.up_sid = up_sid
        self.headers = None
        request = self.request
        request.dst = up
        request.dst_sid = up_sid
        if ended:
            request.finished = True
        else:
            request.pump()

    def response_head(self, headers: list[Any], ended: bool) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        self.got_bytes = True
        head = orig_proto.upgraded_response(headers, ended, self.method)
        server = exchange.server
        server.cork()  # the head and the body leave in one write
        try:
            exchange.on_head(head)
            if ended and self.exchange is exchange:
                self.response_ended = True
                exchange.on_end()
        finally:
            if ended or self.exchange is not exchange:
                server.flush()
            else:
                # The body's DATA usually follows in the same read: end() sends the lot, or
                # the next loop turn sends what came (one client write, not one per frame).
                server.loop.call_soon(server.flush)

    def informational(self, headers: list[Any]) -> None:
        if self.exchange is not None:
            self.exchange.on_head(orig_proto.upgraded_response(headers, False, self.method))

    def received(self, data: bytes, flow_len: int, ended: bool) -> None:
        """Response DATA (as ``stream.response``)."""
        exchange = self.exchange
        if exchange is None:
            return
        if data:
            exchange.on_body(data)
        if ended:
            self.end()
        elif flow_len and self.up is not None:
            if self.acks_paused:
                self.acks_held += flow_len
            else:
                self.up.ack(self.up_sid, flow_len)

    def end(self, trailers: list[Any] | None = None) -> None:
        """The response ended (trailers have no HTTP/1 form here and are dropped)."""
        exchange = self.exchange
        if exchange is not None and not self.response_ended:
            self.response_ended = True
            server = exchange.server
            exchange.on_end()
            server.flush()

    def trailers(self, headers: list[Any]) -> None:
        self.end()

    def upstream_reset(self, code: int) -> None:
        self._failed(f"HTTP/2 stream reset by {self.pool.target}: {h2_error_label(code)}", reset=False)

    def upstream_lost(self) -> None:
        self._failed(f"HTTP/2 connection to {self.pool.target} lost", reset=False)

    def refused(self) -> None:
        self._failed(f"{self.pool.target} refused the stream (GOAWAY)", reset=False)

    def abort(self, client_code: int | None, error: str, upstream_code: int | None = _CANCEL) -> None:
        self._failed(f"HTTP/2 stream to {self.pool.target} failed: {error}", reset=upstream_code is not None)

    def fail(self, err: errors.ProxyError) -> None:
        """The pool could not dial the endpoint."""
        exchange = self.exchange
        self._finish(reset=False)
        if exchange is not None and exchange.upstream is self:
            exchange.upstream = None
            exchange.endpoint_failed()
            exchange.fail(err)

    def flow_finished(self, flow: Any) -> None:
        pass  # the request is all sent; the stream lives on until the response ends

    # -- endings
    def _failed(self, reason: str, reset: bool) -> None:
        exchange = self.exchange
        self._finish(reset)
        if exchange is not None and exchange.upstream is self:
            exchange.upstream_failed(errors.IO_ERROR.because(reason))

    def _finish(self, reset: bool) -> None:
        if self.done:
            return
        self.done = True
        self.exchange = None
        if self.client_paused:
            self.client_paused = False
            self.server.resume_reading()
        self.pool.cancel(self)  # type: ignore[arg-type]
        self.request.drop()
        up, self.up = self.up, None
        if up is not None and up.streams.pop(self.up_sid, None) is not None:
            up.blocked.pop(self.up_sid, None)
            if reset:
                up.reset(self.up_sid, _CANCEL)
            up.stream_closed()
