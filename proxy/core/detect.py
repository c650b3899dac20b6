"""Protocol detection on the first bytes of a connection (ref 2.2, 2.3).

Theory of operation: the caller collects the first bytes a client sends and
asks, after each read, what they are. Every answer is one of
``NEED_MORE`` (undecided, read again until the buffer limit or the timeout),
or a final kind. Nothing here consumes bytes: whatever was read is replayed
to the stage that handles the connection.

* TLS: a ClientHello record (type 22, version 3.1 or 3.3, handshake type 1,
  client_version 3.3); the SNI is the first ``host_name`` of the server_name
  extension, or "" when there is none.
* HTTP: ``PRI * HTTP/2.0`` is the HTTP/2 prior-knowledge preface; otherwise
  an HTTP/1 request line (method token, space, target, space, ``HTTP/1.x``).
  Like Linkerd, fewer than 14 bytes (the length of ``GET / HTTP/1.1``) that
  cannot be anything else are "need more"; after the limit, "not HTTP".
"""

from __future__ import annotations

import re

NEED_MORE = "need_more"
NOT_TLS = "not_tls"
HTTP1 = "http/1"
HTTP2 = "http/2"
NOT_HTTP = "not_http"

HTTP_DETECT_LIMIT = 1024  # Linkerd's single detection read (ref 2.3)
TLS_DETECT_LIMIT = 8192  # Linkerd's ClientHello buffer (ref 2.2)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_MIN_HTTP = 14

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"^(" + _TOKEN + rb") (\S+) HTTP/1\.[01]\r?\n")
_METHOD = re.compile(rb"^" + _TOKEN + rb"$")


def _could_become_request_line(line: bytes) -> bool:
    """A prefix of ``METHOD SP target SP HTTP/1.x`` that may still complete."""
    parts = line.split(b" ")
    if not parts[0] or not _METHOD.match(parts[0]) or len(parts) > 3:
        return False
    if len(parts) == 3:
        return b"HTTP/1.1".startswith(parts[2]) or b"HTTP/1.0".startswith(parts[2])
    return True


def detect_http(buf: bytes) -> str:
    if buf.startswith(H2_PREFACE[: len(buf)]) and len(buf) < len(H2_PREFACE):
        return NEED_MORE if len(buf) < _MIN_HTTP else (HTTP2 if buf.startswith(b"PRI * HTTP/2.0") else NEED_MORE)
    if buf.startswith(b"PRI * HTTP/2.0"):
        return HTTP2
    if _REQUEST_LINE.match(buf):
        return HTTP1
    line = buf.split(b"\n", 1)[0]
    if b"\n" not in buf and len(buf) < HTTP_DETECT_LIMIT and _could_become_request_line(line.rstrip(b"\r")):
        return NEED_MORE
    return NOT_HTTP


def client_hello_sni(buf: bytes) -> str | None:
    """The SNI ("" if absent) of a TLS ClientHello; None when ``buf`` is not TLS;
    ``NEED_MORE`` when it may be TLS but is incomplete."""
    n = len(buf)
    if n == 0:
        return NEED_MORE
    if buf[0] != 22:
        return None
    if n < 3:
        return NEED_MORE
    if buf[1] != 3 or buf[2] not in (1, 3):
        return None
    if n < 9:
        return NEED_MORE
    if buf[5] != 1 or buf[6] != 0:  # handshake type ClientHello; 24-bit length, top byte 0
        return None
    if n < 11:
        return NEED_MORE
    if buf[9] != 3 or buf[10] != 3:
        return None
    record_len = int.from_bytes(buf[3:5], "big")
    end = 5 + record_len
    pos = 11 + 32  # client_version, random
    try:
        pos = _skip_vec(buf, pos, 1, end)  # session id
        pos = _skip_vec(buf, pos, 2, end)  # cipher suites
        pos = _skip_vec(buf, pos, 1, end)  # compression methods
        if pos == end:
            return ""
        ext_end = pos + 2 + _need(buf, pos, 2, end)
        pos += 2
        while pos + 4 <= ext_end:
            ext_type = int.from_bytes(buf[pos:pos + 2], "big")
            ext_len = _need(buf, pos + 2, 2, end)
            body = pos + 4
            if ext_type == 0:
                list_len = _need(buf, body, 2, end)
                p = body + 2
                while p < body + 2 + list_len:
                    name_type = _need(buf, p, 1, end)
                    name_len = _need(buf, p + 1, 2, end)
                    if p + 3 + name_len > min(n, end):
                        raise _Incomplete
                    if name_type == 0:
                        name = buf[p + 3:p + 3 + name_len]
                        try:
                            return name.decode("ascii")
                        except UnicodeDecodeError:
                            return ""
                    p += 3 + name_len
                return ""
            pos = body + ext_len
        if ext_end > n:
            raise _Incomplete
        return ""
    except _Incomplete:
        return NEED_MORE if n < TLS_DETECT_LIMIT else None
    except _Malformed:
        return None


class _Incomplete(Exception):
    pass


class _Malformed(Exception):
    pass


def _need(buf: bytes, pos: int, size: int, end: int) -> int:
    if pos + size > end:
        raise _Malformed
    if pos + size > len(buf):
        raise _Incomplete
    return int.from_bytes(buf[pos:pos + size], "big")


def _skip_vec(buf: bytes, pos: int, len_size: int, end: int) -> int:
    length = _need(buf, pos, len_size, end)
    if pos + len_size + length > end:
        raise _Malformed
    return pos + len_size + length
