"""A lean HTTP/2 connection (RFC 9113) for the proxy: bytes in, events out, no I/O.

Theory of operation
-------------------
``Connection`` is one end of one HTTP/2 connection, client or server side.
``receive_data(bytes)`` parses frames and returns events; the ``send_*``
methods queue frames, and ``data_to_send()`` hands over everything queued, so
the caller decides when to write (proxy/http/h2.py writes once per read).

It replaces the ``h2`` library on the proxy's hot path, and keeps the subset of
h2's API the proxy used (same method names and meanings), so the glue reads the
same. What it leaves out, on purpose:

* No per-stream state machine object: a stream is a small record (windows,
  which side has ended, whether the response head came), and the checks that
  matter are made where a frame arrives.
* The connection's receive window is the caller's business: DATA lowers
  ``inbound_flow_control_window`` and ``increment_flow_control_window`` raises
  it. A stream's receive window is reopened by ``acknowledge_received_data``
  once half of its initial size is owed, so a steady stream costs one
  WINDOW_UPDATE per half window, not one per DATA frame.
* No server push (the client side disables it), no priorities (PRIORITY is
  read and ignored, as RFC 9113 5.3.2 allows).
* A received GOAWAY does not end the connection: streams up to its last id may
  finish (RFC 9113 6.8); the caller decides what to refuse.
* Requests are validated on the server side (``validate_requests``), the rules
  of RFC 9113 8.1.1 / 8.2 / 8.3.1, including a body that disagrees with its
  ``content-length``. A malformed request is a *stream* error: it is reset
  with PROTOCOL_ERROR and never reported, and the connection goes on. Responses
  are not validated: the proxy relays them and the client checks them.

Repeats are cheap. Peers send the same few header blocks again and again, so
received blocks are kept with their decoded fields (and the server's verdict
on them), replayed against the HPACK table rather than decoded again
(``_decode``); the encoder keeps the blocks it made the same way. Events share
one fields tuple per repeated block, which the glue can key its own work on.

Errors. A connection error queues GOAWAY with its code and raises
``ProtocolError``: the caller sends what is queued and closes. A stream error
queues RST_STREAM and reports ``StreamReset`` for that stream. Sending on a
stream that is gone raises ``StreamClosedError`` (a ``ProtocolError``).

This module is compiled as a Cython twin (setup.py COMPILED_TWINS, ``h2core``).
"""

from __future__ import annotations

import re
from struct import Struct
from typing import Any

from proxy.native import load

hpack, _HPACK_KIND = load("hpack", "proxy.core.hpack")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9113 6.9.2: every window starts at 65,535 octets.
DEFAULT_WINDOW = 65535
# RFC 9113 6.5.2: frames start at most 16 KiB; SETTINGS_MAX_FRAME_SIZE ranges up to 2**24 - 1.
DEFAULT_MAX_FRAME_SIZE = 16384
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
# RFC 9113 6.9.1: a window may not exceed 2**31 - 1.
MAX_WINDOW = (1 << 31) - 1
MAX_STREAM_ID = (1 << 31) - 1
# What a server side allows a client at once unless configured otherwise; the
# h2 library's default, which the proxy advertised before this module existed.
DEFAULT_MAX_CONCURRENT_STREAMS = 100
# Largest header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE we advertise):
# 64 KiB, the h2 library's default and the proxy's HTTP/1 head limit too.
DEFAULT_MAX_HEADER_LIST_SIZE = 65536
# A header block split over CONTINUATION frames may grow to this much before
# the connection is ended (CONTINUATION floods cost memory, RFC 9113 10.5).
MAX_HEADER_BLOCK = 4 * DEFAULT_MAX_HEADER_LIST_SIZE
# Received header blocks remembered with their fields (see Connection._decode):
# a peer repeats a few blocks (the same request head, the same response head);
# more distinct ones than this and the cache is cleared whole. Larger blocks
# are decoded each time: they rarely repeat exactly.
BLOCK_CACHE_SIZE = 32
BLOCK_CACHE_MAX_LEN = 1024

# Frame types (RFC 9113 6) and flags.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Settings (RFC 9113 6.5.2).
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

# Error codes (RFC 9113 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD
ERROR_NAMES = {
    NO_ERROR: "NO_ERROR", PROTOCOL_ERROR: "PROTOCOL_ERROR", INTERNAL_ERROR: "INTERNAL_ERROR",
    FLOW_CONTROL_ERROR: "FLOW_CONTROL_ERROR", SETTINGS_TIMEOUT: "SETTINGS_TIMEOUT", STREAM_CLOSED: "STREAM_CLOSED",
    FRAME_SIZE_ERROR: "FRAME_SIZE_ERROR", REFUSED_STREAM: "REFUSED_STREAM", CANCEL: "CANCEL",
    COMPRESSION_ERROR: "COMPRESSION_ERROR", CONNECT_ERROR: "CONNECT_ERROR", ENHANCE_YOUR_CALM: "ENHANCE_YOUR_CALM",
    INADEQUATE_SECURITY: "INADEQUATE_SECURITY", HTTP_1_1_REQUIRED: "HTTP_1_1_REQUIRED",
}

# A frame header: 24-bit length (as 16 + 8 bits), type, flags, stream id.
_HEADER = Struct(">HBBBL")
_U32 = Struct(">L")
_SETTING = Struct(">HL")
_GOAWAY = Struct(">LL")
_RST = Struct(">HBBBLL")  # a whole RST_STREAM or WINDOW_UPDATE frame
_SETTINGS_ACK = _HEADER.pack(0, 0, SETTINGS, ACK, 0)


class ProtocolError(Exception):
    """The peer broke the protocol, or a send the connection's state does not allow."""


class StreamClosedError(ProtocolError):
    """A send on a stream that is closed (or was never opened)."""


class FlowControlError(ProtocolError):
    """A send larger than the window allows."""


class TooManyStreamsError(ProtocolError):
    """The peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached."""


class NoAvailableStreamIDError(ProtocolError):
    """Every client stream id of this connection is used (2**31 - 1)."""


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# ---------------------------------------------------------------- events
# Field names as in the h2 library, so code written against it reads the same;
# ``stream_ended`` is a bool here, and END_STREAM is reported only through it.
# ``headers`` is a tuple of (name, value) tuples, shared with the connection's
# cache of header blocks: read it, never change it.


class RequestReceived:
    __slots__ = ("stream_id", "headers", "stream_ended")

    def __init__(self, stream_id: int, headers: tuple[Any, ...], stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended


class ResponseReceived:
    __slots__ = ("stream_id", "headers", "stream_ended")

    def __init__(self, stream_id: int, headers: tuple[Any, ...], stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended


class InformationalResponseReceived:
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: tuple[Any, ...]) -> None:
        self.stream_id = stream_id
        self.headers = headers


class TrailersReceived:
    """Trailers always end their stream."""

    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: tuple[Any, ...]) -> None:
        self.stream_id = stream_id
        self.headers = headers


class DataReceived:
    __slots__ = ("stream_id", "data", "flow_controlled_length", "stream_ended")

    def __init__(self, stream_id: int, data: bytes, flow_controlled_length: int, stream_ended: bool) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length  # with padding: what the windows count
        self.stream_ended = stream_ended


class StreamReset:
    """The peer reset the stream, or this end did for a stream error it found."""

    __slots__ = ("stream_id", "error_code", "remote_reset")

    def __init__(self, stream_id: int, error_code: int, remote_reset: bool = True) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote_reset = remote_reset


class WindowUpdated:
    __slots__ = ("stream_id", "delta")

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id  # 0: the connection
        self.delta = delta


class RemoteSettingsChanged:
    __slots__ = ("changed_settings",)

    def __init__(self, changed_settings: dict[int, int]) -> None:
        self.changed_settings = changed_settings


class PingAckReceived:
    __slots__ = ("ping_data",)

    def __init__(self, ping_data: bytes) -> None:
        self.ping_data = ping_data


class ConnectionTerminated:
    """GOAWAY received: no stream above ``last_stream_id`` was or will be processed."""

    __slots__ = ("error_code", "last_stream_id", "additional_data")

    def __init__(self, error_code: int, last_stream_id: int, additional_data: bytes | None) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data


# ---------------------------------------------------------------- frames


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One serialized frame."""
    length = len(payload)
    return _HEADER.pack(length >> 8, length & 0xFF, ftype, flags, stream_id) + payload


def goaway_frame(last_stream_id: int, error_code: int = NO_ERROR, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, error_code) + debug)


# ---------------------------------------------------------------- request checks (RFC 9113 8.1.1, 8.2, 8.3.1)

_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))
_CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
# RFC 9113 8.2.1: no NUL, CR or LF anywhere in a value, and no whitespace at either end.
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$").search
# A name is lowercase token characters (RFC 9110 5.6.2), checked in one match.
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z").match


def request_problem(headers: Any, trailers: bool = False) -> tuple[str | None, int]:
    """(why the request head or trailers are malformed or None, content-length or -1)."""
    regular = False
    seen: set[bytes] = set()
    method = authority = host = None
    has_scheme = has_path = False
    length = -1
    for field in headers:
        name = field[0]
        value = field[1]
        if name[:1] == b":":
            if trailers:
                return "pseudo-header in trailers", -1
            if regular:
                return "pseudo-header after a regular field", -1
            if name not in _REQUEST_PSEUDO:
                return f"pseudo-header {name!r} not allowed in a request", -1
            if name in seen:
                return f"pseudo-header {name!r} repeated", -1
            seen.add(name)
            if name == b":method":
                method = value
            elif name == b":path":
                if not value:
                    return "empty :path", -1
                has_path = True
            elif name == b":scheme":
                has_scheme = True
            else:
                authority = value
        else:
            regular = True
            if _NAME(name) is None:
                return f"field name {name!r} is not a lowercase token", -1
            if name in _CONNECTION_SPECIFIC:
                return f"connection-specific field {name!r}", -1
            if name == b"te" and value != b"trailers":
                return "te other than trailers", -1
            if name == b"host":
                host = value
            elif name == b"content-length":
                try:
                    n = int(value)
                except ValueError:
                    return "content-length is not a number", -1
                if n < 0 or (length >= 0 and n != length):
                    return "bad content-length", -1
                length = n
        if value and _BAD_VALUE(value) is not None:
            return f"field {name!r} has a forbidden character or surrounding whitespace", -1
    if trailers:
        return None, -1
    if method is None:
        return "no :method", -1
    if method == b"CONNECT":
        if authority is None or has_scheme or has_path:
            return "CONNECT needs :authority and neither :scheme nor :path", -1
    elif not has_scheme or not has_path:
        return "no :scheme or :path", -1
    if host is not None and authority is not None and host != authority:
        return "host and :authority differ", -1
    return None, length


# ---------------------------------------------------------------- the connection


class _Stream:
    """What the connection keeps of one open stream."""

    __slots__ = ("send_window", "recv_window", "unacked", "local_closed", "remote_closed", "got_head", "inbound",
                 "expected")

    def __init__(self, send_window: int, recv_window: int, inbound: bool) -> None:
        self.send_window = send_window  # what the peer lets us send
        self.recv_window = recv_window  # what we let the peer send
        self.unacked = 0  # received, handed on, not yet given back by WINDOW_UPDATE
        self.local_closed = False  # END_STREAM sent
        self.remote_closed = False  # END_STREAM received
        self.got_head = inbound  # the request (server) or final response head (client) arrived
        self.inbound = inbound  # opened by the peer
        self.expected = -1  # request body octets still due by content-length (-1: unknown)


class Connection:
    """One end of an HTTP/2 connection. ``client_side`` picks the stream ids and
    what HEADERS mean; ``validate_requests`` checks requests (server side)."""

    def __init__(self, client_side: bool, validate_requests: bool = False) -> None:
        self.client_side = client_side
        self.validate_requests = validate_requests
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder(DEFAULT_MAX_HEADER_LIST_SIZE)
        self.out: list[bytes] = []
        self.buf = b""
        self.preface_due = not client_side  # a server reads the client's preface first
        self.streams: dict[int, _Stream] = {}
        self.open_inbound = 0
        self.open_outbound = 0
        self.next_stream_id = 1 if client_side else 2
        self.highest_inbound_stream_id = 0
        # Our settings, in force once the peer acknowledged them.
        self.local_initial_window = DEFAULT_WINDOW
        self.local_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.local_max_concurrent_streams = MAX_STREAM_ID  # until our SETTINGS with a limit is acknowledged
        self.unacked_settings: list[dict[int, int]] = []
        # The peer's settings.
        self.remote_initial_window = DEFAULT_WINDOW
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.remote_max_concurrent_streams = MAX_STREAM_ID  # RFC 9113 6.5.2: unlimited until it says
        # Connection windows: what we may send, and what the peer may still send us.
        self.outbound_flow_control_window = DEFAULT_WINDOW
        self.inbound_flow_control_window = DEFAULT_WINDOW
        # A header block being continued: (stream id, HEADERS flags, pieces, size).
        self.continued: tuple[int, int, list[bytes], int] | None = None
        # Block -> [decoder generation, fields, request check or None, fields it
        # inserts or None, their size as entries] (see _decode).
        self.blocks: dict[bytes, list[Any]] = {}

    # ------------------------------------------------------------ sending

    def initiate_connection(self, settings: dict[int, int] | None = None) -> None:
        """Queue the preface (client) and our first SETTINGS, with ``settings`` added."""
        if self.client_side:
            self.out.append(PREFACE)
            first = {ENABLE_PUSH: 0, MAX_HEADER_LIST_SIZE: DEFAULT_MAX_HEADER_LIST_SIZE}
        else:
            first = {MAX_CONCURRENT_STREAMS: DEFAULT_MAX_CONCURRENT_STREAMS,
                     MAX_HEADER_LIST_SIZE: DEFAULT_MAX_HEADER_LIST_SIZE}
        if settings:
            first.update(settings)
        self.update_settings(first)

    def update_settings(self, settings: dict[int, int]) -> None:
        """Queue SETTINGS; they apply on this side once acknowledged."""
        payload = b"".join(_SETTING.pack(int(code), value) for code, value in settings.items())
        self.out.append(frame(SETTINGS, 0, 0, payload))
        self.unacked_settings.append({int(code): value for code, value in settings.items()})

    def get_next_available_stream_id(self) -> int:
        sid = self.next_stream_id
        if sid > MAX_STREAM_ID:
            raise NoAvailableStreamIDError("no stream ids left")
        return sid

    def send_headers(self, stream_id: int, headers: Any, end_stream: bool = False) -> None:
        """A header block on ``stream_id``: a new request (client side), a response,
        an informational response, or trailers (with ``end_stream``)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.client_side or stream_id != self.next_stream_id:
                raise StreamClosedError(f"stream {stream_id} is not open")
            if self.open_outbound >= self.remote_max_concurrent_streams:
                raise TooManyStreamsError("the peer's stream limit is reached")
            stream = _Stream(self.remote_initial_window, self.local_initial_window, False)
            self.streams[stream_id] = stream
            self.next_stream_id = stream_id + 2
            self.open_outbound += 1
        elif stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} has ended")
        block = self.encoder.encode(headers)
        flags = END_STREAM if end_stream else 0
        limit = self.max_outbound_frame_size
        size = len(block)
        out = self.out
        if size <= limit:
            out.append(_HEADER.pack(size >> 8, size & 0xFF, HEADERS, flags | END_HEADERS, stream_id))
            out.append(block)
        else:
            out.append(frame(HEADERS, flags, stream_id, block[:limit]))
            for start in range(limit, size, limit):
                last = END_HEADERS if start + limit >= size else 0
                out.append(frame(CONTINUATION, last, stream_id, block[start:start + limit]))
        if end_stream:
            self._local_end(stream_id, stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """One DATA frame: the caller keeps it within ``local_flow_control_window``
        and ``max_outbound_frame_size``."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} is not open for sending")
        size = len(data)
        if size > stream.send_window or size > self.outbound_flow_control_window:
            raise FlowControlError(f"{size} octets do not fit the window of stream {stream_id}")
        if size > self.max_outbound_frame_size:
            raise ProtocolError(f"{size} octets exceed the peer's frame size")
        stream.send_window -= size
        self.outbound_flow_control_window -= size
        out = self.out
        out.append(_HEADER.pack(size >> 8, size & 0xFF, DATA, END_STREAM if end_stream else 0, stream_id))
        if size:
            out.append(data)
        if end_stream:
            self._local_end(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, error_code: int = NO_ERROR) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is not open")
        if stream.inbound:
            self.open_inbound -= 1
        else:
            self.open_outbound -= 1
        self.out.append(_RST.pack(0, 4, RST_STREAM, 0, stream_id, error_code))

    def local_flow_control_window(self, stream_id: int) -> int:
        """How much DATA may be sent on ``stream_id`` now (stream and connection windows)."""
        stream = self.streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is not open")
        window = stream.send_window
        conn = self.outbound_flow_control_window
        return window if window < conn else conn

    def acknowledge_received_data(self, size: int, stream_id: int) -> None:
        """``size`` octets of ``stream_id`` were handed on: give them back to the peer,
        in one WINDOW_UPDATE once half the stream's initial window is owed."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        owed = stream.unacked + size
        if owed * 2 >= self.local_initial_window:
            stream.unacked = 0
            stream.recv_window += owed
            self.out.append(_RST.pack(0, 4, WINDOW_UPDATE, 0, stream_id, owed))
        else:
            stream.unacked = owed

    def increment_flow_control_window(self, increment: int, stream_id: int | None = None) -> None:
        """Open the connection's receive window (or a stream's) by ``increment``."""
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            stream.recv_window += increment
        else:
            self.inbound_flow_control_window += increment
        self.out.append(_RST.pack(0, 4, WINDOW_UPDATE, 0, stream_id or 0, increment))

    def ping(self, data: bytes) -> None:
        self.out.append(frame(PING, 0, 0, data))

    def close_connection(self, error_code: int = NO_ERROR) -> None:
        self.out.append(goaway_frame(self.highest_inbound_stream_id, error_code))

    def data_to_send(self) -> bytes:
        out = self.out
        if not out:
            return b""
        self.out = []
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def _local_end(self, stream_id: int, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            self._forget(stream_id, stream)

    def _forget(self, stream_id: int, stream: _Stream) -> None:
        del self.streams[stream_id]
        if stream.inbound:
            self.open_inbound -= 1
        else:
            self.open_outbound -= 1

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Any]:
        """Parse what arrived; the events it makes, in order. ``ProtocolError`` on
        a connection error (a GOAWAY saying why is then queued)."""
        events: list[Any] = []
        buf = self.buf + data if self.buf else data
        pos = 0
        end = len(buf)
        try:
            if self.preface_due:
                if end < 24:
                    if not PREFACE.startswith(buf):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 preface")
                    self.buf = buf
                    return events
                if buf[:24] != PREFACE:
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 preface")
                self.preface_due = False
                pos = 24
            header = _HEADER.unpack_from
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = header(buf, pos)
                length = (hi << 8) | lo
                if length > self.local_max_frame_size:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} octets")
                start = pos + 9
                if end - start < length:
                    break
                pos = start + length
                sid &= MAX_STREAM_ID
                if self.continued is not None and ftype != CONTINUATION:
                    raise _ConnectionError(PROTOCOL_ERROR, "header block interrupted")
                if ftype == DATA:
                    self._receive_data_frame(events, buf, start, pos, flags, sid)
                elif ftype == HEADERS:
                    self._receive_headers(events, buf, start, pos, flags, sid)
                elif ftype == WINDOW_UPDATE:
                    self._receive_window_update(events, buf, start, length, sid)
                elif ftype == RST_STREAM:
                    self._receive_rst(events, buf, start, length, sid)
                elif ftype == SETTINGS:
                    self._receive_settings(events, buf, start, length, flags, sid)
                elif ftype == PING:
                    if length != 8:
                        raise _ConnectionError(FRAME_SIZE_ERROR, "PING is not 8 octets")
                    if sid:
                        raise _ConnectionError(PROTOCOL_ERROR, "PING on a stream")
                    if flags & ACK:
                        events.append(PingAckReceived(buf[start:pos]))
                    else:
                        self.out.append(frame(PING, ACK, 0, buf[start:pos]))
                elif ftype == GOAWAY:
                    if sid or length < 8:
                        raise _ConnectionError(PROTOCOL_ERROR, "malformed GOAWAY")
                    last, code = _GOAWAY.unpack_from(buf, start)
                    events.append(ConnectionTerminated(code, last & MAX_STREAM_ID, buf[start + 8:pos] or None))
                elif ftype == CONTINUATION:
                    self._receive_continuation(events, buf, start, pos, flags, sid)
                elif ftype == PRIORITY:
                    if not sid:
                        raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
                    if length != 5:
                        self._stream_error(events, sid, FRAME_SIZE_ERROR)
                elif ftype == PUSH_PROMISE:
                    raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE, but push is off")
                # Unknown frame types are ignored (RFC 9113 4.1).
        except _ConnectionError as exc:
            self.buf = b""
            self.out.append(goaway_frame(self.highest_inbound_stream_id, exc.code, str(exc).encode()[:256]))
            raise ProtocolError(f"{ERROR_NAMES.get(exc.code, exc.code)}: {exc}") from None
        self.buf = buf[pos:] if pos < end else b""
        return events

    def _idle(self, sid: int) -> bool:
        """Whether ``sid`` was never opened (frames on it are a connection error)."""
        if (sid & 1) == (1 if self.client_side else 0):  # ours
            return sid >= self.next_stream_id
        return sid > self.highest_inbound_stream_id

    def _stream_error(self, events: list[Any], sid: int, code: int) -> None:
        """Reset the stream for a frame it cannot take, and tell the caller."""
        stream = self.streams.pop(sid, None)
        if stream is not None:
            if stream.inbound:
                self.open_inbound -= 1
            else:
                self.open_outbound -= 1
            events.append(StreamReset(sid, code, False))
        self.out.append(_RST.pack(0, 4, RST_STREAM, 0, sid, code))

    def _remote_end(self, sid: int, stream: _Stream) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            self._forget(sid, stream)

    def _receive_data_frame(self, events: list[Any], buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "DATA on stream 0")
        length = end - start
        # Every DATA counts against the connection window, even on a closed stream (RFC 9113 6.9).
        window = self.inbound_flow_control_window - length
        if window < 0:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window exceeded")
        self.inbound_flow_control_window = window
        if flags & PADDED:
            if not length:
                raise _ConnectionError(FRAME_SIZE_ERROR, "padded DATA without a pad length")
            pad = buf[start]
            start += 1
            if pad > end - start:
                raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
            end -= pad
        stream = self.streams.get(sid)
        if stream is None:
            if self._idle(sid):
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # closed, maybe reset by us before it arrived: ignored (RFC 9113 5.1)
        if stream.remote_closed or not stream.got_head:
            self._stream_error(events, sid, STREAM_CLOSED if stream.remote_closed else PROTOCOL_ERROR)
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            self._stream_error(events, sid, FLOW_CONTROL_ERROR)
            return
        ended = (flags & END_STREAM) != 0
        expected = stream.expected
        if expected >= 0:
            expected -= end - start
            stream.expected = expected
            if expected < 0 or (ended and expected):
                self._stream_error(events, sid, PROTOCOL_ERROR)  # body and content-length disagree (RFC 9113 8.1.1)
                return
        if ended:
            self._remote_end(sid, stream)
        events.append(DataReceived(sid, buf[start:end], length, ended))

    def _receive_headers(self, events: list[Any], buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & PADDED:
            if start >= end:
                raise _ConnectionError(FRAME_SIZE_ERROR, "padded HEADERS without a pad length")
            pad = buf[start]
            start += 1
            if pad > end - start:
                raise _ConnectionError(PROTOCOL_ERROR, "padding longer than the frame")
            end -= pad
        if flags & PRIORITY_FLAG:
            start += 5
            if start > end:
                raise _ConnectionError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
        if flags & END_HEADERS:
            self._header_block(events, sid, flags, buf[start:end])
        else:
            self.continued = (sid, flags, [buf[start:end]], end - start)

    def _receive_continuation(self, events: list[Any], buf: bytes, start: int, end: int, flags: int, sid: int) -> None:
        continued = self.continued
        if continued is None or continued[0] != sid:
            raise _ConnectionError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        _, first_flags, pieces, size = continued
        pieces.append(buf[start:end])
        size += end - start
        if size > MAX_HEADER_BLOCK:
            raise _ConnectionError(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self.continued = None
            self._header_block(events, sid, first_flags, b"".join(pieces))
        else:
            self.continued = (sid, first_flags, pieces, size)

    def _decode(self, block: bytes) -> tuple[tuple[Any, ...], list[Any] | None]:
        """The fields of ``block`` (a tuple: events may share it), and its cache entry if it has one.

        Peers repeat a few blocks (one client's request head, one server's
        response head), so blocks are remembered with their fields and, on the
        server side, with the verdict of the request checks. A block that read
        no dynamic table entry decodes the same whatever the table holds: a
        repeat replays its insertions (a server that indexes every response
        field and never refers to them, as nginx does). A block that read the
        table decodes the same only while the table is unchanged (its
        generation), so only those that changed nothing are kept."""
        decoder = self.decoder
        entry = self.blocks.get(block)
        if entry is not None:
            inserts = entry[3]
            if inserts is not None:
                if inserts:
                    decoder.replay(inserts, entry[4])
                return entry[1], entry
            if entry[0] == decoder.generation:
                return entry[1], entry
        generation = decoder.generation
        headers = tuple(decoder.decode(block))
        if len(block) > BLOCK_CACHE_MAX_LEN:
            return headers, None
        size = 0
        if not decoder.read_table:
            inserts = decoder.inserted
            for field in inserts:
                size += len(field[0]) + len(field[1]) + hpack.ENTRY_OVERHEAD
        elif decoder.generation == generation:
            inserts = None
        else:
            return headers, None
        blocks = self.blocks
        if len(blocks) >= BLOCK_CACHE_SIZE:
            blocks.clear()
        entry = blocks[block] = [generation, headers, None, inserts, size]
        return headers, entry

    def _header_block(self, events: list[Any], sid: int, flags: int, block: bytes) -> None:
        # Decoded before anything else: the HPACK table must see every block.
        oversized = False
        entry = None
        try:
            headers, entry = self._decode(block)
        except hpack.HeaderListTooLarge:
            oversized = True
            headers = ()
        except hpack.HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, str(exc)) from None
        ended = (flags & END_STREAM) != 0
        stream = self.streams.get(sid)
        if self.client_side:
            if stream is None:
                if self._idle(sid) or not sid & 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on idle stream {sid}")
                return  # closed stream
            if stream.remote_closed:
                self._stream_error(events, sid, STREAM_CLOSED)
                return
            if oversized:
                self._stream_error(events, sid, PROTOCOL_ERROR)
                return
            if stream.got_head:
                if not ended:
                    self._stream_error(events, sid, PROTOCOL_ERROR)  # trailers must end the stream
                    return
                self._remote_end(sid, stream)
                events.append(TrailersReceived(sid, headers))
                return
            status = headers[0][1] if headers and headers[0][0] == b":status" else b""
            if status[:1] == b"1" and len(status) == 3:
                if ended:
                    self._stream_error(events, sid, PROTOCOL_ERROR)
                    return
                events.append(InformationalResponseReceived(sid, headers))
                return
            stream.got_head = True
            if ended:
                self._remote_end(sid, stream)
            events.append(ResponseReceived(sid, headers, ended))
            return
        # Server side.
        if stream is None:
            if not sid & 1:
                raise _ConnectionError(PROTOCOL_ERROR, f"client opened even stream {sid}")
            if sid <= self.highest_inbound_stream_id:
                return  # a stream we closed or reset: its late frames are ignored (RFC 9113 5.1)
            self.highest_inbound_stream_id = sid
            if oversized:
                self.out.append(_RST.pack(0, 4, RST_STREAM, 0, sid, PROTOCOL_ERROR))
                return
            if self.open_inbound >= self.local_max_concurrent_streams:
                self.out.append(_RST.pack(0, 4, RST_STREAM, 0, sid, REFUSED_STREAM))
                return
            expected = -1
            if self.validate_requests:
                verdict = entry[2] if entry is not None else None
                if verdict is None:
                    verdict = request_problem(headers)
                    if entry is not None:
                        entry[2] = verdict
                problem, expected = verdict
                if problem is None and ended and expected > 0:
                    problem = "content-length with no body"
                if problem is not None:
                    self.out.append(_RST.pack(0, 4, RST_STREAM, 0, sid, PROTOCOL_ERROR))
                    return
            stream = _Stream(self.remote_initial_window, self.local_initial_window, True)
            stream.expected = expected
            stream.remote_closed = ended
            self.streams[sid] = stream
            self.open_inbound += 1
            events.append(RequestReceived(sid, headers, ended))
            return
        if stream.remote_closed:
            self._stream_error(events, sid, STREAM_CLOSED)
            return
        if not ended or oversized:
            self._stream_error(events, sid, PROTOCOL_ERROR)  # trailers must end the stream
            return
        if self.validate_requests and (request_problem(headers, trailers=True)[0] is not None or stream.expected > 0):
            self._stream_error(events, sid, PROTOCOL_ERROR)
            return
        self._remote_end(sid, stream)
        events.append(TrailersReceived(sid, headers))

    def _receive_rst(self, events: list[Any], buf: bytes, start: int, length: int, sid: int) -> None:
        if length != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "RST_STREAM is not 4 octets")
        if not sid:
            raise _ConnectionError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        stream = self.streams.pop(sid, None)
        if stream is None:
            if self._idle(sid):
                raise _ConnectionError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
            return
        if stream.inbound:
            self.open_inbound -= 1
        else:
            self.open_outbound -= 1
        events.append(StreamReset(sid, _U32.unpack_from(buf, start)[0]))

    def _receive_window_update(self, events: list[Any], buf: bytes, start: int, length: int, sid: int) -> None:
        if length != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE is not 4 octets")
        increment = _U32.unpack_from(buf, start)[0] & MAX_WINDOW
        if not sid:
            if not increment:
                raise _ConnectionError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            window = self.outbound_flow_control_window + increment
            if window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window over 2**31 - 1")
            self.outbound_flow_control_window = window
            events.append(WindowUpdated(0, increment))
            return
        stream = self.streams.get(sid)
        if stream is None:
            return  # closed (or idle: harmless, and ignored as h2 did)
        if not increment:
            self._stream_error(events, sid, PROTOCOL_ERROR)
            return
        window = stream.send_window + increment
        if window > MAX_WINDOW:
            self._stream_error(events, sid, FLOW_CONTROL_ERROR)
            return
        stream.send_window = window
        events.append(WindowUpdated(sid, increment))

    def _receive_settings(self, events: list[Any], buf: bytes, start: int, length: int, flags: int, sid: int) -> None:
        if sid:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if length:
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self.unacked_settings:
                self._apply_local(self.unacked_settings.pop(0))
            return
        if length % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        changed: dict[int, int] = {}
        for offset in range(start, start + length, 6):
            code, value = _SETTING.unpack_from(buf, offset)
            if code == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE over 2**31 - 1")
                delta = value - self.remote_initial_window
                self.remote_initial_window = value
                if delta:
                    for stream in self.streams.values():
                        stream.send_window += delta
                        if stream.send_window > MAX_WINDOW:
                            raise _ConnectionError(FLOW_CONTROL_ERROR, "a stream window over 2**31 - 1")
            elif code == MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    raise _ConnectionError(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self.max_outbound_frame_size = value
            elif code == MAX_CONCURRENT_STREAMS:
                self.remote_max_concurrent_streams = value
            elif code == HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif code == ENABLE_PUSH:
                if value > 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
            changed[code] = value
        self.out.append(_SETTINGS_ACK)
        events.append(RemoteSettingsChanged(changed))

    def _apply_local(self, settings: dict[int, int]) -> None:
        for code, value in settings.items():
            if code == INITIAL_WINDOW_SIZE:
                delta = value - self.local_initial_window
                self.local_initial_window = value
                for stream in self.streams.values():
                    stream.recv_window += delta
            elif code == MAX_FRAME_SIZE:
                self.local_max_frame_size = value
            elif code == MAX_CONCURRENT_STREAMS:
                self.local_max_concurrent_streams = value
            elif code == HEADER_TABLE_SIZE:
                self.decoder.max_allowed_table_size = value
            elif code == MAX_HEADER_LIST_SIZE:
                self.decoder.max_header_list_size = value
                self.blocks.clear()  # their fields were measured against the old limit
