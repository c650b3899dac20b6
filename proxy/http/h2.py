"""HTTP/2 proxying: client streams in, one shared upstream connection out.

Theory of operation
-------------------
Both sides speak HTTP/2 with prior knowledge: the detection stage has already
seen the client's preface, and upstreams are dialled in cleartext (or mTLS
when the route names the endpoint's identity). ``proxy/http/h2core.py`` is
the protocol core (bytes in, events out; HPACK in proxy/core/hpack.py, both
compiled as Cython twins); this module is the asyncio glue around it. It
replaced the ``h2`` library here, which spent over 400 µs of CPU per proxied
request in its frame objects, state machines and pure-Python HPACK.

* ``H2ServerConnection``: the protocol of one accepted client connection.
* ``H2Pool``: the upstream side of one endpoint in one worker, kept in the
  worker's ``Clients``. It holds ONE ``H2ClientConnection`` that every client
  connection multiplexes onto, and dials a new one when that one dies or
  receives GOAWAY. Streams that arrive while it dials wait in the pool.
* ``_Stream`` pairs a client stream with its upstream stream. Each direction
  is a ``_Flow``: the DATA received from one side, not yet sent to the other.

Flow control, end to end. A flow sends DATA only as far as the destination's
window allows (stream and connection, ``local_flow_control_window``). Received
DATA is acknowledged to its sender *per stream* only once it has been handed
to the other side (``acknowledge_received_data``), so a stream whose reader
stops stalls only its own writer, and what a stream holds is bounded by its
receive window. The *connection* window is reopened as soon as bytes arrive:
they already count against a stream window, and holding the connection window
as well would let one stalled stream block every other stream. A flow that
finds no window parks itself in the destination's ``blocked`` map until a
WINDOW_UPDATE (or SETTINGS, or ``resume_writing``) wakes it: no task, no timer.

Writes. The core queues the bytes of every frame it makes; each side hands them to
its transport once per batch of events (``_flush``), so the frames made while
handling one read cost one ``write``.

Errors (ref 3.5). A failed dial answers 502 (504 on timeout), as does an
upstream connection lost before the response head; no response head within
``route.response_timeout`` answers 504. gRPC requests get HTTP 200 with
``grpc-status`` instead (trailers-only). Resets cross the proxy with their
error code; a stream above an upstream GOAWAY's last id is refused
(REFUSED_STREAM). Every request is one ``Exchange`` (metrics, ref 7.1).

HTTP/1 behind HTTP/2 (ref 3.3). Inbound, a stream marked ``l5d-orig-proto``
(a peer proxy carrying its app's HTTP/1 request) is not forwarded as HTTP/2:
``_Http1Stream`` sends it to the app as HTTP/1.1 over a keep-alive connection
(proxy/http/orig_proto.py) and answers on the stream with the mark set. Client
DATA is acknowledged as the app connection takes it; the app's socket is not
read while the response waits for HTTP/2 window. Errors are synthesized as
for HTTP/1 (502 and ``l5d-proxy-error``, never gRPC-style).

GOAWAY. RFC 9113 6.8 lets the streams up to ``last_stream_id`` finish, which
both a drain and an upstream that restarts need, so a received GOAWAY is
reported without closing anything, and a drain writes its own GOAWAY frames
(hyper's two-step drain: GOAWAY with the largest id, a PING, then GOAWAY with
the real last stream id).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.balance.queue import FailFast as FailFastError
from proxy.balance.queue import LoadShed as LoadShedError
from proxy.config import Addr
from proxy.http import orig_proto
from proxy.http.errors import (
    CONNECT_TIMEOUT,
    FAILFAST,
    FORBIDDEN,
    IDENTITY_REQUIRED,
    IO_ERROR,
    LOADSHED,
    RESPONSE_TIMEOUT,
    ProxyError,
    is_grpc,
    response_headers,
)
from proxy.http.stack import Clients, Exchange, HttpRoute
from proxy.log import get_logger
from proxy.native import load
from proxy.tls.local import IdentityMismatch
from proxy.transport.connect import connect
from proxy.transport.relay import TcpSeries

log = get_logger("proxy.http.h2")

# The HTTP/2 protocol core (proxy/http/h2core.py), compiled when built.
h2core, H2CORE_KIND = load("h2core", "proxy.http.h2core")
if TYPE_CHECKING:
    from proxy.http.h2core import (
        ConnectionTerminated,
        DataReceived,
        InformationalResponseReceived,
        PingAckReceived,
        RemoteSettingsChanged,
        RequestReceived,
        ResponseReceived,
        StreamReset,
        TrailersReceived,
        WindowUpdated,
    )
else:
    ConnectionTerminated = h2core.ConnectionTerminated
    DataReceived = h2core.DataReceived
    InformationalResponseReceived = h2core.InformationalResponseReceived
    PingAckReceived = h2core.PingAckReceived
    RemoteSettingsChanged = h2core.RemoteSettingsChanged
    RequestReceived = h2core.RequestReceived
    ResponseReceived = h2core.ResponseReceived
    StreamReset = h2core.StreamReset
    TrailersReceived = h2core.TrailersReceived
    WindowUpdated = h2core.WindowUpdated
ProtocolError = h2core.ProtocolError
NoAvailableStreamIDError = h2core.NoAvailableStreamIDError
TooManyStreamsError = h2core.TooManyStreamsError

# RFC 9113 6.9.2: every window starts at 65,535 bytes, and SETTINGS cannot
# change the connection window (only WINDOW_UPDATE can).
DEFAULT_WINDOW = 65535
# RFC 9113 5.1.1: stream ids are 31 bits; GOAWAY with the largest one says
# "stopping soon" without refusing anything yet (first step of a drain).
MAX_STREAM_ID = 2**31 - 1
# The second GOAWAY of a drain waits for a PING round trip, so streams the
# client opened before it saw the first one are still served (hyper does the
# same); a client that never answers the PING gets it after 1 s.
DRAIN_PING = b"meshdrn0"
DRAIN_PING_TIMEOUT = 1.0
KEEPALIVE_PING = b"meshkal0"
# An idle multiplexed upstream connection costs one socket; closing it after a
# minute lets endpoints that left discovery go, and is longer than any
# keep-alive a client of ours would notice.
UPSTREAM_IDLE_TIMEOUT = 60.0

# Connection-specific fields (RFC 9113 8.2.2) never cross the proxy.
_CONNECTION_HEADERS = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"http2-settings")
)
# Inbound, ``l5d-client-id`` is set by the proxy alone (ref 3.4): a client's own
# is removed, so a peer without an identity cannot claim one.
_CLIENT_ID = b"l5d-client-id"
_INBOUND_DROPPED = _CONNECTION_HEADERS | {_CLIENT_ID}
_TE = b"te"
_TRAILERS = b"trailers"
_CONTENT_TYPE = b"content-type"
_STATUS = b":status"
_GRPC_STATUS = b"grpc-status"
# Tells a peer proxy to close its app's HTTP/1 connection after a fatal error (ref 3.4).
_PROXY_CONNECTION = orig_proto.PROXY_CONNECTION

_NO_ERROR: int = h2core.NO_ERROR
_CANCEL: int = h2core.CANCEL
_REFUSED_STREAM: int = h2core.REFUSED_STREAM
_PROTOCOL_ERROR: int = h2core.PROTOCOL_ERROR
_INTERNAL_ERROR: int = h2core.INTERNAL_ERROR

# Heads already filtered, by header tuple: the core hands out one shared tuple
# for every repeat of a header block, so a client or server repeating its head
# is filtered once. Keys are ids; each entry holds its tuple, so the id cannot
# be reused while the entry lives. Cleared whole when full.
_MEMO_SIZE = 64
_RESPONSE_MEMO: dict[int, tuple[Any, ...]] = {}  # id -> (fields, kept, status, has grpc-status, its value)


def h2_error_label(code: int) -> str:
    """The ``error`` label Linkerd gives a reset stream: ``h2(CANCEL)`` (ref 7.1)."""
    name = h2core.ERROR_NAMES.get(code)
    return f"h2({name or int(code)})"


def _forwardable(headers: Any) -> list[Any]:
    return [h for h in headers if h[0] not in _CONNECTION_HEADERS and (h[0] != _TE or h[1] == _TRAILERS)]


def _grpc_status(headers: Any) -> int | None:
    for name, value in headers:
        if name == _GRPC_STATUS:
            try:
                return int(value)
            except ValueError:
                return None
    return None


@dataclass(frozen=True, slots=True)
class H2Settings:
    """HTTP/2 settings of one direction. ``None`` leaves the h2 library's default."""

    max_concurrent_streams: int | None = None
    max_frame_size: int | None = None
    max_header_list_size: int | None = None
    initial_stream_window: int | None = None
    initial_connection_window: int | None = None
    keep_alive_interval: float | None = None
    keep_alive_timeout: float | None = None
    # Accepted for compatibility with linkerd's variables; see the notes on
    # H2ServerConnection for why they need no mechanism here.
    max_pending_accept_reset_streams: int | None = None
    max_send_buf_size: int | None = None
    adaptive_flow_control: bool | None = None
    # Windows the proxy advertises to upstreams (ref 1.5).
    client_stream_window: int = DEFAULT_WINDOW
    client_connection_window: int = 1048576

    @classmethod
    def from_config(cls, config: Any, direction: str) -> H2Settings:
        """``direction`` is "inbound" or "outbound": which ``*_server_http2_*`` fields apply."""
        prefix = f"{direction}_server_http2_"

        def get(name: str) -> Any:
            return getattr(config, prefix + name, None)

        return cls(
            max_concurrent_streams=get("max_concurrent_streams"),
            max_frame_size=get("max_frame_size"),
            max_header_list_size=get("max_header_list_size"),
            initial_stream_window=get("initial_stream_window_size"),
            initial_connection_window=get("initial_connection_window_size"),
            keep_alive_interval=get("keep_alive_interval"),
            keep_alive_timeout=get("keep_alive_timeout"),
            max_pending_accept_reset_streams=get("max_pending_accept_reset_streams"),
            max_send_buf_size=get("max_send_buf_size"),
            adaptive_flow_control=get("adaptive_flow_control"),
            client_stream_window=getattr(config, "http2_initial_stream_window", DEFAULT_WINDOW),
            client_connection_window=getattr(config, "http2_initial_connection_window", 1048576),
        )

    def server_settings(self) -> dict[int, int]:
        wanted: dict[int, int | None] = {
            h2core.MAX_CONCURRENT_STREAMS: self.max_concurrent_streams,
            h2core.MAX_FRAME_SIZE: self.max_frame_size,
            h2core.MAX_HEADER_LIST_SIZE: self.max_header_list_size,
            h2core.INITIAL_WINDOW_SIZE: self.initial_stream_window,
        }
        return {code: value for code, value in wanted.items() if value is not None}


def _goaway(last_stream_id: int, error_code: int = 0) -> bytes:
    return h2core.goaway_frame(last_stream_id, error_code)


# ---------------------------------------------------------------- both sides


class _Side(asyncio.Protocol):
    """What a client-facing and an upstream connection share: the h2 state,
    the transport, batched writes, the blocked flows and the connection window."""

    handlers: dict[type, Any] = {}

    def __init__(self, conn_window: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.h2: Any = None  # h2core.Connection, made in connection_made
        self.transport: Any = None
        self.streams: dict[int, _Stream] = {}
        self.blocked: dict[int, _Flow] = {}  # stream id here -> flow waiting for window or writability
        self.write_paused = False
        self.flush_pending = False
        self.receiving = False  # inside data_received: it flushes at its end
        self.closed = False
        self.conn_window = max(conn_window, DEFAULT_WINDOW)
        self.conn_window_half = self.conn_window // 2
        self.series: Any = None  # TcpSeries of this connection: its byte counts (tcp_*_bytes_total)

    # -- writes
    def want_flush(self) -> None:
        if not self.receiving and not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
            if self.series is not None:
                self.series.write.value += len(data)

    def _open_connection_window(self) -> None:
        if self.conn_window > DEFAULT_WINDOW:
            self.h2.increment_flow_control_window(self.conn_window - DEFAULT_WINDOW)

    # -- asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        if self.series is not None:
            self.series.read.value += len(data)
        self.receiving = True
        try:
            try:
                events = h2.receive_data(data)
            except ProtocolError:
                # h2 has queued a GOAWAY with the reason: send it and stop.
                self._flush()
                self.transport.close()
                return
            handlers = self.handlers
            for event in events:
                handler = handlers.get(type(event))
                if handler is not None:
                    handler(self, event)
            # Reopen the connection window for what arrived (see the module doc).
            if not self.transport.is_closing():
                deficit = self.conn_window - h2.inbound_flow_control_window
                if deficit >= self.conn_window_half:
                    h2.increment_flow_control_window(deficit)
        finally:
            self.receiving = False
        self._flush()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_all()

    # -- flows
    def ack(self, stream_id: int, size: int) -> None:
        """``size`` bytes received on ``stream_id`` were passed on: let the peer send more."""
        self.h2.acknowledge_received_data(size, stream_id)
        self.want_flush()

    def reset(self, stream_id: int, code: int) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except ProtocolError:  # already closed: nothing to reset
            return
        self.want_flush()

    def _wake_all(self) -> None:
        blocked = self.blocked
        if blocked:
            self.blocked = {}
            for flow in blocked.values():
                flow.pump()

    def _on_window(self, event: WindowUpdated) -> None:
        if event.stream_id == 0:
            self._wake_all()
        else:
            flow = self.blocked.pop(event.stream_id, None)
            if flow is not None:
                flow.pump()

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        # A new INITIAL_WINDOW_SIZE or MAX_FRAME_SIZE can let blocked flows go on.
        self._wake_all()


# ---------------------------------------------------------------- streams


class _Gone:
    """What a finished stream's flows (and body) point to instead of the stream.

    A stream and its flows point at each other; a cycle is freed only by the
    garbage collector, and one cycle per request made the collector a tenth of
    the proxy's CPU. Pointing them here once the stream is over frees all of
    them at once, and a late call lands on no-ops."""

    __slots__ = ()
    done = True
    conn = None

    def abort(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def flow_finished(self, _flow: Any) -> None:
        pass


_GONE: Any = _Gone()


class _Flow:
    """One direction of a stream: DATA from ``src`` not yet sent to ``dst``."""

    __slots__ = ("stream", "src", "src_sid", "dst", "dst_sid", "chunks", "ended", "trailers", "finished")

    def __init__(self, stream: _Stream, src: _Side | None, src_sid: int) -> None:
        self.stream = stream
        self.src = src
        self.src_sid = src_sid
        self.dst: _Side | None = None  # None until the destination stream exists
        self.dst_sid = 0
        self.chunks: deque[bytes] | None = None
        self.ended = False  # END_STREAM received from src
        self.trailers: list[Any] | None = None
        self.finished = False  # END_STREAM sent to dst, or the flow was dropped

    def received(self, data: bytes, flow_len: int, ended: bool) -> None:
        if self.finished:
            return  # dropped: the connection window is reopened anyway
        if ended and not self.chunks:
            # The last DATA (for most responses the only one) with nothing queued
            # before it: straight out if the windows take it, without the queue.
            dst = self.dst
            if dst is not None and not dst.closed and not dst.write_paused:
                h2 = dst.h2
                sid = self.dst_sid
                size = len(data)
                try:
                    fits = size <= h2.max_outbound_frame_size and size <= h2.local_flow_control_window(sid)
                    if fits:
                        h2.send_data(sid, data, end_stream=True)
                except ProtocolError:
                    self.stream.abort(_INTERNAL_ERROR, "unclassified")  # the destination stream is gone
                    return
                if fits:
                    self.ended = self.finished = True
                    dst.want_flush()
                    self.stream.flow_finished(self)
                    return
        if data:
            chunks = self.chunks
            if chunks is None:
                chunks = self.chunks = deque()
            chunks.append(data)
        if ended:
            self.ended = True
        elif flow_len > len(data):  # padding is never forwarded: acknowledge it now
            self.src.ack(self.src_sid, flow_len - len(data))  # type: ignore[union-attr]
        self.pump()

    def end(self, trailers: list[Any] | None = None) -> None:
        if self.ended or self.finished:
            return
        self.ended = True
        self.trailers = trailers
        self.pump()

    def drop(self) -> None:
        self.finished = True
        self.chunks = None
        if self.dst is not None:
            self.dst.blocked.pop(self.dst_sid, None)

    def pump(self) -> None:
        """Send what the destination's windows allow; park in ``dst.blocked`` for the rest."""
        dst = self.dst
        if dst is None or self.finished or dst.closed:
            return
        sid = self.dst_sid
        h2 = dst.h2
        chunks = self.chunks
        try:
            if chunks:
                if dst.write_paused:
                    dst.blocked[sid] = self
                    return
                sent = 0
                while chunks:
                    window = h2.local_flow_control_window(sid)
                    if window <= 0:
                        dst.blocked[sid] = self
                        break
                    data = chunks[0]
                    size = len(data)
                    limit = h2.max_outbound_frame_size
                    if window < limit:
                        limit = window
                    if size > limit:
                        h2.send_data(sid, data[:limit])
                        chunks[0] = data[limit:]
                        size = limit
                    else:
                        chunks.popleft()
                        if not chunks and self.ended and self.trailers is None:
                            h2.send_data(sid, data, end_stream=True)
                            self.finished = True
                        else:
                            h2.send_data(sid, data)
                    sent += size
                if sent and not self.ended:
                    self.src.ack(self.src_sid, sent)  # type: ignore[union-attr]
            if self.ended and not chunks and not self.finished:
                if self.trailers is not None:
                    h2.send_headers(sid, self.trailers, end_stream=True)
                    self.trailers = None
                else:
                    h2.end_stream(sid)
                self.finished = True
        except ProtocolError:
            # The destination stream is gone under us (a reset not yet seen):
            # the stream cannot continue.
            self.stream.abort(_INTERNAL_ERROR, "unclassified")
            return
        dst.want_flush()
        if self.finished:
            self.stream.flow_finished(self)


def _answer(stream: Any, err: ProxyError, grpc: bool, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    """The proxy answers a stream by itself (ref 3.5): count it, send a headers-only response, close."""
    server = stream.server
    exchange = stream.exchange
    status, fields = response_headers(err, grpc, server.route.informational_headers)
    exchange.proxy_error(err)
    exchange.response_head(status)
    exchange.end(grpc_status=err.grpc_status if grpc else None)
    stream.responded = True
    if stream.client_open and not server.closed:
        block = [(b":status", str(status).encode())]
        block += [(name.encode(), value.encode()) for name, value in fields]
        block += extra or []
        try:
            server.h2.send_headers(stream.sid, block, end_stream=True)
        except ProtocolError:
            pass
        server.want_flush()
    stream.response.finished = True
    stream._close()


class _Stream:
    """A client stream and the upstream stream it is forwarded on."""

    __slots__ = (
        "server", "sid", "up", "up_sid", "headers", "exchange", "request", "response",
        "grpc_status", "timer", "responded", "client_open", "done", "balanced", "pool", "waiting", "counted",
    )

    def __init__(self, server: H2ServerConnection, sid: int, headers: Sequence[Any], exchange: Exchange) -> None:
        self.server = server
        self.sid = sid
        self.up: H2ClientConnection | None = None
        self.up_sid = 0
        self.headers: Sequence[Any] | None = headers  # request head, until sent upstream
        self.exchange = exchange
        self.request = _Flow(self, server, sid)
        self.response = _Flow(self, None, 0)
        self.response.dst = server
        self.response.dst_sid = sid
        self.grpc_status: int | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.responded = False  # response headers sent to the client
        self.client_open = True  # the client stream has not been reset
        self.done = False
        self.balanced: tuple[Any, float] | None = None  # (endpoint, load handle) when balanced per stream
        self.pool: H2Pool | None = None  # the endpoint's pool when balanced per stream
        self.waiting: asyncio.Task[None] | None = None  # waiting in the backend's queue for a ready endpoint
        self.counted: list[int] | None = None  # the in-flight counter this stream holds a place in

    # -- upstream side
    def opened(self, up: H2ClientConnection, up_sid: int, ended: bool) -> None:
        self.up = up
        self.up_sid = up_sid
        self.headers = None
        response = self.response
        response.src = up
        response.src_sid = up_sid
        request = self.request
        request.dst = up
        request.dst_sid = up_sid
        if ended:
            request.finished = True
        else:
            request.pump()

    def load_done(self, rtt: bool) -> None:
        """Complete the stream's load on its endpoint; the RTT sample is the time to the response head (ref 4)."""
        if self.balanced is not None:
            ep, handle = self.balanced
            self.balanced = None
            now = self.server.loop.time()
            ep.load.complete(handle, now, rtt=(now - handle) if rtt else None)

    def response_head(self, headers: Sequence[Any], ended: bool) -> None:
        if self.responded or self.done:
            return
        self.load_done(rtt=True)
        self.responded = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        memo = _RESPONSE_MEMO.get(id(headers))
        if memo is None or memo[0] is not headers:
            status = 0
            has_grpc = False
            grpc = None
            forwarded = []
            for h in headers:
                name = h[0]
                if name == _STATUS:
                    status = int(h[1])
                elif name in _CONNECTION_HEADERS:
                    continue
                elif name == _GRPC_STATUS:
                    has_grpc = True
                    grpc = _grpc_status((h,))
                forwarded.append(h)
            memo = (headers, tuple(forwarded), status, has_grpc, grpc)
            if len(_RESPONSE_MEMO) >= _MEMO_SIZE:
                _RESPONSE_MEMO.clear()
            _RESPONSE_MEMO[id(headers)] = memo
        kept, status = memo[1], memo[2]
        if ended and memo[3]:
            self.grpc_status = memo[4]  # trailers-only: the status is in the head
        self.exchange.response_head(status)
        server = self.server
        try:
            server.h2.send_headers(self.sid, kept, end_stream=ended)
        except ProtocolError:
            self.abort(_INTERNAL_ERROR, "unclassified")
            return
        server.want_flush()
        if ended:
            response = self.response
            response.ended = response.finished = True
            self.flow_finished(response)

    def informational(self, headers: Sequence[Any]) -> None:
        if self.responded or self.done:
            return
        try:
            self.server.h2.send_headers(self.sid, _forwardable(headers))
        except ProtocolError:
            return
        self.server.want_flush()

    def trailers(self, headers: Sequence[Any]) -> None:
        if self.exchange.grpc:
            self.grpc_status = _grpc_status(headers)
        self.response.end(_forwardable(headers))

    def upstream_reset(self, code: int) -> None:
        response = self.response
        if code == _NO_ERROR and response.ended:
            # RFC 9113 8.1: the upstream answered in full and asks the client
            # to stop sending the request; the response still goes out.
            self._detach_upstream(reset=False)
            self.request.drop()
            if response.finished:
                self._close()
            return
        self.abort(code, h2_error_label(code), upstream_code=None)

    def upstream_lost(self) -> None:
        """The upstream connection died under this stream."""
        self._detach_upstream(reset=False)
        if not self.responded:
            self.fail(IO_ERROR)
        else:
            self.abort(_INTERNAL_ERROR, "unclassified")

    def refused(self) -> None:
        """The upstream's GOAWAY excluded this stream: it was never processed."""
        self._detach_upstream(reset=False)
        self.abort(_REFUSED_STREAM, h2_error_label(_REFUSED_STREAM))

    def _detach_upstream(self, reset: bool, code: int = _CANCEL) -> None:
        up = self.up
        if up is None:
            return
        self.up = None
        if up.streams.pop(self.up_sid, None) is not None:
            up.blocked.pop(self.up_sid, None)
            if reset:
                up.reset(self.up_sid, code)
            up.stream_closed()

    # -- client side
    def client_reset(self, code: int) -> None:
        self.client_open = False
        self.abort(None, h2_error_label(code), upstream_code=code)

    def client_lost(self) -> None:
        self.client_open = False
        self.abort(None, h2_error_label(_CANCEL), upstream_code=_CANCEL)

    def timed_out(self) -> None:
        self.timer = None
        if not self.responded and not self.done:
            self.fail(RESPONSE_TIMEOUT)

    # -- endings
    def fail(self, err: ProxyError) -> None:
        """Answer the client by itself (ref 3.5) and forget the upstream stream."""
        if self.done:
            return
        self.server.pool_cancel(self)
        self._detach_upstream(reset=True)
        self.request.drop()
        _answer(self, err, self.exchange.grpc)

    def abort(self, client_code: int | None, error: str, upstream_code: int | None = _CANCEL) -> None:
        """End the stream with resets: ``client_code`` to the client, ``upstream_code`` upstream."""
        if self.done:
            return
        self.exchange.end(grpc_status=None, error=error)
        self.server.pool_cancel(self)
        self._detach_upstream(reset=upstream_code is not None, code=upstream_code or 0)
        self.request.drop()
        self.response.drop()
        if client_code is not None and self.client_open:
            self.client_open = False
            self.server.reset(self.sid, client_code)
        self._close()

    def flow_finished(self, flow: _Flow) -> None:
        if flow is self.response:
            self.exchange.end(grpc_status=self.grpc_status if self.exchange.grpc else None)
        if self.request.finished and self.response.finished:
            self._close()

    def _close(self) -> None:
        if self.done:
            return
        self.done = True
        self.load_done(rtt=False)
        if self.counted is not None:
            self.counted[0] -= 1
            self.counted = None
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.request.ended and self.client_open:
            # The response is complete but the client is still sending: ask it
            # to stop (RFC 9113 8.1).
            self.client_open = False
            self.server.reset(self.sid, _NO_ERROR)
        self._detach_upstream(reset=False)
        self.server.stream_closed(self)
        self.request.stream = self.response.stream = _GONE  # no cycle left (see _Gone)


# ---------------------------------------------------------------- HTTP/1 upstream (orig-proto)

# What a downgraded response may hold, read from the app but not yet sent to
# the client for want of HTTP/2 window: past it, the app's socket is not read
# (one default stream window; uvloop reads up to 256 KiB at a time past it).
HTTP1_BUFFER_HIGH = 65536
HTTP1_BUFFER_LOW = HTTP1_BUFFER_HIGH // 2


class _Http1Body:
    """The request body of a downgraded stream: client DATA written to the HTTP/1
    connection (chunk-framed unless the length is known), acknowledged to the
    client once the connection has taken it, so the stream's receive window
    bounds what is held here and in the socket's buffer."""

    __slots__ = ("stream", "chunked", "held", "unacked", "ended")

    def __init__(self, stream: _Http1Stream, chunked: bool, ended: bool) -> None:
        self.stream = stream
        self.chunked = chunked
        self.held: list[bytes] | None = []  # bytes for the connection, until it exists
        self.unacked = 0  # flow-controlled bytes received and not acknowledged
        self.ended = ended  # END_STREAM received

    def received(self, data: bytes, flow_len: int, ended: bool) -> None:
        if self.ended or self.stream.done:
            return  # dropped: the connection window is reopened anyway
        if data:
            self._write(orig_proto.h1.encode_chunk(data) if self.chunked else data)
        self.unacked += flow_len
        if ended:
            self.end()
        else:
            self.ack()

    def end(self, trailers: list[Any] | None = None) -> None:
        if self.ended or self.stream.done:
            return
        self.ended = True
        if self.chunked:
            self._write(orig_proto.last_chunk(trailers))  # trailers of a sized body have no HTTP/1 form: dropped

    def _write(self, data: bytes) -> None:
        held = self.held
        if held is not None:
            held.append(data)
        else:
            conn = self.stream.conn
            if conn is not None:
                conn.write(data)

    def ack(self) -> None:
        """Let the client send what the connection has taken (not while its write buffer is full)."""
        stream = self.stream
        conn = stream.conn
        if self.unacked and not self.ended and self.held is None and conn is not None and not conn.write_paused:
            size, self.unacked = self.unacked, 0
            stream.server.ack(stream.sid, size)


class _Http1Stream:
    """A client stream marked ``l5d-orig-proto`` (ref 3.3): one HTTP/1.1 exchange
    with the app on a keep-alive connection (orig_proto.Http1Pool), answered on
    the stream as HTTP/2. It is the response parser's handler (orig_proto.Http1Exchange).

    The response body goes out through a ``_Flow`` whose source is this stream:
    what the client's windows do not take yet waits there, and past
    ``HTTP1_BUFFER_HIGH`` the app's socket is not read until the flow's
    acknowledgements bring it under ``HTTP1_BUFFER_LOW``."""

    __slots__ = (
        "server", "sid", "method", "head", "exchange", "request", "response", "pool", "conn", "connect_task",
        "timer", "bodiless", "responded", "reusable", "parsed", "buffered", "retried", "client_open", "done", "counted",
        "keep_case",
    )

    def __init__(self, server: H2ServerConnection, sid: int, req: orig_proto.DowngradedRequest, ended: bool,
                 exchange: Exchange) -> None:
        self.server = server
        self.sid = sid
        self.method = req.method
        self.head = req.head
        self.keep_case = req.keep_case
        self.exchange = exchange
        self.request = _Http1Body(self, req.chunked, ended)
        self.response = _Flow(self, self, sid)  # type: ignore[arg-type]  # acknowledgements come back to ``ack``
        self.response.dst = server
        self.response.dst_sid = sid
        self.pool: orig_proto.Http1Pool | None = None
        self.conn: orig_proto.Http1Connection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.bodiless = ended  # no request body: safe to send again (users.md A4)
        self.counted: list[int] | None = None  # the in-flight counter this stream holds a place in
        self.responded = False  # response headers sent to the client
        self.reusable = False  # the response leaves the connection fit for another exchange
        self.parsed = False  # the whole response was read from the app
        self.buffered = 0  # response bytes read from the app and not yet sent to the client
        self.retried = False
        self.client_open = True  # the client stream has not been reset
        self.done = False

    # -- the connection
    def start(self, pool: orig_proto.Http1Pool) -> None:
        self.pool = pool
        conn = pool.acquire()
        if conn is not None:
            self._attach(conn)
        else:
            self.connect_task = self.server.loop.create_task(self._connect(pool))

    async def _connect(self, pool: orig_proto.Http1Pool) -> None:
        err: ProxyError | None = None
        try:
            conn = await pool.connect()
        except TimeoutError:
            err = CONNECT_TIMEOUT.because(f"connect to {pool.target} timed out after {pool.connect_timeout:g}s")
        except IdentityMismatch as exc:
            err = IDENTITY_REQUIRED.because(str(exc))
        except OSError as exc:
            err = IO_ERROR.because(f"connect to {pool.target}: {exc.strerror or exc}")
        finally:
            self.connect_task = None
        if err is not None:
            self.fail(err)
            return
        if self.done:
            pool.release(conn)
            return
        self._attach(conn)

    def _attach(self, conn: orig_proto.Http1Connection) -> None:
        self.conn = conn
        body = self.request
        held, body.held = body.held or [], None
        conn.begin(self, self.method, b"".join((self.head, *held)) if held else self.head)
        body.ack()

    def upstream_writable(self) -> None:
        self.request.ack()

    def upstream_failed(self, err: ProxyError) -> None:
        """The connection failed (and is closed) before the response was read."""
        conn = self.conn
        if conn is None or self.done:
            return
        self.conn = None
        if self.responded:
            self.abort(_INTERNAL_ERROR, err.metric)  # too late for an error response: the body is cut
            return
        pool = self.pool
        if conn.reused and not conn.got_bytes and self.bodiless and not self.retried and pool is not None:
            # A reused keep-alive connection closed before answering a request
            # without a body: send it once more, on a fresh connection (users.md A4).
            self.retried = True
            self.request.held = []
            self.connect_task = self.server.loop.create_task(self._connect(pool))
            return
        self.fail(err)

    # -- the response (parser handler)
    def on_head(self, head: Any) -> None:
        if self.done or self.responded:
            return
        server = self.server
        status = head.status
        if status < 200:
            if status != 101:  # a 101 is refused by the connection (Switch)
                try:
                    server.h2.send_headers(self.sid, orig_proto.response_fields(head))
                except ProtocolError:
                    return
                server.want_flush()
            return
        self.responded = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        no_body = self.method == b"HEAD" or status in (204, 304) or head.content_length == 0
        self.reusable = head.keep_alive and (no_body or head.chunked or head.content_length is not None)
        self.exchange.response_head(status)
        try:
            server.h2.send_headers(self.sid, orig_proto.response_fields(head, self.keep_case), end_stream=no_body)
        except ProtocolError:
            self.abort(_INTERNAL_ERROR, "unclassified")
            return
        server.want_flush()
        if no_body:
            # END_STREAM went with the head; ``on_end`` (in this same read) finishes the exchange.
            response = self.response
            response.ended = response.finished = True

    def on_body(self, chunk: bytes) -> None:
        if self.done or self.parsed:
            return
        self.buffered += len(chunk)
        self.response.received(chunk, len(chunk), False)
        if self.buffered >= HTTP1_BUFFER_HIGH:
            conn = self.conn
            if conn is not None:
                conn.pause_reading()

    def ack(self, _sid: int, size: int) -> None:
        """The response flow sent ``size`` bytes to the client (``_Flow`` source)."""
        self.buffered -= size
        conn = self.conn
        if conn is not None and conn.read_paused and self.buffered < HTTP1_BUFFER_LOW:
            conn.resume_reading()

    def on_end(self) -> None:
        if self.done or self.parsed or not self.responded:
            return
        self.parsed = True
        conn, self.conn = self.conn, None
        if conn is not None:
            # Another exchange may use the connection only if this request was sent in full.
            conn.finish(self.reusable and self.request.ended)
        response = self.response
        if response.finished:
            self.flow_finished(response)
        else:
            response.end()

    # -- the client side
    def client_reset(self, code: int) -> None:
        self.client_open = False
        self.abort(None, h2_error_label(code))

    def client_lost(self) -> None:
        self.client_open = False
        self.abort(None, h2_error_label(_CANCEL))

    def timed_out(self) -> None:
        self.timer = None
        if not self.responded and not self.done:
            self.fail(RESPONSE_TIMEOUT)

    # -- endings
    def fail(self, err: ProxyError) -> None:
        """Answer the client by itself (ref 3.5), as the app would have over HTTP/1.1."""
        if self.done:
            return
        extra = []
        if err.fatal and self.server.route.informational_headers:
            extra.append((_PROXY_CONNECTION, b"close"))  # the peer proxy closes its app's connection
        extra.append((orig_proto.ORIG_PROTO, orig_proto.HTTP_11))
        _answer(self, err, False, extra)

    def abort(self, client_code: int | None, error: str) -> None:
        """End the stream with a reset (``client_code``) and drop the app connection."""
        if self.done:
            return
        self.exchange.end(error=error)
        self.response.drop()
        if client_code is not None and self.client_open:
            self.client_open = False
            self.server.reset(self.sid, client_code)
        self._close()

    def flow_finished(self, flow: _Flow) -> None:
        """The response ended on the stream (``_Flow``). The exchange with the app
        is over: a client still sending is asked to stop (in ``_close``)."""
        if self.done:
            return
        self.exchange.end()
        self._close()

    def _close(self) -> None:
        if self.done:
            return
        self.done = True
        if self.counted is not None:
            self.counted[0] -= 1
            self.counted = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()  # mid-exchange: its state is unknown
        if not self.request.ended and self.client_open:
            # Answered while the client is still sending: ask it to stop (RFC 9113 8.1).
            self.client_open = False
            self.server.reset(self.sid, _NO_ERROR)
        self.server.stream_closed(self)  # type: ignore[arg-type]
        # No cycle left (see _Gone): the body and the response flow point back here.
        self.request.stream = self.response.stream = _GONE
        self.response.src = None


# ---------------------------------------------------------------- upstream


class H2ClientConnection(_Side):
    """One HTTP/2 connection to an upstream endpoint, shared by many client connections."""

    def __init__(self, pool: H2Pool) -> None:
        super().__init__(pool.settings.client_connection_window)
        self.pool = pool
        # Streams wait for the upstream's first SETTINGS: before it, its stream
        # limit is unknown, and a server with a small one would refuse streams.
        self.ready = False
        self.settings_timer: asyncio.TimerHandle | None = None
        self.goaway = False  # received GOAWAY or retired: no new streams
        self.idle_since = self.loop.time()
        self.idle_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        pool = self.pool
        if pool.metrics is not None and pool.dst_labels is not None:
            self.series = TcpSeries(pool.metrics, pool.dst_labels)
        h2 = self.h2 = h2core.Connection(client_side=True)
        settings: dict[int, int] = {}
        if self.pool.settings.client_stream_window != DEFAULT_WINDOW:
            settings[h2core.INITIAL_WINDOW_SIZE] = self.pool.settings.client_stream_window
        h2.initiate_connection(settings)
        self._open_connection_window()
        self._flush()
        self._arm_idle_timer()
        self.settings_timer = self.loop.call_later(self.pool.connect_timeout, self._no_settings)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.goaway = True
        for timer in (self.idle_timer, self.settings_timer):
            if timer is not None:
                timer.cancel()
        if self.series is not None:
            self.series.closed("")
            self.series = None
        if not self.ready:
            # Not an HTTP/2 server, or it went away at once: like a failed dial.
            self.pool.dial_failed(self, IO_ERROR.because(f"{self.pool.target} closed the connection before HTTP/2 settings"))
        self.pool.retired(self)
        for stream in list(self.streams.values()):
            stream.upstream_lost()
        self.streams.clear()
        self.blocked.clear()

    # -- streams
    def has_capacity(self) -> bool:
        return self.ready and not self.goaway and len(self.streams) < self.h2.remote_max_concurrent_streams

    def _no_settings(self) -> None:
        self.settings_timer = None
        if not self.ready and not self.closed:
            self.pool.dial_failed(self, CONNECT_TIMEOUT.because(f"no HTTP/2 settings from {self.pool.target}"))
            self.retire()

    def open(self, stream: _Stream) -> bool:
        """Start ``stream`` here; False if this connection cannot take it."""
        h2 = self.h2
        request = stream.request
        ended = request.ended and not request.chunks and request.trailers is None
        try:
            sid = h2.get_next_available_stream_id()
            h2.send_headers(sid, stream.headers or (), end_stream=ended)
        except (NoAvailableStreamIDError, TooManyStreamsError):
            self.retire()
            return False
        self.streams[sid] = stream
        stream.opened(self, sid, ended)
        self.want_flush()
        return True

    def stream_closed(self) -> None:
        """A stream here is over: room for a waiting one, or the end of a retired connection."""
        if self.goaway:
            if not self.streams:
                self.close()
            return
        if not self.streams:
            self.idle_since = self.loop.time()
        if self.pool.pending:
            self.pool.dispatch()

    def retire(self) -> None:
        """Take no new streams; close once the streams in flight are done."""
        if not self.goaway:
            self.goaway = True
            self.pool.retired(self)
        if not self.streams:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.goaway = True
            self.h2.close_connection()
            self._flush()
            self.transport.close()

    def _arm_idle_timer(self) -> None:
        self.idle_timer = self.loop.call_at(self.idle_since + UPSTREAM_IDLE_TIMEOUT, self._idle_check)

    def _idle_check(self) -> None:
        self.idle_timer = None
        if self.closed:
            return
        if not self.streams and self.loop.time() - self.idle_since >= UPSTREAM_IDLE_TIMEOUT:
            self.retire()
            if self.pool.conn is None and not self.pool.pending:
                self.pool.closed = True  # Clients makes a fresh pool if the endpoint is used again
            return
        if self.streams:
            self.idle_since = self.loop.time()  # busy now: look again a full period later
        self._arm_idle_timer()

    # -- events
    def _on_response(self, event: ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.response_head(event.headers, event.stream_ended)

    def _on_informational(self, event: InformationalResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.informational(event.headers)

    def _on_data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.response.received(event.data, event.flow_controlled_length, event.stream_ended)

    def _on_trailers(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.trailers(event.headers)

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.upstream_reset(event.error_code)

    def _on_settings_changed(self, event: RemoteSettingsChanged) -> None:
        self._wake_all()
        if not self.ready:
            self.ready = True
            if self.settings_timer is not None:
                self.settings_timer.cancel()
                self.settings_timer = None
        if self.pool.pending and self.pool.conn is self:
            self.pool.dispatch()

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        self.goaway = True
        self.pool.retired(self)
        last = event.last_stream_id if event.last_stream_id is not None else MAX_STREAM_ID
        for sid, stream in list(self.streams.items()):
            if sid > last:
                stream.refused()
        if not self.streams:
            self.close()


H2ClientConnection.handlers = {
    ResponseReceived: H2ClientConnection._on_response,
    InformationalResponseReceived: H2ClientConnection._on_informational,
    DataReceived: H2ClientConnection._on_data,
    TrailersReceived: H2ClientConnection._on_trailers,
    StreamReset: H2ClientConnection._on_reset,
    WindowUpdated: _Side._on_window,
    RemoteSettingsChanged: H2ClientConnection._on_settings_changed,
    ConnectionTerminated: H2ClientConnection._on_goaway,
}


class H2Pool:
    """The upstream of one endpoint in one worker: one shared connection, dialled on demand."""

    def __init__(self, target: Addr, connect_timeout: float, settings: H2Settings, identity: str = "", local: Any = None,
                 metrics: Any = None, dst_labels: tuple[Any, ...] | None = None) -> None:
        self.target = target
        self.metrics = metrics
        self.dst_labels = dst_labels  # tcp_* labels (peer="dst") of its connections; None: not counted
        self.connect_timeout = connect_timeout
        self.settings = settings
        self.identity = identity  # meshed endpoint: dial with mTLS and check this name
        self.local = local
        self.loop = asyncio.get_running_loop()
        self.conn: H2ClientConnection | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.pending: dict[_Stream, None] = {}  # insertion-ordered: first come, first sent
        self.closed = False
        self.connections_opened = 0  # how many times it dialled (tests, debugging)

    def submit(self, stream: _Stream) -> None:
        conn = self.conn
        if conn is not None and not self.pending and conn.has_capacity() and conn.open(stream):
            return
        self.pending[stream] = None
        if self.conn is None:
            self._dial()

    def cancel(self, stream: _Stream) -> None:
        self.pending.pop(stream, None)

    def dispatch(self) -> None:
        """Start waiting streams while the connection has room; dial if there is none."""
        pending = self.pending
        while pending:
            conn = self.conn
            if conn is None:
                self._dial()
                return
            if not conn.has_capacity():
                return
            stream = next(iter(pending))
            if not conn.open(stream):
                continue  # that connection retired itself; the loop dials a new one
            del pending[stream]

    def retired(self, conn: H2ClientConnection) -> None:
        """``conn`` takes no new streams (GOAWAY, lost, out of ids)."""
        if self.conn is conn:
            self.conn = None
            if self.pending:
                self._dial()

    def dial_failed(self, conn: H2ClientConnection, err: ProxyError) -> None:
        """``conn`` connected but never became usable: answer the waiting streams."""
        if self.conn is conn:
            self.conn = None
        waiting = list(self.pending)
        self.pending.clear()
        for stream in waiting:
            stream.fail(err)

    def _dial(self) -> None:
        if self.connecting is None and not self.closed:
            self.connecting = self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        target = self.target
        err: ProxyError | None = None
        try:
            _, conn = await connect(lambda: H2ClientConnection(self), target, self.connect_timeout, self.identity, self.local)
        except TimeoutError:
            err = CONNECT_TIMEOUT
        except IdentityMismatch as exc:
            err = IDENTITY_REQUIRED.because(str(exc))
        except OSError as exc:
            err = IO_ERROR.because(f"connect to {target}: {exc.strerror or exc}")
        finally:
            self.connecting = None
        if err is not None:
            waiting = list(self.pending)
            self.pending.clear()
            for stream in waiting:
                stream.fail(err)
            return
        self.connections_opened += 1
        if self.closed:
            conn.close()
            return
        if conn.goaway:
            return  # lost before this task resumed: connection_lost has answered the waiting streams
        self.conn = conn
        self.dispatch()

    def close(self) -> None:
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        waiting = list(self.pending)
        self.pending.clear()
        for stream in waiting:
            stream.fail(IO_ERROR)
        if self.conn is not None:
            conn, self.conn = self.conn, None
            conn.goaway = True
            conn.close()


# ---------------------------------------------------------------- client-facing


class H2ServerConnection(_Side):
    """The protocol of one accepted HTTP/2 client connection.

    ``done`` resolves when the connection is closed. ``shutdown()`` drains it:
    GOAWAY at once, in-flight streams finish, then the connection closes.

    Settings without a mechanism here: ``max_send_buf_size`` (what a stream
    buffers is already bounded by the receive window of its source),
    ``max_pending_accept_reset_streams`` (streams are accepted at once, none
    wait), ``adaptive_flow_control`` (windows are fixed).
    """

    def __init__(self, route: HttpRoute, metrics: Any, clients: Clients, settings: H2Settings, local: Any = None,
                 src: Any = None) -> None:
        conn_window = settings.initial_connection_window or DEFAULT_WINDOW
        super().__init__(conn_window)
        self.series = src  # counts bytes only: whoever made the series closes it (on ``done``)
        self.route = route
        self.metrics = metrics
        self.clients = clients
        self.settings = settings
        self.local = local  # LocalIdentity, for mTLS to meshed endpoints (route.identity)
        self.pool_kind = "h2:" + route.identity if route.identity else "h2"
        inbound = route.direction == "inbound"
        self.dropped = _INBOUND_DROPPED if inbound else _CONNECTION_HEADERS  # request fields not forwarded
        self.added = [(_CLIENT_ID, route.client_id.encode())] if inbound and route.client_id else []
        self.request_memo: dict[int, tuple[Any, ...]] = {}  # see _MEMO_SIZE
        self.in_flight_limit: list[int] | None = None  # [streams in flight, max], shared with the direction (set by HttpStage)
        # Inbound honours ``l5d-orig-proto`` (ref 3.3); outbound forwards it as any
        # other field, as Linkerd does (its outbound server has downgrades off).
        self.downgrades = inbound
        self.pool: H2Pool | None = None
        self.http1_pool: orig_proto.Http1Pool | None = None
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.draining = False
        self.last_stream_id: int | None = None  # set by the final GOAWAY of a drain
        self.peer_leaving = False  # the client sent GOAWAY or EOF
        self.drain_timer: asyncio.TimerHandle | None = None
        self.keepalive_timer: asyncio.TimerHandle | None = None
        self.keepalive_waiting = False

    # -- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # Requests are validated on the way in; responses are left to the client.
        h2 = self.h2 = h2core.Connection(client_side=False, validate_requests=True)
        h2.initiate_connection(self.settings.server_settings())
        self._open_connection_window()
        self._flush()
        if self.settings.keep_alive_interval:
            self.keepalive_timer = self.loop.call_later(self.settings.keep_alive_interval, self._keepalive)

    def eof_received(self) -> bool:
        # The client will send nothing more; answer what is in flight, then close.
        self.peer_leaving = True
        self._maybe_close()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        for timer in (self.drain_timer, self.keepalive_timer):
            if timer is not None:
                timer.cancel()
        for stream in list(self.streams.values()):
            stream.client_lost()
        self.streams.clear()
        self.blocked.clear()
        if not self.done.done():
            self.done.set_result(None)

    # -- drain
    def shutdown(self) -> None:
        """Drain: GOAWAY now, let the streams in flight finish, then close."""
        if self.draining or self.closed or self.transport is None:
            return
        self.draining = True
        self._flush()
        self.transport.write(_goaway(MAX_STREAM_ID))
        self.h2.ping(DRAIN_PING)
        self._flush()
        self.drain_timer = self.loop.call_later(DRAIN_PING_TIMEOUT, self._final_goaway)

    def _final_goaway(self) -> None:
        if self.drain_timer is not None:
            self.drain_timer.cancel()
            self.drain_timer = None
        if self.last_stream_id is not None or self.closed:
            return
        self.last_stream_id = self.h2.highest_inbound_stream_id
        self._flush()
        self.transport.write(_goaway(self.last_stream_id))
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.streams or self.closed:
            return
        if self.last_stream_id is not None or self.peer_leaving:
            self._flush()
            self.transport.close()

    def stream_closed(self, stream: _Stream) -> None:
        self.streams.pop(stream.sid, None)
        self.blocked.pop(stream.sid, None)
        if not self.streams and (self.last_stream_id is not None or self.peer_leaving):
            self.want_flush()
            self.loop.call_soon(self._maybe_close)

    # -- keep-alive
    def _keepalive(self) -> None:
        self.keepalive_timer = None
        if self.closed:
            return
        if self.keepalive_waiting:
            # No PONG within the timeout: the client is gone.
            self.transport.close()
            return
        self.keepalive_waiting = True
        self.h2.ping(KEEPALIVE_PING)
        self.want_flush()
        timeout = self.settings.keep_alive_timeout or 20.0  # hyper's default keep-alive timeout
        self.keepalive_timer = self.loop.call_later(timeout, self._keepalive)

    def _on_ping_ack(self, event: PingAckReceived) -> None:
        data = event.ping_data
        if data == DRAIN_PING:
            self._final_goaway()
        elif data == KEEPALIVE_PING and self.keepalive_waiting:
            self.keepalive_waiting = False
            if self.keepalive_timer is not None:
                self.keepalive_timer.cancel()
            interval = self.settings.keep_alive_interval
            if interval:
                self.keepalive_timer = self.loop.call_later(interval, self._keepalive)

    # -- pool
    def _new_pool(self) -> H2Pool:
        route = self.route
        return H2Pool(route.target, route.connect_timeout, self.settings, route.identity, self.local, self.metrics, route.dst_labels)

    def pool_cancel(self, stream: _Stream) -> None:
        pool = stream.pool or self.pool
        if pool is not None and pool.pending:
            pool.cancel(stream)

    def _new_http1_pool(self) -> orig_proto.Http1Pool:
        route = self.route
        config = self.clients.config  # None in tests that build Clients by hand: the defaults apply
        return orig_proto.Http1Pool(
            route.target, route.connect_timeout,
            getattr(config, "inbound_http1_pool_idle_timeout", orig_proto.POOL_IDLE_TIMEOUT),
            getattr(config, "max_idle_conns_per_endpoint", orig_proto.MAX_IDLE),
            getattr(config, "http_max_head_size", None) or orig_proto.h1.MAX_HEAD_SIZE,
            identity=route.identity, local=self.local, metrics=self.metrics, dst_labels=route.dst_labels,
        )

    def _downgrade(self, sid: int, headers: Sequence[Any], mark: bytes, ended: bool) -> bool:
        """Serve a stream marked ``l5d-orig-proto`` as HTTP/1 (ref 3.3); False when
        the mark names no HTTP/1 version (then it is ignored, as Linkerd does)."""
        parsed = orig_proto.parse_orig_proto(mark)
        if parsed is None:
            log.info("unknown l5d-orig-proto value: ignored", value=mark.decode("latin-1"))
            return False
        req = orig_proto.request_head(list(headers), parsed[1], not ended)
        if isinstance(req, str):
            log.info("malformed downgraded request", reason=req)
            self.reset(sid, _PROTOCOL_ERROR)  # RFC 9113 8.1.1: a malformed request is a stream error
            return True
        route = self.route
        stream = _Http1Stream(self, sid, req, ended, Exchange(self.metrics, route, False))
        self.streams[sid] = stream  # type: ignore[assignment]
        if not route.authorized:
            stream.fail(FORBIDDEN)  # the inbound default policy refuses this client (403, ref 3.5)
            return True
        limit = self.in_flight_limit
        if limit is not None:
            if limit[0] >= limit[1]:
                stream.fail(LOADSHED)  # past max-in-flight: shed at once (503, ref 3.5)
                return True
            limit[0] += 1
            stream.counted = limit
        if route.response_timeout is not None:
            stream.timer = self.loop.call_later(route.response_timeout, stream.timed_out)
        pool = self.http1_pool
        if pool is None or pool.closed:
            pool = self.http1_pool = self.clients.get("h1-orig:" + route.identity, route.target, self._new_http1_pool)
        stream.start(pool)
        return True

    # -- events
    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self.last_stream_id is not None and sid > self.last_stream_id:
            self.reset(sid, _REFUSED_STREAM)  # opened after our final GOAWAY
            return
        fields = event.headers
        memo = self.request_memo.get(id(fields))
        if memo is not None and memo[0] is fields:
            headers, content_type, mark = memo[1], memo[2], memo[3]
        else:
            kept = []
            content_type = None
            mark = None
            dropped = self.dropped
            downgrades = self.downgrades
            for h in fields:
                name = h[0]
                if name in dropped or (name == _TE and h[1] != _TRAILERS):
                    continue
                if name == _CONTENT_TYPE:
                    content_type = h[1]
                elif downgrades and name == orig_proto.ORIG_PROTO:
                    mark = h[1]
                    continue
                kept.append(h)
            headers = tuple(kept + self.added) if self.added else tuple(kept)
            if len(self.request_memo) >= _MEMO_SIZE:
                self.request_memo.clear()
            self.request_memo[id(fields)] = (fields, headers, content_type, mark)
        if mark is not None and self._downgrade(sid, headers, mark, event.stream_ended):
            return
        route = self.route
        backend = route.backend if route.authorized else None
        ep = backend.pick_now() if backend is not None else None
        labels = self._endpoint_labels(backend, ep) if ep is not None else None
        stream = _Stream(self, sid, headers, Exchange(self.metrics, route, is_grpc(content_type), labels[0] if labels else None))
        self.streams[sid] = stream
        if event.stream_ended:
            stream.request.ended = True
        if not route.authorized:
            stream.fail(FORBIDDEN)  # the inbound default policy refuses this client (403, ref 3.5)
            return
        limit = self.in_flight_limit
        if limit is not None:
            if limit[0] >= limit[1]:
                stream.fail(LOADSHED)  # past max-in-flight: shed at once (503, ref 3.5)
                return
            limit[0] += 1
            stream.counted = limit
        if route.response_timeout is not None:
            stream.timer = self.loop.call_later(route.response_timeout, stream.timed_out)
        if backend is not None:
            # A logical service: HTTP/2 is balanced per request (ref 4), each stream to its own pick.
            if ep is not None:
                self._submit_balanced(stream, backend, ep, labels)
            else:
                stream.waiting = self.loop.create_task(self._await_endpoint(stream, backend))
            return
        pool = self.pool
        if pool is None or pool.closed:
            pool = self.pool = self.clients.get(self.pool_kind, route.target, self._new_pool)
        pool.submit(stream)

    def _endpoint_labels(self, backend: Any, ep: Any) -> Any:
        cache = backend.labels
        found = cache.get(ep.addr)
        if found is None:
            meshed = self.local is not None and self.local.creds is not None
            found = cache[ep.addr] = self.route.endpoint_labels(ep, backend.name, meshed)
        return found

    def _submit_balanced(self, stream: _Stream, backend: Any, ep: Any, labels: Any) -> None:
        _http, dst, identity = labels
        route = self.route
        pool = self.clients.get("h2:" + identity, ep.addr, lambda: H2Pool(
            ep.addr, route.connect_timeout, self.settings, identity, self.local, self.metrics, dst))
        stream.pool = pool
        stream.balanced = (ep, ep.load.start(self.loop.time()))
        pool.submit(stream)

    async def _await_endpoint(self, stream: _Stream, backend: Any) -> None:
        try:
            ep = await backend.acquire()
        except FailFastError:
            stream.waiting = None
            stream.fail(FAILFAST)
            return
        except LoadShedError:
            stream.waiting = None
            stream.fail(LOADSHED)
            return
        stream.waiting = None
        if not stream.done:
            self._submit_balanced(stream, backend, ep, self._endpoint_labels(backend, ep))

    def _on_data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.request.received(event.data, event.flow_controlled_length, event.stream_ended)

    def _on_trailers(self, event: TrailersReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.request.end(_forwardable(event.headers))

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.client_reset(event.error_code)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        self.peer_leaving = True
        self._maybe_close()


H2ServerConnection.handlers = {
    RequestReceived: H2ServerConnection._on_request,
    DataReceived: H2ServerConnection._on_data,
    TrailersReceived: H2ServerConnection._on_trailers,
    StreamReset: H2ServerConnection._on_reset,
    WindowUpdated: _Side._on_window,
    RemoteSettingsChanged: _Side._on_settings,
    PingAckReceived: H2ServerConnection._on_ping_ack,
    ConnectionTerminated: H2ServerConnection._on_goaway,
}
