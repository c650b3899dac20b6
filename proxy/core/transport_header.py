"""The ``transport.l5d.io/v1`` header (ref 3.7), sans-IO.

A meshed client that connects to a peer's inbound port directly (4143) writes, right
after the TLS handshake and before any application byte:

    b"transport.l5d.io/v1\\r\\n\\r\\n"   23 bytes
    u32 big-endian N
    N bytes of protobuf  Header { int32 port = 1; string name = 2; SessionProtocol session_protocol = 3; }
                         SessionProtocol { oneof kind { Http1 http1 = 1; Http2 http2 = 2; } }  (empty messages)

``decode`` takes the first bytes of the connection and answers NEED_MORE, a Header and the
bytes that follow it, or raises ValueError for an invalid header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PREFACE = b"transport.l5d.io/v1\r\n\r\n"
ALPN = "transport.l5d.io/v1"
MAX_HEADER = 64 * 1024  # Linkerd's read buffer for the header
NEED_MORE = "need_more"
HTTP1 = "http1"
HTTP2 = "http2"


@dataclass(frozen=True, slots=True)
class Header:
    port: int
    name: str = ""  # a gateway target when set; "" for a local one
    protocol: str = ""  # "", "http1" or "http2"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in transport header")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long in transport header")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def decode(buf: bytes) -> tuple[Header, bytes] | str:
    if len(buf) < len(PREFACE):
        if PREFACE.startswith(buf):
            return NEED_MORE
        raise ValueError("no transport header")
    if not buf.startswith(PREFACE):
        raise ValueError("no transport header")
    if len(buf) < len(PREFACE) + 4:
        return NEED_MORE
    (length,) = struct.unpack_from("!I", buf, len(PREFACE))
    if length > MAX_HEADER:
        raise ValueError(f"transport header of {length} bytes is larger than {MAX_HEADER}")
    start = len(PREFACE) + 4
    if len(buf) < start + length:
        return NEED_MORE
    msg = buf[start:start + length]
    port, name, protocol = 0, "", ""
    pos = 0
    while pos < len(msg):
        key, pos = _varint(msg, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(msg, pos)
            if field == 1:
                port = value
        elif wire == 2:
            size, pos = _varint(msg, pos)
            data = msg[pos:pos + size]
            if len(data) != size:
                raise ValueError("truncated field in transport header")
            pos += size
            if field == 2:
                name = data.decode("utf-8")
            elif field == 3:
                inner = 0
                while inner < len(data):
                    k, inner = _varint(data, inner)
                    f, w = k >> 3, k & 7
                    if w != 2:
                        raise ValueError("unexpected session protocol encoding")
                    n, inner = _varint(data, inner)
                    inner += n
                    protocol = {1: HTTP1, 2: HTTP2}.get(f, protocol)
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire} in transport header")
    if not 1 <= port <= 65535:
        raise ValueError(f"transport header port {port} is out of range")
    return Header(port, name, protocol), buf[start + length:]


def encode(header: Header) -> bytes:
    msg = b"\x08" + _encode_varint(header.port)
    if header.name:
        raw = header.name.encode()
        msg += b"\x12" + _encode_varint(len(raw)) + raw
    if header.protocol:
        inner = b"\x0a\x00" if header.protocol == HTTP1 else b"\x12\x00"
        msg += b"\x1a" + _encode_varint(len(inner)) + inner
    return PREFACE + struct.pack("!I", len(msg)) + msg
