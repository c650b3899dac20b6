"""HTTP/1 carried over HTTP/2 between proxies: the HTTP/1 half of the inbound
orig-proto downgrade (ref 3.3, server side).

Theory of operation
-------------------
A Linkerd outbound proxy sends its app's HTTP/1 requests to a meshed peer as
HTTP/2 streams marked ``l5d-orig-proto: HTTP/1.1`` (or ``HTTP/1.0``, with
``; absolute-form`` when the original request target was absolute-form), with
``transfer-encoding`` removed. The inbound proxy takes the mark off, sends the
request to its app as HTTP/1.1, and answers on the stream with the mark set,
so that the peer answers its own client in HTTP/1.

This module is the HTTP/1 side and knows nothing of HTTP/2 streams:

* ``parse_orig_proto``, ``request_head``, ``response_fields``: translating
  heads, sans-IO (bytes in, bytes out).
* ``Http1Pool`` and ``Http1Connection``: keep-alive connections to one
  endpoint, one exchange at a time. The response is parsed with proxy.core.h1
  and handed to the exchange, which implements ``Http1Exchange``.

The HTTP/2 side (flow control, resets, synthesized errors, metrics) is
``_Http1Stream`` in proxy/http/h2.py.
"""

from __future__ import annotations

import asyncio
import re
from http import HTTPStatus
from typing import Any, Protocol

from proxy.config import Addr
from proxy.http import errors
from proxy.http.pool import IdlePool
from proxy.native import NO_EXTENSIONS, load
from proxy.transport.connect import connect
from proxy.transport.relay import TcpSeries

h1 = load("h1parse", "proxy.core.h1")[0]  # the parser module: compiled twin unless MESHPROXY_NO_EXTENSIONS=1

Headers = list[tuple[bytes, bytes]]

ORIG_PROTO = b"l5d-orig-proto"
HTTP_11 = b"HTTP/1.1"
HTTP_10 = b"HTTP/1.0"
# Linkerd appends "; absolute-form" to the version and tests bytes 10..23 of the
# value (linkerd/proxy/http/src/server/h2_to_h1.rs, ``was_absolute_form``).
_ABSOLUTE_FORM = b"absolute-form"

# Linkerd's default LINKERD2_PROXY_INBOUND_HTTP1_CONNECTION_POOL_IDLE_TIMEOUT:
# shorter than the idle timeout of typical app servers, so the proxy closes an
# idle connection before the app does (users.md A4).
POOL_IDLE_TIMEOUT = 3.0
# Linkerd's default LINKERD2_PROXY_MAX_IDLE_CONNS_PER_ENDPOINT (ref 1.5).
MAX_IDLE = 10000

# RFC 9110 5.6.2: a method is a token.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9112 3.2: a request target is URI characters, visible ASCII; anything else
# (a space above all) would change the meaning of the request line.
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")
# Methods whose empty body is still stated (as hyper does): some servers answer
# 411 to a POST with neither Content-Length nor Transfer-Encoding.
_EMPTY_BODY_STATED = frozenset((b"POST", b"PUT", b"PATCH"))
_CHUNKED = (b"transfer-encoding", b"chunked")
# Request fields that are not written as they came: pseudo-fields become the
# request line and Host, cookies are joined (RFC 9113 8.2.3), ``te`` is
# hop-by-hop in HTTP/1, and the content length is checked to be one value.
_HOST = b"host"
_COOKIE = b"cookie"
_CONTENT_LENGTH = b"content-length"
_TE = b"te"
# Response fields HTTP/2 has no use for (RFC 9113 8.2.2) beyond those
# h1.forwardable already drops: the body is re-framed as DATA frames.
_TRANSFER_ENCODING = b"transfer-encoding"


# Not Linkerd's: HTTP/2 lower-cases field names, so an upgrading meshproxy lists
# the original spellings of the names that were not lower case here, and the
# downgrading peer writes them back (legacy apps match names case-sensitively,
# users.md A10). Comma-separated; names are tokens and hold no commas. A Linkerd
# peer does not know it and passes it on like any other field.
HEADER_CASE = b"meshproxy-header-case"
# Set by an inbound proxy on a fatal error of its own (see h2.py): over HTTP/2 the outbound
# proxy cannot see the connection close, so it closes its client's connection when told.
PROXY_CONNECTION = b"l5d-proxy-connection"
_ABSOLUTE_TARGET = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)\Z", re.DOTALL)
# Request fields an upgrade does not carry: the body is re-framed as DATA frames
# and the authority travels as :authority (RFC 9113 8.2.2, 8.3.1).
_NOT_UPGRADED = frozenset((b"transfer-encoding", b"host"))
_HEAD = b"HEAD"


def parse_orig_proto(value: bytes) -> tuple[bytes, bool] | None:
    """(version, was absolute-form) from an ``l5d-orig-proto`` value, or None
    when it names no HTTP/1 version (Linkerd logs it and ignores it)."""
    if value.startswith(HTTP_11):
        version = HTTP_11
    elif value.startswith(HTTP_10):
        version = HTTP_10
    else:
        return None
    return version, value[10:23] == _ABSOLUTE_FORM


class DowngradedRequest:
    """The HTTP/1.1 form of one HTTP/2 request head."""

    __slots__ = ("method", "head", "chunked", "keep_case")

    def __init__(self, method: bytes, head: bytes, chunked: bool, keep_case: bool = False) -> None:
        self.method = method
        self.head = head  # request line and fields, up to and including the blank line
        self.chunked = chunked  # the body is sent with chunked encoding
        self.keep_case = keep_case  # the peer is a meshproxy: answer with meshproxy-header-case


def request_head(headers: Headers, absolute: bool, has_body: bool) -> DowngradedRequest | str:
    """The HTTP/1.1 request for an HTTP/2 request head (lower-case names, already
    validated by h2, ``l5d-orig-proto`` removed), or why it has none.

    The target is ``:path``, or ``{scheme}://{authority}{path}`` when the original
    was absolute-form; ``Host`` comes from ``:authority`` unless a ``host`` field
    exists. The body is chunked unless ``content-length`` gives its size, and is
    absent when the HTTP/2 request ended with its headers."""
    method = path = authority = None
    scheme = b"http"
    has_host = False
    length: bytes | None = None
    cookies: list[bytes] = []
    fields: Headers = []
    case = None
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":scheme":
                scheme = value
            else:
                return f"pseudo-header {name.decode('latin-1')} has no HTTP/1 form"
            continue
        if name == _COOKIE:
            cookies.append(value)
            continue
        if name == _CONTENT_LENGTH:
            if length is not None and value != length:
                return "conflicting content-length fields"
            if length is not None:
                continue
            length = value
        elif name == _TE or name == ORIG_PROTO:
            continue
        elif name == HEADER_CASE:
            case = header_case(value)
            continue
        elif name == _HOST:
            has_host = True
        fields.append((name, value))
    if method is None or path is None:
        return "no :method or :path"
    if method == b"CONNECT" or not _TOKEN.match(method):
        return "method cannot be proxied as HTTP/1"
    if absolute and authority is not None and path != b"*":
        target = scheme + b"://" + authority + path
    else:
        target = path
    if not _TARGET.match(target) or (authority is not None and not _TARGET.match(authority)):
        return "request target is not visible ASCII"
    if cookies:
        fields.append((_COOKIE, b"; ".join(cookies)))
    if not has_host and authority is not None:
        fields.insert(0, (_HOST, authority))
    chunked = False
    if length is None:
        if has_body:
            fields.append(_CHUNKED)
            chunked = True
        elif method in _EMPTY_BODY_STATED:
            fields.append((_CONTENT_LENGTH, b"0"))
    head = h1.encode_head(method + b" " + target + b" HTTP/1.1", _restore_case(fields, case))
    return DowngradedRequest(method, head, chunked, case is not None)


# A client sends the same spellings request after request: each value is parsed once.
_CASES: dict[bytes, dict[bytes, bytes]] = {}
_CASES_MAX = 1024


def header_case(value: bytes | None) -> dict[bytes, bytes] | None:
    """lower-case name -> original spelling, from a ``meshproxy-header-case`` value (shared:
    callers only read it)."""
    if not value:
        return None
    found = _CASES.get(value)
    if found is None:
        if len(_CASES) >= _CASES_MAX:
            _CASES.clear()
        found = _CASES[value] = {name.lower(): name for name in (n.strip() for n in value.split(b",")) if name}
    return found


def _restore_case(fields: Headers, case: dict[bytes, bytes] | None) -> Headers:
    if not case:
        return fields
    return [(case.get(name, name), value) for name, value in fields]


def upgrade_request(method: bytes, target: bytes, version: bytes, headers: Headers, default_authority: bytes) -> Headers:
    """The HTTP/2 header block carrying one HTTP/1 request to a meshed peer (ref 3.3, client
    side): pseudo-fields from the request line and Host, the end-to-end fields with names
    in lower case, ``l5d-orig-proto`` (``; absolute-form`` when the target was one), and
    ``meshproxy-header-case`` when a name was spelled otherwise."""
    scheme = b"http"
    path = target
    authority = None
    absolute = False
    if target[:1] != b"/" and target != b"*":
        found = _ABSOLUTE_TARGET.match(target)
        if found is not None:
            scheme, authority, path = found.group(1).lower(), found.group(2), found.group(3) or b"/"
            absolute = True
    fields: Headers = []
    spelled: list[bytes] = []
    host = None
    for name, value in h1.forwardable(headers):
        low = name.lower()
        if low != name and name not in spelled and not low.startswith(b"l5d-"):
            # l5d-* fields are the proxies' own: the peer may replace them (l5d-client-id).
            spelled.append(name)
        if low in _NOT_UPGRADED:
            if low == _HOST and host is None:
                host = value
            continue
        fields.append((low, value))
    block = [(b":method", method), (b":scheme", scheme), (b":authority", authority or host or default_authority), (b":path", path)]
    block += fields
    mark = HTTP_10 if version == b"1.0" else HTTP_11
    block.append((ORIG_PROTO, mark + b"; absolute-form" if absolute else mark))
    if spelled:
        block.append((HEADER_CASE, b",".join(spelled)))
    return block


_REASONS: dict[int, bytes] = {}


def reason_phrase(status: int) -> bytes:
    """HTTP/2 has no reason phrase: the standard one for the status, or none."""
    found = _REASONS.get(status)
    if found is None:
        try:
            found = HTTPStatus(status).phrase.encode()
        except ValueError:
            found = b""
        _REASONS[status] = found
    return found


def upgraded_response(headers: Headers, ended: bool, method: bytes) -> Any:
    """The HTTP/1.1 response head (proxy.core.h1.ResponseHead) of an HTTP/2 response
    to an upgraded request: ``:status`` and the fields minus ``l5d-orig-proto``, names
    spelled back from ``meshproxy-header-case``, framed by its ``content-length`` or
    else chunked (``content-length: 0`` when the response ended with its head)."""
    status = 0
    fields: Headers = []
    case = None
    length = False
    for name, value in headers:
        if name[:1] == b":":
            if name == b":status":
                status = int(value)
            continue
        if name == ORIG_PROTO:
            continue
        if name == HEADER_CASE:
            case = header_case(value)
            continue
        if name == PROXY_CONNECTION:
            # The peer's own error was fatal: close our client's connection too (Linkerd's signal).
            if value.lower() == b"close":
                fields.append((b"connection", b"close"))
            continue
        if name == _CONTENT_LENGTH:
            length = True
        elif name == _TRANSFER_ENCODING:
            continue
        fields.append((name, value))
    if not (length or method == _HEAD or status in (204, 304) or status < 200):
        fields.append((_CONTENT_LENGTH, b"0") if ended else _CHUNKED)
    return h1.ResponseHead(status, reason_phrase(status), HTTP_11[5:], _restore_case(fields, case))


def last_chunk(trailers: Headers | None) -> bytes:
    """The end of a chunked body, with the HTTP/2 trailers as its trailer section."""
    if not trailers:
        return h1.LAST_CHUNK
    return b"0\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in trailers if name[:1] != b":") + b"\r\n"


def response_fields(head: Any, keep_case: bool = False) -> Headers:
    """The HTTP/2 header block of an HTTP/1 response head: ``:status``, the fields
    minus hop-by-hop ones and ``transfer-encoding`` (and a ``content-length`` a
    chunked response must not have), names in lower case, and ``l5d-orig-proto``;
    with ``keep_case`` (the request came from a meshproxy), ``meshproxy-header-case``."""
    out = [(b":status", b"%d" % head.status)]
    chunked = head.chunked
    spelled: list[bytes] = []
    for name, value in h1.forwardable(head.headers):
        low = name.lower()
        if keep_case and low != name and name not in spelled:
            spelled.append(name)  # Transfer-Encoding too: the peer's chunked framing is spelled back
        if low == _TRANSFER_ENCODING or low == ORIG_PROTO or low == HEADER_CASE or (chunked and low == _CONTENT_LENGTH):
            continue
        out.append((low, value))
    if head.status >= 200:
        out.append((ORIG_PROTO, HTTP_10 if head.version == b"1.0" else HTTP_11))
        if spelled:
            out.append((HEADER_CASE, b",".join(spelled)))
    return out


# ---------------------------------------------------------------- connections


class Http1Exchange(Protocol):
    """What a connection reports to the exchange using it. ``on_head``, ``on_body``
    and ``on_end`` come from the response parser (proxy.core.h1)."""

    def on_head(self, head: Any) -> None: ...

    def on_body(self, chunk: bytes) -> None: ...

    def on_end(self) -> None: ...

    def upstream_failed(self, err: errors.ProxyError) -> None:
        """The connection failed before the response ended (it is closed already)."""

    def upstream_writable(self) -> None:
        """The connection's write buffer drained below its low-water mark."""


class Http1Pool(IdlePool):
    """Idle keep-alive HTTP/1.1 connections to one endpoint, in one worker (http.pool)."""

    def __init__(self, target: Addr, connect_timeout: float, idle_timeout: float = POOL_IDLE_TIMEOUT,
                 max_idle: int = MAX_IDLE, max_head: int = h1.MAX_HEAD_SIZE, pure: bool = NO_EXTENSIONS,
                 identity: str = "", local: Any = None, metrics: Any = None,
                 dst_labels: tuple[Any, ...] | None = None) -> None:
        super().__init__(target, connect_timeout, idle_timeout, max_idle, identity, local, metrics, dst_labels)
        self.max_head = max_head
        self.pure = pure  # parse responses with h11 instead of httptools
        self.connections_opened = 0  # how many times it dialled (tests, debugging)

    async def connect(self) -> Http1Connection:
        """A new connection; raises TimeoutError, OSError or IdentityMismatch."""
        _, conn = await connect(lambda: Http1Connection(self), self.target, self.connect_timeout, self.identity, self.local)
        self.connections_opened += 1
        return conn


class Http1Connection(asyncio.Protocol):
    """One connection to the endpoint, serving one exchange at a time."""

    __slots__ = ("pool", "transport", "exchange", "parser", "reused", "got_bytes", "lost", "write_paused",
                 "read_paused", "idle_since", "series")

    def __init__(self, pool: Http1Pool) -> None:
        self.pool = pool
        self.transport: Any = None
        self.exchange: Http1Exchange | None = None
        self.parser: Any = None
        self.reused = False  # taken from the idle list (it may have been closed under us)
        self.got_bytes = False  # a response byte arrived for the current exchange
        self.lost = False
        self.write_paused = False
        self.read_paused = False
        self.idle_since = 0.0
        self.series: Any = None  # tcp_* metrics of this connection (peer="dst")

    # -- used by the exchange
    def begin(self, exchange: Http1Exchange, method: bytes, data: bytes) -> None:
        """Start an exchange: ``data`` is the request head (and any body already there)."""
        self.exchange = exchange
        self.got_bytes = False
        self.parser = h1.response_parser(exchange, method, self.pool.pure, self.pool.max_head)
        self.write(data)

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)
            if self.series is not None:
                self.series.write.value += len(data)

    def pause_reading(self) -> None:
        if not self.read_paused and not self.lost:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.lost:
            self.read_paused = False
            self.transport.resume_reading()

    def finish(self, reusable: bool) -> None:
        """The exchange is over: back to the pool if ``reusable``, else closed."""
        self.exchange = None
        self.parser = None
        if reusable and not self.lost:
            self.resume_reading()  # an idle connection must see the server close it
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        self.exchange = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        pool = self.pool
        if pool.metrics is not None and pool.dst_labels is not None:
            self.series = TcpSeries(pool.metrics, pool.dst_labels)

    def data_received(self, data: bytes) -> None:
        if self.series is not None:
            self.series.read.value += len(data)
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes on an idle connection: it is no longer in a known state
            return
        self.got_bytes = True
        try:
            self.parser.feed(data)
        except h1.Switch:
            self._failed(errors.IO_ERROR.because("the server switched protocols"))
        except h1.ParseError as exc:
            self._failed(errors.IO_ERROR.because(exc.reason))

    def eof_received(self) -> bool:
        if self.exchange is not None:
            eof = getattr(self.parser, "eof", None)
            if eof is not None:  # the end of a close-delimited body
                try:
                    eof()
                except h1.ParseError:
                    pass
            self._failed(errors.IO_ERROR.because("connection closed by the server"))
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if self.series is not None:
            self.series.closed("")
            self.series = None
        self._failed(errors.IO_ERROR.because(f"connection lost: {exc}" if exc else "connection closed by the server"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.upstream_writable()

    def _failed(self, err: errors.ProxyError) -> None:
        exchange = self.exchange
        self.close()
        if exchange is not None:
            exchange.upstream_failed(err)
