"""HTTP/1.1 head scanning and writing helpers, sans-IO (pure twin of native/h1scan.pyx).

Theory of operation: most requests a proxy sees are the same shape, a bodiless
request whose whole head arrives in one read, answered by a Content-Length
response that also arrives in one read. ``scan_request`` and ``scan_response``
recognise exactly that shape in one pass and return what the parser callbacks
of llhttp would have produced, so ``proxy.core.h1`` can skip them. Anything
else, including anything llhttp might reject, returns ``None`` and the caller
feeds the bytes to the full parser: the scanners only ever accept a strict
subset of what llhttp accepts, never more.

``framing``, ``forwardable`` and ``encode_head`` are the per-message header
passes of the proxy (read framing, drop hop-by-hop headers, write a head); the
compiled twin does them without a bytes object per header.
"""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]

# RFC 9110 5.6.2 token characters: what a header name may contain.
TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Header value bytes the scanners accept: visible ASCII, space and tab. obs-text and
# control bytes go to the full parser, which decides (llhttp is stricter than RFC 9112).
VALUE_CHARS = bytes(range(0x21, 0x7F)) + b" \t"
# Origin-form targets: RFC 3986 path and query characters; anything else (a fragment,
# absolute-form, CONNECT's authority-form, OPTIONS *) goes to the full parser.
TARGET_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/?%"
# Methods llhttp knows that a bodiless request commonly has; others take the full parser.
FAST_METHODS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"POST", b"PUT", b"PATCH"})

# Hop-by-hop headers (RFC 9110 7.6.1) describe one connection and are not forwarded.
# Content-Length and Transfer-Encoding stay: the proxy keeps each message's framing
# (it re-encodes chunks as it forwards them), so those headers remain true.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"})
# Headers that change how a message is framed or handled: their presence sends it to the full parser.
_SLOW_REQUEST = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
_SLOW_RESPONSE = frozenset({b"transfer-encoding", b"upgrade"})


def _header_lines(block: bytes) -> tuple[Headers, int | None, bytes, frozenset[bytes]] | None:
    """Header lines (each ending in CRLF) -> (headers, content-length, Connection tokens, names seen).
    None if a line is outside the strict subset or Content-Length is not one plain number."""
    headers: Headers = []
    length = None
    connection = b""
    special: set[bytes] = set()
    for line in block.split(b"\r\n")[:-1]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name.translate(None, TCHAR) or value.translate(None, VALUE_CHARS):
            return None
        value = value.lstrip(b" \t")  # llhttp drops leading whitespace only; so do we
        low = name.lower()
        if low == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 15:
                return None
            length = int(value)
        elif low == b"connection":
            connection += b"," + value.lower()
        if low in HOP_BY_HOP or low in _SLOW_REQUEST:
            special.add(low)
        headers.append((name, value))
    return headers, length, connection, frozenset(special)


def scan_request(data: bytes, max_head: int) -> tuple[bytes, bytes, Headers, int | None, bytes] | None:
    """A complete bodiless HTTP/1.1 request that is all of ``data`` (nothing after its head):
    (method, target, headers, content-length (0 or None), Connection tokens as ``framing`` gives them)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 != len(data) or len(data) > max_head or b"\n" in data[:end].replace(b"\r\n", b""):
        return None
    line, _, block = data[:end + 2].partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] not in FAST_METHODS or parts[2] != b"HTTP/1.1":
        return None
    target = parts[1]
    if not target.startswith(b"/") or target.translate(None, TARGET_CHARS):
        return None
    scanned = _header_lines(block)
    if scanned is None:
        return None
    headers, length, connection, special = scanned
    if length or special & _SLOW_REQUEST:
        return None
    return parts[0], target, headers, length, connection


def scan_request_head(data: bytes, max_head: int) -> tuple[bytes, bytes, int | None] | None:
    """``scan_request`` for a request that can be sent on as it was read: every line written
    "Name: value", no hop-by-hop header, no l5d-* header (the proxy would take or set those).
    (method, target, content-length (0 or None)), or None."""
    scanned = scan_request(data, max_head)
    if scanned is None:
        return None
    method, target, headers, length, connection = scanned
    for name, _value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low.startswith(b"l5d-"):
            return None
    for line in data[:-4].split(b"\r\n")[1:]:
        value = line.partition(b":")[2]
        if value[:1] != b" " or value[1:2] in (b" ", b"\t"):
            return None
    return method, target, length


def scan_response(data: bytes, max_head: int) -> tuple[int, bytes, bytes, Headers, int, bytes, int] | None:
    """A complete HTTP/1.x response framed by Content-Length, status 200-599 but not 204/304,
    that is all of ``data``: (status, reason, version, headers, content-length,
    Connection tokens as ``framing`` gives them, offset of the body)."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end + 4 > max_head or b"\n" in data[:end].replace(b"\r\n", b""):
        return None
    line, _, block = data[:end + 2].partition(b"\r\n")
    if len(line) < 13 or line[:7] != b"HTTP/1." or line[7:8] not in (b"0", b"1") or line[8:9] != b" " or line[12:13] != b" ":
        return None
    code, reason = line[9:12], line[13:]
    if not code.isdigit() or reason.translate(None, VALUE_CHARS):
        return None
    status = int(code)
    if status < 200 or status > 599 or status in (204, 304):
        return None
    scanned = _header_lines(block)
    if scanned is None:
        return None
    headers, length, connection, special = scanned
    if length is None or special & _SLOW_RESPONSE or end + 4 + length != len(data):
        return None
    return status, reason, line[5:8], headers, length, connection, end + 4


def scan_response_head(data: bytes, max_head: int) -> tuple[int, bytes, bytes, int, bytes, int, bytes] | None:
    """``scan_response`` without the header list, plus the head to forward as it is:
    (status, reason, version, content-length, Connection tokens, body offset, head), where
    head is ``encode_response_head(status, reason, forwardable(headers))``. None when
    ``scan_response`` declines, the reason is empty, a kept line is not written
    "Name: value", Connection names a header that is not hop-by-hop, or there are more
    than 64 lines to keep. The compiled twin copies the kept lines instead of re-encoding."""
    scanned = scan_response(data, max_head)
    if scanned is None:
        return None
    status, reason, version, headers, length, connection, body = scanned
    if not reason:
        return None
    for line in data[:body - 4].split(b"\r\n")[1:]:
        value = line.partition(b":")[2]
        if value[:1] != b" " or value[1:2] in (b" ", b"\t"):
            return None
    if any(token.strip() not in HOP_BY_HOP for token in connection.split(b",")[1:] if token.strip()):
        return None
    kept = forwardable(headers)
    if len(kept) > 64:
        return None
    return status, reason, version, length, connection, body, encode_response_head(status, reason, kept)


def framing(headers: Headers) -> tuple[bool, int | None, bytes, bool]:
    """(chunked, content-length, lower-cased Connection tokens, upgrade requested)."""
    chunked = False
    length = None
    connection = b""
    upgrade = False
    for name, value in headers:
        n = name.lower()
        if n == b"content-length":
            length = int(value)
        elif n == b"transfer-encoding":
            chunked = value.lower().rstrip().endswith(b"chunked")
        elif n == b"connection":
            connection += b"," + value.lower()
        elif n == b"upgrade":
            upgrade = True
    return chunked, length, connection, upgrade and b"upgrade" in connection


def forwardable(headers: Headers, upgrade: bool = False) -> Headers:
    """Headers minus the hop-by-hop ones and those the Connection header names.
    A protocol switch (Upgrade, 101) keeps its Connection and Upgrade headers."""
    if upgrade:
        return headers
    named: tuple[bytes, ...] = ()
    out = []
    for name, value in headers:
        n = name.lower()
        if n in HOP_BY_HOP:
            if n == b"connection":
                named += tuple(t.strip() for t in value.lower().split(b","))
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n.lower() not in named]
    return out


def take_header(headers: Headers, name: bytes) -> tuple[bytes | None, Headers]:
    """Every ``name`` header (``name`` in lower case) removed: (the first value, the others).
    With no such header: (None, the same list)."""
    found = None
    kept = []
    for n, v in headers:
        if n.lower() == name:
            if found is None:
                found = v
        else:
            kept.append((n, v))
    return (found, kept) if found is not None else (None, headers)


def encode_response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """``encode_head`` with the status line of an HTTP/1.1 response."""
    return encode_head(b"HTTP/1.1 %d %s" % (status, reason), headers)


def encode_head(first_line: bytes, headers: Headers) -> bytes:
    parts = [first_line]
    for name, value in headers:
        parts.append(name + b": " + value)
    parts.append(b"\r\n")
    return b"\r\n".join(parts)
