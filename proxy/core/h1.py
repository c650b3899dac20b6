"""HTTP/1.1 message parsing, sans-IO, with a fast and a pure implementation.

Theory of operation: a parser is fed bytes (``feed``) and calls its handler:
``on_head(head)`` once the head of a message is complete, ``on_body(chunk)``
with de-framed body bytes (chunked encoding removed), and ``on_end()`` when
the message is complete. The proxy re-frames bodies itself when it writes
them, so it never buffers a whole body.

Two implementations share this interface:
* ``httptools`` (llhttp, C): the fast path. It costs about a seventh of h11
  per message on this machine (shared/reference/peers-bench.md).
* ``h11``: the pure-Python twin, selected with ``MESHPROXY_NO_EXTENSIONS=1``.

Header names keep their original case (legacy servers match them
case-sensitively, users.md A10); ``name_lower`` helpers are used for lookups.

The common case skips the parser callbacks: a bodiless request, or a
Content-Length response, that arrives whole in one read is recognised in one
pass by ``proxy.core.h1scan`` (compiled: native/h1scan.pyx) and handed over as
the same head, body and end; everything else goes through llhttp.

A request that switches protocols (``Upgrade`` or ``CONNECT``) stops the
parser: ``Switch(remaining)`` is raised with the bytes that followed the head.
A response parser must be told the request method (HEAD responses have no
body; a 2xx to CONNECT switches to a tunnel).
"""

from __future__ import annotations

from typing import Any, Protocol

import h11

from proxy.native import load

try:
    import httptools
except ImportError:  # pragma: no cover - httptools is a dependency; the twin still works
    httptools = None  # type: ignore[assignment]

Headers = list[tuple[bytes, bytes]]

_scan = load("h1scan", "proxy.core.h1scan")[0]  # head scanning and writing: compiled twin unless disabled

MAX_HEAD_SIZE = 64 * 1024  # users.md A13: beyond this, 431 (requests) or 502 (responses)


class ParseError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Switch(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The message switched protocols; ``remaining`` holds the bytes after its head."""

    def __init__(self, remaining: bytes) -> None:
        super().__init__("protocol switch")
        self.remaining = remaining


def _keep_alive(version: bytes, connection: bytes) -> bool:
    """Does the connection stay open after this message (RFC 9112 9.3)? ``connection``: framing's tokens."""
    if not connection:
        return version == b"1.1"
    # find(), not ``in``: bytes.__contains__ tries its argument as an int first, and that
    # failure formats a TypeError message on every call.
    if version == b"1.1":
        return connection.find(b"close") < 0
    return connection.find(b"keep-alive") >= 0


class RequestHead:
    """A request head. ``forward``, when set, is the request as read, to be sent upstream as
    it is (the scanner found nothing to change); ``headers`` is then parsed from it only if
    read, and reading or setting ``headers`` drops ``forward`` (the list may be changed)."""

    __slots__ = ("method", "target", "version", "parsed_headers", "keep_alive", "chunked", "content_length", "upgrade", "forward")

    def __init__(self, method: bytes, target: bytes, version: bytes, headers: Headers | None,
                 framed: tuple[bool, int | None, bytes, bool] | None = None, forward: bytes | None = None) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.parsed_headers = headers
        self.forward = forward
        # ``framed``: what ``framing(headers)`` returns, when the scanner has worked it out already.
        f: tuple[bool, int | None, bytes, bool] = framed or framing(headers)
        self.chunked, self.content_length, connection, self.upgrade = f
        self.keep_alive = _keep_alive(version, connection)
        if method == b"CONNECT":
            self.upgrade = True

    @property
    def headers(self) -> Headers:
        found = self.parsed_headers
        if found is None:
            forward = self.forward
            assert forward is not None
            found = self.parsed_headers = _scan.scan_request(forward, len(forward))[2]
        self.forward = None
        return found

    @headers.setter
    def headers(self, value: Headers) -> None:
        self.parsed_headers = value
        self.forward = None


class ResponseHead:
    """A response head. ``forward``, when set, is the head to send an HTTP/1.1 client as it
    is (the scanner copied its lines); then ``headers`` is parsed from ``raw`` only if read."""

    __slots__ = ("status", "reason", "version", "parsed_headers", "keep_alive", "chunked", "content_length", "raw", "forward")

    def __init__(self, status: int, reason: bytes, version: bytes, headers: Headers | None,
                 framed: tuple[bool, int | None, bytes, bool] | None = None, raw: bytes | None = None,
                 forward: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.parsed_headers = headers
        self.raw = raw  # the whole response as read (headers None: parsed from it on demand)
        self.forward = forward
        f: tuple[bool, int | None, bytes, bool] = framed or framing(headers)
        self.chunked, self.content_length, connection, _upgrade = f
        self.keep_alive = _keep_alive(version, connection)

    @property
    def headers(self) -> Headers:
        found = self.parsed_headers
        if found is None:
            raw = self.raw
            assert raw is not None
            found = self.parsed_headers = _scan.scan_response(raw, len(raw) + 4)[3]
        return found

    @headers.setter
    def headers(self, value: Headers) -> None:
        self.parsed_headers = value


# (chunked, content-length, lower-cased Connection tokens, upgrade requested) of a header list.
framing = _scan.framing
# Bound once: the parsers call these per message (one global lookup instead of two).
_scan_request_head = _scan.scan_request_head
_scan_response_head = _scan.scan_response_head


class Handler(Protocol):
    def on_head(self, head: Any) -> None: ...

    def on_body(self, chunk: bytes) -> None: ...

    def on_end(self) -> None: ...


# ------------------------------------------------------------------ httptools


class _HttptoolsRequestParser:
    """Requests, on llhttp."""

    __slots__ = ("handler", "parser", "url", "headers", "head_size", "max_head", "head", "idle")

    def __init__(self, handler: Handler, max_head: int = MAX_HEAD_SIZE) -> None:
        self.handler = handler
        self.parser = httptools.HttpRequestParser(self)
        self.max_head = max_head
        self.idle = True  # llhttp is between messages: the scanner may take the next one
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: Headers = []
        self.head_size = 0
        self.head: RequestHead | None = None

    def on_message_begin(self) -> None:
        self.idle = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.max_head:
            raise ParseError(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise ParseError(431, "request headers too large")

    def on_headers_complete(self) -> None:
        p = self.parser
        try:
            head = RequestHead(p.get_method(), self.url, p.get_http_version().encode(), self.headers)
        except ValueError:
            raise ParseError(400, "invalid content-length") from None
        self.head = head
        self.handler.on_head(head)

    def on_body(self, body: bytes) -> None:
        self.handler.on_body(body)

    def on_message_complete(self) -> None:
        self._reset()
        self.idle = True
        self.handler.on_end()

    def feed(self, data: bytes) -> None:
        if self.idle:
            found = _scan_request_head(data, self.max_head)
            if found is not None:
                # Nothing in it to change: it goes upstream as read, no header list is built.
                method, target, length = found
                self.handler.on_head(RequestHead(method, target, b"1.1", None, (False, length, b"", False), data))
                self.handler.on_end()
                return
            scanned = _scan.scan_request(data, self.max_head)
            if scanned is not None:
                # One whole bodiless request: the head and the end llhttp would have reported.
                method, target, headers, length, connection = scanned
                self.handler.on_head(RequestHead(method, target, b"1.1", headers, (False, length, connection, False)))
                self.handler.on_end()
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            raise Switch(data[upgrade.args[0]:]) from None
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ParseError):
                raise cause from None
            raise
        except httptools.HttpParserError as exc:
            if self.head_size > self.max_head:
                raise ParseError(431, "request headers too large") from None
            raise ParseError(400, f"malformed request: {exc}") from None


class _HttptoolsResponseParser:
    """Responses, on llhttp. HEAD and CONNECT responses are parsed by hand:
    llhttp cannot be told the request method."""

    __slots__ = ("handler", "parser", "method", "reason", "headers", "head_size", "max_head", "manual", "done_head", "in_body",
                 "forward_heads")

    def __init__(self, handler: Handler, method: bytes, max_head: int = MAX_HEAD_SIZE, forward_heads: bool = False) -> None:
        self.handler = handler
        self.method = method
        self.max_head = max_head
        # The handler writes heads to an HTTP/1 client: scan for heads it can forward as they are
        # (others, such as the HTTP/2 downgrade, read the header list and would parse it twice).
        self.forward_heads = forward_heads
        self.manual = bytearray() if method in (b"HEAD", b"CONNECT") else None
        self.parser: Any = None  # llhttp, made on the first read the scanner does not take whole
        self.reason = b""
        self.headers: Headers = []
        self.head_size = 0
        self.done_head = False
        self.in_body = False

    def reuse(self, handler: Handler, method: bytes) -> bool:
        """Take the next response of the connection for ``handler``, if this parser is between
        messages and the method needs no special framing; False: make a new parser."""
        if self.manual is not None or self.in_body or self.head_size or method in (b"HEAD", b"CONNECT"):
            return False
        self.handler = handler
        self.method = method
        self.parser = None  # the scanner gets the first look at the next response again
        return True

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            raise ParseError(502, "response headers too large")

    def on_headers_complete(self) -> None:
        p = self.parser
        assert p is not None
        head = ResponseHead(p.get_status_code(), self.reason, p.get_http_version().encode(), self.headers)
        self.reason = b""
        self.headers = []
        self.head_size = 0
        self.in_body = not (100 <= head.status < 200)
        self.handler.on_head(head)

    def on_body(self, body: bytes) -> None:
        self.handler.on_body(body)

    def on_message_complete(self) -> None:
        if self.in_body:
            self.in_body = False
            self.handler.on_end()

    def eof(self) -> None:
        """The upstream closed: that ends a close-delimited body (llhttp has no finish call here)."""
        if self.in_body:
            self.in_body = False
            self.handler.on_end()

    def feed(self, data: bytes) -> None:
        if self.manual is not None:
            self._feed_manual(data)
            return
        if self.parser is None:
            # One whole Content-Length response: the callbacks llhttp would have made.
            handler = self.handler
            found = _scan_response_head(data, self.max_head) if self.forward_heads else None
            if found is not None:
                # Its head can be forwarded as the scanner copied it; the header list is not built.
                status, reason, version, length, connection, body, forward = found
                handler.on_head(ResponseHead(status, reason, version, None, (False, length, connection, False), data, forward))
                if length:
                    handler.on_body(data[body:])
                handler.on_end()
                return
            scanned = _scan.scan_response(data, self.max_head)
            if scanned is not None:
                status, reason, version, headers, length, connection, body = scanned
                handler.on_head(ResponseHead(status, reason, version, headers, (False, length, connection, False)))
                if length:
                    handler.on_body(data[body:])
                handler.on_end()
                return
            self.parser = httptools.HttpResponseParser(self)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            raise Switch(data[upgrade.args[0]:]) from None
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, ParseError):
                raise exc.__context__ from None
            raise
        except httptools.HttpParserError as exc:
            raise ParseError(502, f"malformed response: {exc}") from None

    def _feed_manual(self, data: bytes) -> None:
        assert self.manual is not None
        if self.done_head:
            if self.method == b"CONNECT":
                raise Switch(data)
            return  # bytes after a HEAD response's head: nothing can follow
        self.manual += data
        end = self.manual.find(b"\r\n\r\n")
        if end < 0:
            if len(self.manual) > self.max_head:
                raise ParseError(502, "response headers too large")
            return
        head = parse_response_head(bytes(self.manual[:end]))
        rest = bytes(self.manual[end + 4:])
        if 100 <= head.status < 200 and head.status != 101:
            self.handler.on_head(head)  # informational: the final response follows
            self.manual = bytearray()
            if rest:
                self._feed_manual(rest)
            return
        self.done_head = True
        self.handler.on_head(head)
        if self.method == b"CONNECT" and 200 <= head.status < 300:
            raise Switch(rest)
        self.handler.on_end()


def parse_response_head(raw: bytes) -> ResponseHead:
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ParseError(502, "malformed response status line")
    headers: Headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ParseError(502, "malformed response header")
        headers.append((name, value.strip()))
    return ResponseHead(int(parts[1]), parts[2] if len(parts) > 2 else b"", parts[0][5:], headers)


# ------------------------------------------------------------------ h11 (pure twin)


class _H11RequestParser:
    """Requests, on h11. A fresh h11 connection per message: we only parse with
    it (the proxy writes its own bytes), and h11 will not start a new cycle
    before a response has been sent through it."""

    def __init__(self, handler: Handler, max_head: int = MAX_HEAD_SIZE) -> None:
        self.handler = handler
        self.max_head = max_head
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
                raise ParseError(status, f"malformed request: {exc}") from None
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # An Upgrade/CONNECT request switched protocols, or the message ended:
                # a new cycle needs a fresh connection, fed with what is left.
                remaining, closed = self.conn.trailing_data
                if self.conn.their_state is h11.MIGHT_SWITCH_PROTOCOL or self.conn.their_state is h11.SWITCHED_PROTOCOL:
                    raise Switch(bytes(remaining))
                self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
                if remaining:
                    self.conn.receive_data(bytes(remaining))
                if closed:
                    self.conn.receive_data(b"")
                if not remaining:
                    return
                continue
            if isinstance(event, h11.Request):
                raw = list(event.headers.raw_items())
                if len(event.target) + sum(len(n) + len(v) + 4 for n, v in raw) > self.max_head:
                    raise ParseError(431, "request headers too large")
                head = RequestHead(event.method, event.target, event.http_version, raw)
                self.handler.on_head(head)
                if head.upgrade:
                    remaining, _ = self.conn.trailing_data
                    if self.conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                        raise Switch(bytes(remaining))
            elif isinstance(event, h11.Data):
                self.handler.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.handler.on_end()
                if self.conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    raise Switch(bytes(self.conn.trailing_data[0]))
                remaining, closed = self.conn.trailing_data
                self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
                if remaining:
                    self.conn.receive_data(bytes(remaining))
                if closed:
                    self.conn.receive_data(b"")
                if not remaining:
                    return
            elif isinstance(event, h11.ConnectionClosed):
                return


class _H11ResponseParser:
    def __init__(self, handler: Handler, method: bytes, max_head: int = MAX_HEAD_SIZE, upgrade: bool = False) -> None:
        self.handler = handler
        self.method = method
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        # h11 frames the response by the request it saw: tell it (the bytes are discarded).
        headers = [(b"host", b"x")]
        if upgrade:
            headers += [(b"connection", b"upgrade"), (b"upgrade", b"proxied")]
        if method == b"CONNECT":
            target = b"x:1"
        else:
            target = b"/"
        self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if method != b"CONNECT":
            self.conn.send(h11.EndOfMessage())

    def reuse(self, handler: Handler, method: bytes) -> bool:
        return False  # h11 frames by the request it was shown: one parser per response

    def feed(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ParseError(502, f"malformed response: {exc}") from None
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                raise Switch(bytes(self.conn.trailing_data[0]))
            if isinstance(event, h11.InformationalResponse):
                head = ResponseHead(event.status_code, event.reason, event.http_version, list(event.headers.raw_items()))
                self.handler.on_head(head)
                if event.status_code == 101:
                    raise Switch(bytes(self.conn.trailing_data[0]))
            elif isinstance(event, h11.Response):
                head = ResponseHead(event.status_code, event.reason, event.http_version, list(event.headers.raw_items()))
                self.handler.on_head(head)
                if self.method == b"CONNECT" and 200 <= event.status_code < 300:
                    raise Switch(bytes(self.conn.trailing_data[0]))
            elif isinstance(event, h11.Data):
                self.handler.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self.handler.on_end()
                return
            elif isinstance(event, h11.ConnectionClosed):
                return

    def eof(self) -> None:
        """The upstream closed: ends a close-delimited body."""
        self.conn.receive_data(b"")
        self.feed(b"")


def request_parser(handler: Handler, pure: bool, max_head: int = MAX_HEAD_SIZE) -> Any:
    if pure or httptools is None:
        return _H11RequestParser(handler, max_head)
    return _HttptoolsRequestParser(handler, max_head)


def response_parser(handler: Handler, method: bytes, pure: bool, max_head: int = MAX_HEAD_SIZE, upgrade: bool = False,
                    forward_heads: bool = False) -> Any:
    """``forward_heads``: the handler can use ``ResponseHead.forward`` (then the header list is made only if read)."""
    if pure or httptools is None:
        return _H11ResponseParser(handler, method, max_head, upgrade)
    return _HttptoolsResponseParser(handler, method, max_head, forward_heads)


# ------------------------------------------------------------------ writing

# Hop-by-hop headers (RFC 9110 7.6.1): not forwarded (proxy.core.h1scan says why).
HOP_BY_HOP = _scan.HOP_BY_HOP
# Headers minus the hop-by-hop ones and those Connection names (kept for a protocol switch).
forwardable = _scan.forwardable
# A head: the first line, then "name: value" lines, then the empty line.
encode_head = _scan.encode_head
# The same, after an HTTP/1.1 status line made from a status code and reason.
encode_response_head = _scan.encode_response_head
# (first value, headers without it) of a header named in lower case; (None, the same list) if absent.
take_header = _scan.take_header


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
