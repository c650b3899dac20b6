"""A tiny protobuf wire codec: the few control-plane messages as plain dataclasses.

Theory of operation: the runtime speaks to the identity service and the SPIRE
agent without generated code. A message is a frozen dataclass whose fields
carry their protobuf number and kind in ``pb(...)`` metadata; ``encode()`` and
``decode()`` walk that schema once. Only the wire types proto3 uses exist here:
varint (0), fixed64 (1), length-delimited (2) and fixed32 (5). Encoding follows
proto3: scalar fields at their default value are not written, repeated numeric
fields are packed, a map is a repeated entry message ``{key = 1, value = 2}``.
Decoding accepts packed and unpacked repeated numbers, skips unknown fields, and
lets the last occurrence of a scalar win, as every protobuf library does.

No I/O and no asyncio here: bytes in, dataclasses out. The ``.proto`` files in
``proto/`` are the source of truth for names and field numbers; the tests
compile them with protoc and check this codec against the real library.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

# Wire types (protobuf encoding guide).
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
_MASK64 = (1 << 64) - 1


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


# ---------------------------------------------------------------- primitives

def encode_varint(value: int) -> bytes:
    """Unsigned LEB128; a negative value is its 64-bit two's complement (10 bytes)."""
    value &= _MASK64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Returns (value, next position); at most 10 bytes, as the format allows."""
    result = shift = 0
    end = len(buf)
    for i in range(pos, min(pos + 10, end)):
        byte = buf[i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, i + 1
        shift += 7
    raise DecodeError("truncated or overlong varint")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value & (1 << 63) else value


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & (1 << 31) else value


def key(number: int, wire_type: int) -> bytes:
    return encode_varint((number << 3) | wire_type)


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yields (field number, wire type, value): an int for varint and fixed
    types, bytes for length-delimited ones."""
    view = memoryview(buf)
    pos, end = 0, len(view)
    while pos < end:
        tag, pos = decode_varint(view, pos)
        number, wire_type = tag >> 3, tag & 7
        value: Any
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == VARINT:
            value, pos = decode_varint(view, pos)
        elif wire_type == FIXED64:
            if pos + 8 > end:
                raise DecodeError("truncated fixed64")
            value = int.from_bytes(view[pos:pos + 8], "little")
            pos += 8
        elif wire_type == LEN:
            length, pos = decode_varint(view, pos)
            if pos + length > end:
                raise DecodeError(f"field {number}: length {length} runs past the end")
            value = bytes(view[pos:pos + length])
            pos += length
        elif wire_type == FIXED32:
            if pos + 4 > end:
                raise DecodeError("truncated fixed32")
            value = int.from_bytes(view[pos:pos + 4], "little")
            pos += 4
        else:  # 3 and 4 are proto2 groups, which no message of ours has
            raise DecodeError(f"field {number}: unsupported wire type {wire_type}")
        yield number, wire_type, value


# ---------------------------------------------------------------- schema

# kind -> (wire type, scalar encoder to the raw value, raw value decoder)
_VARINT_KINDS = {"int64", "uint64", "int32", "uint32", "bool", "enum", "sint32", "sint64"}
_FIXED_KINDS = {"fixed64": FIXED64, "sfixed64": FIXED64, "double": FIXED64, "fixed32": FIXED32, "sfixed32": FIXED32, "float": FIXED32}
_DEFAULTS: dict[str, Any] = {"string": "", "bytes": b"", "bool": False, "double": 0.0, "float": 0.0}


def pb(number: int, kind: str, *, repeated: bool = False, message: Any = None, map_of: tuple[str, str] | None = None) -> Any:
    """A dataclass field with its protobuf number and kind.

    kind: one of string, bytes, bool, int32, int64, uint32, uint64, sint32,
    sint64, enum, fixed32, fixed64, sfixed32, sfixed64, float, double,
    message (then ``message=`` names the class, or a zero-argument callable
    returning it, for self-references) or map (then ``map_of=(key kind, value kind)``).
    """
    meta = {"pb": (number, kind, repeated, message, map_of)}
    if kind == "map":
        return field(default_factory=dict, metadata=meta)
    if repeated:
        return field(default_factory=tuple, metadata=meta)
    if kind == "message":
        return field(default=None, metadata=meta)
    return field(default=_DEFAULTS.get(kind, 0), metadata=meta)


def _is_default(kind: str, value: Any) -> bool:
    return value == _DEFAULTS.get(kind, 0)


def _scalar_raw(kind: str, value: Any) -> int:
    """The integer written for a numeric scalar (varint or fixed)."""
    if kind == "bool":
        return 1 if value else 0
    if kind in ("sint32", "sint64"):
        bits = 32 if kind == "sint32" else 64
        return ((value << 1) ^ (value >> (bits - 1))) & ((1 << bits) - 1)
    if kind == "double":
        return int.from_bytes(struct.pack("<d", value), "little")
    if kind == "float":
        return int.from_bytes(struct.pack("<f", value), "little")
    return int(value)


def _scalar_value(kind: str, raw: int) -> Any:
    if kind == "bool":
        return raw != 0
    if kind in ("int64", "sfixed64"):
        return _signed64(raw)
    if kind in ("int32", "enum", "sfixed32"):
        return _signed32(raw)
    if kind == "uint32":
        return raw & 0xFFFFFFFF
    if kind in ("sint32", "sint64"):
        return (raw >> 1) ^ -(raw & 1)
    if kind == "double":
        return struct.unpack("<d", raw.to_bytes(8, "little"))[0]
    if kind == "float":
        return struct.unpack("<f", raw.to_bytes(4, "little"))[0]
    return raw


def _fixed_bytes(kind: str, raw: int) -> bytes:
    return raw.to_bytes(8 if _FIXED_KINDS[kind] == FIXED64 else 4, "little")


def _encode_one(number: int, kind: str, value: Any, message: Any) -> bytes:
    if kind == "string":
        data = value.encode()
        return key(number, LEN) + encode_varint(len(data)) + data
    if kind == "bytes":
        return key(number, LEN) + encode_varint(len(value)) + bytes(value)
    if kind == "message":
        data = value.encode()
        return key(number, LEN) + encode_varint(len(data)) + data
    if kind in _FIXED_KINDS:
        return key(number, _FIXED_KINDS[kind]) + _fixed_bytes(kind, _scalar_raw(kind, value))
    if kind in _VARINT_KINDS:
        return key(number, VARINT) + encode_varint(_scalar_raw(kind, value))
    raise TypeError(f"unknown protobuf kind {kind!r}")


def _decode_one(kind: str, wire_type: int, value: Any, message: Any) -> Any:
    if kind in ("string", "bytes", "message"):
        if wire_type != LEN:
            raise DecodeError(f"{kind} field with wire type {wire_type}")
        if kind == "string":
            try:
                return value.decode()
            except UnicodeDecodeError:
                raise DecodeError("string field is not UTF-8") from None
        if kind == "message":
            return _resolve(message).decode(value)
        return value
    expected = _FIXED_KINDS.get(kind, VARINT)
    if wire_type != expected:
        raise DecodeError(f"{kind} field with wire type {wire_type}")
    return _scalar_value(kind, value)


def _resolve(message: Any) -> Any:
    return message if isinstance(message, type) else message()


def _unpack(kind: str, data: bytes) -> list[Any]:
    """A packed repeated numeric field."""
    out = []
    pos, end = 0, len(data)
    wire_type = _FIXED_KINDS.get(kind, VARINT)
    while pos < end:
        if wire_type == VARINT:
            raw, pos = decode_varint(data, pos)
        else:
            size = 8 if wire_type == FIXED64 else 4
            if pos + size > end:
                raise DecodeError("truncated packed field")
            raw = int.from_bytes(data[pos:pos + size], "little")
            pos += size
        out.append(_scalar_value(kind, raw))
    return out


M = TypeVar("M", bound="Message")


class Message:
    """Base of the dataclass messages: ``encode()`` and ``decode(bytes)``."""

    _schema: ClassVar[dict[int, tuple[str, str, bool, Any, Any]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._schema = {}

    @classmethod
    def _fields(cls) -> dict[int, tuple[str, str, bool, Any, Any]]:
        if not cls._schema:
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                number, kind, repeated, message, map_of = f.metadata["pb"]
                cls._schema[number] = (f.name, kind, repeated, message, map_of)
        return cls._schema

    def encode(self) -> bytes:
        out = bytearray()
        for number, (name, kind, repeated, message, map_of) in sorted(self._fields().items()):
            value = getattr(self, name)
            if kind == "map":
                kk, vk = map_of
                for k, v in value.items():
                    entry = _encode_one(1, kk, k, None) + _encode_one(2, vk, v, None)
                    out += key(number, LEN) + encode_varint(len(entry)) + entry
            elif repeated:
                if not value:
                    continue
                if kind in _VARINT_KINDS or kind in _FIXED_KINDS:
                    packed = b"".join(
                        encode_varint(_scalar_raw(kind, v)) if kind in _VARINT_KINDS else _fixed_bytes(kind, _scalar_raw(kind, v))
                        for v in value
                    )
                    out += key(number, LEN) + encode_varint(len(packed)) + packed
                else:
                    for v in value:
                        out += _encode_one(number, kind, v, message)
            elif kind == "message":
                if value is not None:
                    out += _encode_one(number, kind, value, message)
            elif not _is_default(kind, value):
                out += _encode_one(number, kind, value, message)
        return bytes(out)

    @classmethod
    def decode(cls: type[M], data: bytes | memoryview) -> M:
        schema = cls._fields()
        values: dict[str, Any] = {}
        lists: dict[str, list[Any]] = {}
        for number, wire_type, raw in iter_fields(data):
            spec = schema.get(number)
            if spec is None:
                continue  # unknown field: newer peers may send more than we know
            name, kind, repeated, message, map_of = spec
            if kind == "map":
                if wire_type != LEN:
                    raise DecodeError(f"map field {name} with wire type {wire_type}")
                kk, vk = map_of
                k: Any = _DEFAULTS.get(kk, 0)
                v: Any = _DEFAULTS.get(vk, 0)
                for n, wt, r in iter_fields(raw):
                    if n == 1:
                        k = _decode_one(kk, wt, r, None)
                    elif n == 2:
                        v = _decode_one(vk, wt, r, None)
                values.setdefault(name, {})[k] = v
            elif repeated:
                items = lists.setdefault(name, [])
                if wire_type == LEN and kind not in ("string", "bytes", "message"):
                    items.extend(_unpack(kind, raw))
                else:
                    items.append(_decode_one(kind, wire_type, raw, message))
            elif kind == "message" and name in values and values[name] is not None:
                # Repeated occurrences of a singular message merge (protobuf rule); we
                # keep it simple and correct for our messages by merging field-wise.
                merged = _resolve(message).decode(values[name].encode() + _decode_raw_bytes(wire_type, raw))
                values[name] = merged
            else:
                values[name] = _decode_one(kind, wire_type, raw, message)
        for name, items in lists.items():
            values[name] = tuple(items)
        return cls(**values)


def _decode_raw_bytes(wire_type: int, raw: Any) -> bytes:
    if wire_type != LEN:
        raise DecodeError("message field with a non length-delimited wire type")
    return raw


# ---------------------------------------------------------------- messages
# google/protobuf/timestamp.proto

@dataclass(frozen=True, slots=True)
class Timestamp(Message):
    seconds: int = pb(1, "int64")
    nanos: int = pb(2, "int32")

    @classmethod
    def from_epoch(cls, t: float) -> Timestamp:
        seconds = int(t // 1)
        return cls(seconds, int(round((t - seconds) * 1e9)) % 1_000_000_000)

    def to_epoch(self) -> float:
        return self.seconds + self.nanos / 1e9


# io.linkerd.proxy.identity (proto/identity.proto)

@dataclass(frozen=True, slots=True)
class CertifyRequest(Message):
    identity: str = pb(1, "string")
    token: bytes = pb(2, "bytes")
    certificate_signing_request: bytes = pb(3, "bytes")  # DER, though the proto comment says PEM


@dataclass(frozen=True, slots=True)
class CertifyResponse(Message):
    leaf_certificate: bytes = pb(1, "bytes")  # DER
    intermediate_certificates: tuple[bytes, ...] = pb(2, "bytes", repeated=True)  # DER each
    valid_until: Timestamp | None = pb(3, "message", message=Timestamp)


CERTIFY_METHOD = "/io.linkerd.proxy.identity.Identity/Certify"


# SPIFFE Workload API (proto/workload.proto; the file has no package)

@dataclass(frozen=True, slots=True)
class X509SVIDRequest(Message):
    pass


@dataclass(frozen=True, slots=True)
class X509SVID(Message):
    spiffe_id: str = pb(1, "string")
    x509_svid: bytes = pb(2, "bytes")  # DER chain, leaf first
    x509_svid_key: bytes = pb(3, "bytes")  # PKCS#8 DER
    bundle: bytes = pb(4, "bytes")  # DER roots of the trust domain, concatenated
    hint: str = pb(5, "string")


@dataclass(frozen=True, slots=True)
class X509SVIDResponse(Message):
    svids: tuple[X509SVID, ...] = pb(1, "message", repeated=True, message=X509SVID)
    crl: tuple[bytes, ...] = pb(2, "bytes", repeated=True)
    federated_bundles: dict[str, bytes] = pb(3, "map", map_of=("string", "bytes"))


FETCH_X509_SVID_METHOD = "/SpiffeWorkloadAPI/FetchX509SVID"
# The agent refuses calls without this header (SPIFFE Workload API, "security header").
WORKLOAD_API_METADATA = {"workload.spiffe.io": "true"}
