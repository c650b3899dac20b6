"""A minimal gRPC client over HTTP/2 (h2), for the control-plane APIs.

Theory of operation: a ``GrpcChannel`` owns at most one HTTP/2 connection to a
target and opens one stream per call. The connection is made lazily, by prior
knowledge (the client preface, no Upgrade) and, over TLS, with **no ALPN**: a
Linkerd control plane sits behind a Linkerd proxy that negotiates none, and a
client insisting on ``h2`` (as grpcio does) fails there (SPEC section 4).

Transports:
  * TCP + TLS with a given ``ssl.SSLContext``; SNI is the expected server
    identity, and after the handshake that identity must be among the DNS/URI
    SANs of the server's leaf (the context verifies the chain, not the name);
  * plain TCP when the address is loopback (Linkerd's rule for control
    addresses: a loopback ``*_SVC_ADDR`` means no TLS);
  * a unix socket (``unix:/path``, ``unix:///path`` or an absolute path), for
    the SPIRE agent.

A call sends HEADERS (``:path /pkg.Service/Method``, ``te: trailers``,
``content-type: application/grpc``, ``grpc-timeout`` when a deadline is set,
metadata), one length-prefixed message (1 byte "compressed" flag, 4 bytes
big-endian length) and END_STREAM. The response messages are read from DATA
with the same framing; the status comes from ``grpc-status``/``grpc-message``
in the trailers (or in the headers of a trailers-only response). Anything but
OK raises ``GrpcError(code, message)``; so do a lost connection (UNAVAILABLE),
a reset stream and an expired deadline (DEADLINE_EXCEEDED).

Flow control: each stream's window is as large as the largest message we
accept, and a stream's bytes are acknowledged when the caller takes the message
out, so a slow reader holds back its stream instead of buffering without bound.
The connection window is given back as bytes arrive: holding it too would let a
message larger than the connection window (or two half-read streams) deadlock.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import math
import ssl
import struct
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import h2.events
import h2.exceptions
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from proxy.tls.credentials import check_server_identity

# grpc-go and grpc-java refuse received messages above 4 MiB by default; so do we.
DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
# A control-plane address that does not answer within 10 s is as good as down;
# the identity and discovery loops retry on their own schedule.
DEFAULT_CONNECT_TIMEOUT = 10.0
# The connection-level receive window: 1 MiB, Linkerd's HTTP/2 client default (ref 1.5).
CONNECTION_WINDOW = 1024 * 1024
USER_AGENT = "meshproxy-grpc/0.1"


class StatusCode(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcError(Exception):
    """A call that did not end with status OK."""

    def __init__(self, code: int, message: str = "") -> None:
        try:
            self.code: int = StatusCode(code)
        except ValueError:
            self.code = code
        self.message = message
        name = self.code.name if isinstance(self.code, StatusCode) else str(code)
        super().__init__(f"grpc status {name}: {message}" if message else f"grpc status {name}")


# HTTP status -> gRPC code when a response has no grpc-status (grpc/doc/http-grpc-status-mapping.md).
_HTTP_TO_GRPC = {400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED, 403: StatusCode.PERMISSION_DENIED, 404: StatusCode.UNIMPLEMENTED, 429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE, 503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE}
# RST_STREAM error -> gRPC code (grpc/doc/PROTOCOL-HTTP2.md, "Errors").
_RESET_TO_GRPC = {ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE, ErrorCodes.CANCEL: StatusCode.CANCELLED, ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED, ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED}


# ---------------------------------------------------------------- targets

@dataclass(frozen=True, slots=True)
class Target:
    host: str = ""
    port: int = 0
    path: str = ""  # a unix socket

    @classmethod
    def parse(cls, addr: str) -> Target:
        """``host:port``, ``[v6]:port``, ``unix:/path``, ``unix:///path`` or ``/path``."""
        if addr.startswith("unix://"):
            return cls(path=addr[len("unix://"):])
        if addr.startswith("unix:"):
            return cls(path=addr[len("unix:"):])
        if addr.startswith("/"):
            return cls(path=addr)
        host, sep, port = addr.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"expected host:port or unix:/path, got {addr!r}")
        return cls(host=host.strip("[]"), port=int(port))

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def authority(self) -> str:
        if self.is_unix:
            return "localhost"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def is_loopback(host: str) -> bool:
    """Linkerd's test for control addresses: a loopback IP, or the name localhost."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def encode_timeout(seconds: float) -> str:
    """``grpc-timeout``: at most 8 digits and a unit; rounded up so the server's
    deadline is never shorter than ours."""
    for unit, scale in (("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600)):
        value = math.ceil(max(seconds, 0.0) * scale)
        if value < 100_000_000:
            return f"{value}{unit}"
    return "99999999H"


def _header_dict(headers: Any) -> dict[str, str]:
    # header_encoding="utf-8" makes h2 hand us str pairs.
    return {str(k): str(v) for k, v in headers}


def frame_message(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


# ---------------------------------------------------------------- connection

class _Stream:
    """What arrived on one HTTP/2 stream, for the call reading it."""

    __slots__ = ("headers", "trailers", "buffer", "ended", "error", "changed")

    def __init__(self) -> None:
        self.headers: dict[str, str] | None = None
        self.trailers: dict[str, str] | None = None
        self.buffer = bytearray()  # received, not yet acknowledged to the peer
        self.ended = False
        self.error: GrpcError | None = None
        self.changed = asyncio.Event()


class _Connection(asyncio.Protocol):
    """One HTTP/2 client connection: h2's state machine plus the streams' buffers."""

    def __init__(self, max_message_size: int) -> None:
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        # A whole message must fit the stream window, since we acknowledge per message.
        self.stream_window = max(65535, max_message_size + 5)
        self.h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: min(self.stream_window, 2**31 - 1),
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.closed: GrpcError | None = None
        self.goaway = False
        self.connection_unacked = 0
        self.flow = asyncio.Event()  # set when a window or the stream limit may have opened
        self.lost = asyncio.get_running_loop().create_future()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.flush()
            self.fail(GrpcError(StatusCode.INTERNAL, f"HTTP/2 protocol error: {exc}"))
            return
        for event in events:
            self._dispatch(event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(GrpcError(StatusCode.UNAVAILABLE, f"connection closed: {exc}" if exc else "connection closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    # events

    def _dispatch(self, event: Any) -> None:
        stream_id = getattr(event, "stream_id", None)
        stream = self.streams.get(stream_id) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = _header_dict(event.headers)
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.trailers = _header_dict(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            self._connection_consumed(event.flow_controlled_length)
            if stream is None:  # a stream we gave up on
                return
            padding = event.flow_controlled_length - len(event.data)
            if padding:
                self.acknowledge(event.stream_id, padding)
            stream.buffer += event.data
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.ended = True
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            if not stream.ended:
                code = _RESET_TO_GRPC.get(event.error_code, StatusCode.INTERNAL)  # type: ignore[call-overload]
                stream.error = GrpcError(code, f"stream reset by the server ({event.error_code!r})")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._went_away(event)
        if stream is not None:
            stream.changed.set()
        if isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged | h2.events.StreamEnded | h2.events.StreamReset):
            self.flow.set()

    def _went_away(self, event: h2.events.ConnectionTerminated) -> None:
        # GOAWAY: streams above last_stream_id were not handled and may be retried;
        # the others run to their end unless the server reports an error.
        self.goaway = True
        last = event.last_stream_id or 0
        for sid, s in list(self.streams.items()):
            if sid > last and s.error is None and not s.ended:
                s.error = GrpcError(StatusCode.UNAVAILABLE, "the server went away (GOAWAY) before handling the call")
                s.changed.set()
        if event.error_code != ErrorCodes.NO_ERROR:
            self.fail(GrpcError(StatusCode.UNAVAILABLE, f"the server closed the connection ({event.error_code!r})"))
        elif not self.streams and self.transport is not None:
            self.transport.close()

    # used by calls

    @property
    def usable(self) -> bool:
        return self.closed is None and not self.goaway and self.transport is not None and not self.transport.is_closing()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self, error: GrpcError) -> None:
        if self.closed is None:
            self.closed = error
        for stream in self.streams.values():
            if stream.error is None and not stream.ended:
                stream.error = error
            stream.changed.set()
        self.flow.set()
        if self.transport is not None:
            self.transport.close()

    async def open_stream(self, headers: list[tuple[str, str]]) -> tuple[int, _Stream]:
        while True:
            if self.closed is not None:
                raise self.closed
            if self.goaway:
                raise GrpcError(StatusCode.UNAVAILABLE, "the connection is going away")
            if self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams:
                break
            self.flow.clear()
            await self.flow.wait()
        stream_id = self.h2.get_next_available_stream_id()
        stream = self.streams[stream_id] = _Stream()
        self.h2.send_headers(stream_id, headers)
        self.flush()
        return stream_id, stream

    async def send(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        view = memoryview(data)
        while True:
            if self.closed is not None:
                raise self.closed
            stream = self.streams.get(stream_id)
            if stream is None or stream.error is not None or stream.ended:
                return  # the response already ended it; the status will tell why
            size = min(len(view), self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if size > 0 or not view:
                last = size == len(view)
                self.h2.send_data(stream_id, view[:size].tobytes(), end_stream=end_stream and last)
                self.flush()
                view = view[size:]
                if last:
                    return
                continue
            self.flow.clear()
            await self.flow.wait()

    def _connection_consumed(self, size: int) -> None:
        # Batched: one WINDOW_UPDATE per half window, not one per DATA frame.
        self.connection_unacked += size
        if self.connection_unacked >= CONNECTION_WINDOW // 2:
            self.h2.increment_flow_control_window(self.connection_unacked)
            self.connection_unacked = 0

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Reopen ``size`` bytes of one stream's window (the connection's is handled on arrival)."""
        stream = self.streams.get(stream_id)
        if not size or self.closed is not None or stream is None or stream.ended or stream.error is not None:
            return  # no more DATA will come on it
        try:
            self.h2.increment_flow_control_window(size, stream_id=stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self.flush()

    def finish(self, stream_id: int, stream: _Stream) -> None:
        """The call is done with the stream: reset it if the server has not ended it."""
        if self.streams.pop(stream_id, None) is None or self.closed is not None:
            return
        stream.buffer.clear()
        try:
            if not stream.ended and stream.error is None:
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        self.flow.set()
        if self.goaway and not self.streams and self.transport is not None:
            self.transport.close()


# ---------------------------------------------------------------- calls

class _Call:
    """One call on one stream: send the request, then take messages until the status."""

    def __init__(self, channel: GrpcChannel, method: str, request: bytes, timeout: float | None, metadata: Mapping[str, str] | None) -> None:
        self.channel = channel
        self.method = method
        self.request = request
        self.timeout = timeout
        self.metadata = metadata or {}
        self.deadline: float | None = None
        self.conn: _Connection | None = None
        self.stream_id = 0
        self.stream: _Stream | None = None
        self.done = False

    def _timeout_ctx(self) -> Any:
        return asyncio.timeout_at(self.deadline)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.timeout is not None:
            self.deadline = loop.time() + self.timeout
        try:
            async with self._timeout_ctx():
                self.conn = await self.channel._connection()
                headers = [
                    (":method", "POST"),
                    (":scheme", "https" if self.channel.uses_tls else "http"),
                    (":path", self.method),
                    (":authority", self.channel.authority),
                    ("te", "trailers"),
                    ("content-type", "application/grpc"),
                    ("user-agent", USER_AGENT),
                ]
                if self.timeout is not None:
                    headers.append(("grpc-timeout", encode_timeout(self.timeout)))
                headers += [(k.lower(), v) for k, v in self.metadata.items()]
                self.stream_id, self.stream = await self.conn.open_stream(headers)
                await self.conn.send(self.stream_id, frame_message(self.request), end_stream=True)
        except TimeoutError:
            self.close()
            raise GrpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except BaseException:
            self.close()
            raise

    async def recv(self) -> bytes | None:
        """The next message, or None once the call ended with OK."""
        assert self.stream is not None and self.conn is not None
        stream = self.stream
        try:
            async with self._timeout_ctx():
                while True:
                    message = self._take(stream)
                    if message is not None:
                        return message
                    if stream.error is not None:
                        raise stream.error
                    if stream.ended:
                        self._check_status(stream)
                        self.close()
                        return None
                    stream.changed.clear()
                    await stream.changed.wait()
        except TimeoutError:
            self.close()
            raise GrpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except BaseException:
            self.close()
            raise

    def _take(self, stream: _Stream) -> bytes | None:
        buf = stream.buffer
        if len(buf) < 5:
            return None
        compressed, length = struct.unpack_from(">BI", buf)
        if compressed:
            raise GrpcError(StatusCode.INTERNAL, "compressed message, but no compression was negotiated")
        if length > self.channel.max_message_size:
            raise GrpcError(StatusCode.RESOURCE_EXHAUSTED, f"received message larger than max ({length} vs. {self.channel.max_message_size})")
        if len(buf) < 5 + length:
            return None
        message = bytes(buf[5:5 + length])
        del buf[:5 + length]
        assert self.conn is not None
        self.conn.acknowledge(self.stream_id, 5 + length)
        return message

    def _check_status(self, stream: _Stream) -> None:
        headers = stream.headers or {}
        status_source = stream.trailers if stream.trailers is not None else headers
        raw = status_source.get("grpc-status")
        if raw is None:
            http = headers.get(":status", "")
            if http and http != "200":
                raise GrpcError(_HTTP_TO_GRPC.get(int(http) if http.isdigit() else 0, StatusCode.UNKNOWN), f"HTTP status {http}")
            raise GrpcError(StatusCode.INTERNAL, "the server ended the stream without a grpc-status")
        try:
            code = int(raw)
        except ValueError:
            raise GrpcError(StatusCode.UNKNOWN, f"invalid grpc-status {raw!r}") from None
        if code != StatusCode.OK:
            raise GrpcError(code, urllib.parse.unquote(status_source.get("grpc-message", "")))

    def close(self) -> None:
        if self.done:
            return
        self.done = True
        if self.conn is not None and self.stream is not None:
            self.conn.finish(self.stream_id, self.stream)


class ServerStream:
    """The messages of a server-streaming call: ``async for message in stream``.
    Leaving ``async with`` (or ``aclose()``) before the end cancels the call."""

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._started = False

    async def __aenter__(self) -> ServerStream:
        await self._start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __aiter__(self) -> ServerStream:
        return self

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._call.start()

    async def __anext__(self) -> bytes:
        await self._start()
        message = await self._call.recv()
        if message is None:
            raise StopAsyncIteration
        return message

    async def aclose(self) -> None:
        self._call.close()

    @property
    def headers(self) -> dict[str, str] | None:
        return self._call.stream.headers if self._call.stream else None

    @property
    def trailers(self) -> dict[str, str] | None:
        return self._call.stream.trailers if self._call.stream else None


# ---------------------------------------------------------------- channel

class GrpcChannel:
    """Calls to one target over one (re)connected HTTP/2 connection.

    ``ssl_context``: a context, or a callable returning the current one (so a
    new connection presents the newest certificate); None means plaintext.
    ``server_name``: the identity the server must prove (also the SNI).
    ``tls``: None decides by address (TLS unless loopback or unix socket, when
    a context is given); True or False forces it.
    """

    def __init__(
        self,
        addr: str,
        *,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
        server_name: str | None = None,
        tls: bool | None = None,
        authority: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.target = Target.parse(addr)
        if tls is None:
            tls = ssl_context is not None and not self.target.is_unix and not is_loopback(self.target.host)
        if tls and ssl_context is None:
            raise ValueError("TLS needs an ssl_context")
        if tls and not server_name:
            raise ValueError("TLS needs the server's identity name")
        self.uses_tls = bool(tls)
        self._ssl_context = ssl_context
        self.server_name = server_name or ""
        self.authority = authority or self.target.authority
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()

    def _context(self) -> ssl.SSLContext:
        ctx = self._ssl_context
        assert ctx is not None
        return ctx() if callable(ctx) and not isinstance(ctx, ssl.SSLContext) else ctx

    async def _connection(self) -> _Connection:
        async with self._lock:
            if self._conn is not None and self._conn.usable:
                return self._conn
            self._conn = await self._connect()
            return self._conn

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()

        def factory() -> _Connection:
            return _Connection(self.max_message_size)

        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.target.is_unix:
                    transport, conn = await loop.create_unix_connection(factory, self.target.path)
                elif self.uses_tls:
                    transport, conn = await loop.create_connection(
                        factory, self.target.host, self.target.port,
                        ssl=self._context(), server_hostname=self.server_name,
                        ssl_handshake_timeout=self.connect_timeout,
                    )
                else:
                    transport, conn = await loop.create_connection(factory, self.target.host, self.target.port)
        except TimeoutError:
            raise GrpcError(StatusCode.UNAVAILABLE, f"connect to {self.authority} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise GrpcError(StatusCode.UNAVAILABLE, f"connect to {self.authority}: {exc}") from None
        if self.uses_tls:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or not check_server_identity(ssl_object, self.server_name):
                transport.close()
                raise GrpcError(StatusCode.UNAVAILABLE, f"{self.authority} did not prove the identity {self.server_name!r}")
        return conn

    async def unary(self, method: str, request: bytes, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None) -> bytes:
        """One request, one response message."""
        call = _Call(self, method, request, timeout, metadata)
        await call.start()
        try:
            response = await call.recv()
            if response is None:
                raise GrpcError(StatusCode.INTERNAL, "the server sent no response message")
            if await call.recv() is not None:
                raise GrpcError(StatusCode.INTERNAL, "the server sent more than one response message to a unary call")
            return response
        finally:
            call.close()

    def server_stream(self, method: str, request: bytes, *, timeout: float | None = None, metadata: Mapping[str, str] | None = None) -> ServerStream:
        """One request, a stream of response messages (``async for``/``async with``)."""
        return ServerStream(_Call(self, method, request, timeout, metadata))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            if conn.closed is None:
                try:
                    conn.h2.close_connection()
                    conn.flush()
                except h2.exceptions.ProtocolError:
                    pass
            conn.transport.close()
            try:
                async with asyncio.timeout(1.0):
                    await conn.lost
            except TimeoutError:
                conn.transport.abort()
