"""Linkerd's destination API: endpoints (``Get``) and service profiles (``GetProfile``).

Theory of operation
-------------------
Three layers; the lower two do no I/O.

* Wire: hand-written decoders for ``Update`` and ``DestinationProfile`` over
  ``protowire.iter_fields`` (names and field numbers: ``proxy/control/proto/
  destination.proto`` and ``net.proto``, from linkerd2-proxy-api). Hand-written,
  not protowire dataclasses, because these messages are made of ``oneof``s whose
  *presence* matters: ``ipv4 = 0`` is still an address and ``registered = GET``
  is the enum's zero, which a dataclass default cannot tell from "absent".

* ``EndpointSet``: the update rules of ref 6.3, as linkerd applies them
  (``api-resolve/src/resolve.rs`` ``mk_update``, ``resolve/src/recover.rs``):
    - an ``add`` or ``remove`` with no valid address is ignored;
    - the first update of a (re)connected stream: ``add`` *replaces* the set
      (a Reset), ``remove`` is ignored (and the next update is still "first");
    - after that, ``add`` upserts (a changed address replaces its endpoint) and
      ``remove`` evicts;
    - ``no_endpoints`` empties the set; ``exists`` says whether the service
      exists at all (False: the caller MAY fall back to DNS);
    - while the stream is down the last set stays in use: the controller's
      contract is that stale results are good until the first new message.

* ``DestinationClient``: one ``GrpcChannel`` (gRPC over HTTP/2, no ALPN; TLS
  with the proxy's identity, plaintext to a loopback controller), one stream per
  watched authority shared by every ``Watch`` of it. A stream that ends or fails
  is re-opened after linkerd's jittered exponential backoff, which starts over
  once a stream has delivered a message. INVALID_ARGUMENT and
  FAILED_PRECONDITION mean "this name cannot be resolved": linkerd does not
  retry them, nor do we (the watch resolves to an empty, non-existent set; a
  profile lookup to "no profile").

Endpoint mapping (``WeightedAddr`` -> ``static.Endpoint``): ``addr`` (IPv4 as a
big-endian fixed32, IPv6 as two big-endian fixed64 halves); ``weight`` (0 means
unset: 1); labels = the set's ``metric_labels`` overlaid by the address's own,
as a sorted tuple; ``zone`` from the ``zone`` label; ``identity`` from
``tls_identity`` (a DNS-like name, or a URI when a ``server_name`` is given: a
URI identity without one means no TLS, as in linkerd ``pb.rs``); ``protocol``
"http2" for the ``h2`` hint, "opaque" for ``opaque``. What ``Endpoint`` has no
field for (the SNI when it differs from the identity, the opaque-transport
port, the authority override) is kept in ``EndpointExtras``, per address.

Profiles: looked up only for targets allowed by
``LINKERD2_PROXY_DESTINATION_PROFILE_SUFFIXES`` (names) and ``..._NETWORKS``
(IPs), as linkerd's ``WithAllowlist``. Every message replaces the whole profile.
Conversion follows linkerd ``service-profiles/src/proto.rs``: routes without a
usable condition are dropped, path regexes are anchored, ``dst_overrides`` of
weight 0 are dropped, an invalid retry budget is no budget.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import ssl
import struct
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from proxy.balance.p2c import Backoff
from proxy.config import Addr
from proxy.control.grpc_client import GrpcChannel, GrpcError, StatusCode, Target, is_loopback
from proxy.control.protowire import (
    FIXED32,
    FIXED64,
    LEN,
    VARINT,
    DecodeError,
    encode_varint,
    iter_fields,
    key,
)
from proxy.discovery.static import Endpoint
from proxy.log import get_logger

log = get_logger("proxy.discovery.destination")

GET_METHOD = "/io.linkerd.proxy.destination.Destination/Get"
GET_PROFILE_METHOD = "/io.linkerd.proxy.destination.Destination/GetProfile"

# linkerd app/src/dst.rs BackoffUnlessInvalidArgument: "address is not resolvable"
# and "unexpected cluster state" end a lookup instead of being retried.
REJECTED_CODES = frozenset({StatusCode.INVALID_ARGUMENT, StatusCode.FAILED_PRECONDITION})

# Ref 1.5 / linkerd app/src/env.rs: the destination client reconnects with the
# inbound connect backoff (100 ms .. 10 s, jitter 0.1) when the controller is on
# loopback and with the outbound one (100 ms .. 60 s) otherwise.
_BACKOFF_DEFAULTS = {"inbound": (0.1, 10.0, 0.1), "outbound": (0.1, 60.0, 0.1)}

# Linkerd's controller sends weight 10000 for every address; the proxy's balancer
# ignores weights. 0 is protobuf's "unset", and must not mean "never chosen".
_UNSET_WEIGHT = 1

_U32 = 0xFFFFFFFF
_DNS_NAME = re.compile(r"(?=.{1,253}\.?$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?", re.I)


# ---------------------------------------------------------------- wire: primitives

class _Fields:
    """The fields of one message that we read, by number. The last occurrence of
    a scalar wins; the occurrences of a message field are concatenated, which is
    protobuf's merge; ``which`` tells the member of a oneof set last."""

    __slots__ = ("_values", "_order")

    def __init__(self, data: bytes | None, wire: Mapping[int, int]) -> None:
        self._values: dict[int, list[Any]] = {}
        self._order: dict[int, int] = {}
        for i, (number, wire_type, value) in enumerate(iter_fields(data or b"")):
            expected = wire.get(number)
            if expected is None:
                continue  # unknown, or not needed: newer controllers send more than we read
            if wire_type != expected:
                raise DecodeError(f"field {number}: wire type {wire_type}, expected {expected}")
            self._values.setdefault(number, []).append(value)
            self._order[number] = i

    def uint(self, number: int) -> int:
        values = self._values.get(number)
        return values[-1] if values else 0

    def text(self, number: int) -> str:
        values = self._values.get(number)
        if not values:
            return ""
        try:
            return bytes(values[-1]).decode()
        except UnicodeDecodeError:
            raise DecodeError(f"field {number}: string is not UTF-8") from None

    def msg(self, number: int) -> bytes | None:
        values = self._values.get(number)
        return b"".join(values) if values else None

    def all(self, number: int) -> list[Any]:
        return self._values.get(number, [])

    def which(self, *numbers: int) -> int | None:
        present = [n for n in numbers if n in self._order]
        return max(present, key=self._order.__getitem__) if present else None


def _signed64(raw: int) -> int:
    return raw - (1 << 64) if raw >= 1 << 63 else raw


def _float32(raw: int) -> float:
    return float(struct.unpack("<f", raw.to_bytes(4, "little"))[0])


def _duration(data: bytes | None) -> tuple[int, int] | None:
    """google.protobuf.Duration as (seconds, nanos); None when absent."""
    if data is None:
        return None
    f = _Fields(data, {1: VARINT, 2: VARINT})
    return _signed64(f.uint(1)), _signed64(f.uint(2))


def _labels(entries: Iterable[bytes]) -> dict[str, str]:
    """A ``map<string, string>``: repeated {key = 1, value = 2}; a later key wins."""
    out: dict[str, str] = {}
    for entry in entries:
        f = _Fields(entry, {1: LEN, 2: LEN})
        out[f.text(1)] = f.text(2)
    return out


def encode_get_destination(path: str, context_token: str = "", scheme: str = "") -> bytes:
    """``GetDestination{scheme = 1, path = 2, context_token = 3}`` (proto3: empty strings omitted)."""
    out = bytearray()
    for number, value in ((1, scheme), (2, path), (3, context_token)):
        if value:
            data = value.encode()
            out += key(number, LEN) + encode_varint(len(data)) + data
    return bytes(out)


# ---------------------------------------------------------------- wire: addresses and endpoints

def decode_ip(data: bytes | None) -> str | None:
    """``net.IPAddress``: ``oneof ip {fixed32 ipv4 = 1; IPv6 ipv6 = 2}``; the IPv6
    halves ``first = 1``/``last = 2`` are fixed64, big-endian in value."""
    f = _Fields(data, {1: FIXED32, 2: LEN})
    which = f.which(1, 2)
    if which == 1:
        return str(ipaddress.IPv4Address(f.uint(1) & _U32))
    if which == 2:
        halves = _Fields(f.msg(2), {1: FIXED64, 2: FIXED64})
        return str(ipaddress.IPv6Address((halves.uint(1) << 64) | halves.uint(2)))
    return None


def decode_tcp_address(data: bytes | None) -> Addr | None:
    """``net.TcpAddress{IPAddress ip = 1; uint32 port = 2}``; None when it names no address."""
    f = _Fields(data, {1: LEN, 2: VARINT})
    host = decode_ip(f.msg(1)) if f.msg(1) is not None else None
    port = f.uint(2) & _U32
    if host is None or port > 65535:  # linkerd truncates the port to 16 bits; we refuse it
        return None
    return Addr(host, port)


def decode_tls_identity(data: bytes | None) -> tuple[str, str]:
    """``TlsIdentity`` -> (identity, server name); ("", "") means no TLS.

    ``oneof strategy {DnsLikeIdentity dns_like_identity = 1; UriLikeIdentity
    uri_like_identity = 3}``, ``DnsLikeIdentity server_name = 4``. Without a
    server name a DNS-like identity is its own; a URI-like one cannot be sent
    as SNI, so linkerd then uses no TLS at all. Invalid names: no TLS either."""
    if data is None:
        return "", ""
    f = _Fields(data, {1: LEN, 3: LEN, 4: LEN})
    which = f.which(1, 3)
    if which == 1:
        identity = _Fields(f.msg(1), {1: LEN}).text(1)  # DnsLikeIdentity.name
        if not _DNS_NAME.fullmatch(identity):
            log.warning("ignoring an invalid DNS-like identity from the destination service", identity=identity)
            return "", ""
        server_name = identity
    elif which == 3:
        identity = _Fields(f.msg(3), {1: LEN}).text(1)  # UriLikeIdentity.uri
        if "://" not in identity:
            log.warning("ignoring an invalid URI identity from the destination service", identity=identity)
            return "", ""
        server_name = ""
    else:
        return "", ""
    if f.msg(4) is not None:
        server_name = _Fields(f.msg(4), {1: LEN}).text(1)
        if not _DNS_NAME.fullmatch(server_name):
            log.warning("ignoring an invalid server name from the destination service", server_name=server_name)
            return "", ""
    if not server_name:
        log.warning("a URI identity without a server name: connecting without TLS", identity=identity)
        return "", ""
    return identity, server_name


def decode_protocol_hint(data: bytes | None) -> tuple[str, int]:
    """``ProtocolHint`` -> (protocol, opaque-transport port): ``oneof protocol {H2
    h2 = 1; Opaque opaque = 3}``, ``OpaqueTransport{uint32 inbound_port = 1} = 2``."""
    if data is None:
        return "", 0
    f = _Fields(data, {1: LEN, 2: LEN, 3: LEN})
    protocol = {1: "http2", 3: "opaque", None: ""}[f.which(1, 3)]
    port = 0
    if f.msg(2) is not None:
        inbound_port = _Fields(f.msg(2), {1: VARINT}).uint(1) & _U32
        if 0 < inbound_port < 65535:  # linkerd pb.rs: > 0 and < u16::MAX
            port = inbound_port
    return protocol, port


@dataclass(frozen=True, slots=True)
class EndpointExtras:
    """What the destination service says about an address beyond ``Endpoint``."""

    server_name: str = ""  # the SNI to send; equals the identity for DNS-like identities
    opaque_transport_port: int = 0  # opaque traffic goes here behind a transport header (ref 3.7)
    authority_override: str = ""  # the :authority to send instead of the request's


def decode_weighted_addr(data: bytes, set_labels: Mapping[str, str] | None = None) -> tuple[Endpoint, EndpointExtras] | None:
    """``WeightedAddr{addr = 1, weight = 3, metric_labels = 4, tls_identity = 5,
    protocol_hint = 6, authority_override = 7, http2 = 8, resource_ref = 9}``;
    None when it has no valid address."""
    f = _Fields(data, {1: LEN, 3: VARINT, 4: LEN, 5: LEN, 6: LEN, 7: LEN})
    addr = decode_tcp_address(f.msg(1)) if f.msg(1) is not None else None
    if addr is None:
        return None
    labels = dict(set_labels or {})
    labels.update(_labels(f.all(4)))  # the address's own labels win
    identity, server_name = decode_tls_identity(f.msg(5))
    protocol, opaque_port = decode_protocol_hint(f.msg(6))
    override = _Fields(f.msg(7), {1: LEN}).text(1) if f.msg(7) is not None else ""
    weight = (f.uint(3) & _U32) or _UNSET_WEIGHT
    endpoint = Endpoint(addr, weight, identity, labels.get("zone", ""), protocol, tuple(sorted(labels.items())),
                        opaque_port if identity else 0)
    return endpoint, EndpointExtras(server_name if identity else "", opaque_port, override)


# ---------------------------------------------------------------- wire: updates

@dataclass(frozen=True, slots=True)
class Add:
    """New or changed endpoints (the set's labels already merged into each)."""

    endpoints: tuple[tuple[Endpoint, EndpointExtras], ...]


@dataclass(frozen=True, slots=True)
class Remove:
    addrs: tuple[Addr, ...]


@dataclass(frozen=True, slots=True)
class NoEndpoints:
    exists: bool  # False: the service does not exist (the caller may try DNS)


Update = Add | Remove | NoEndpoints


def decode_update(data: bytes) -> Update | None:
    """``Update{oneof update {WeightedAddrSet add = 1; AddrSet remove = 2;
    NoEndpoints no_endpoints = 3}}``. None when there is nothing to apply: no
    member, or an add/remove without one valid address (linkerd ignores those)."""
    f = _Fields(data, {1: LEN, 2: LEN, 3: LEN})
    which = f.which(1, 2, 3)
    if which == 1:
        added = _Fields(f.msg(1), {1: LEN, 2: LEN})  # WeightedAddrSet{addrs = 1, metric_labels = 2}
        set_labels = _labels(added.all(2))
        endpoints = tuple(e for e in (decode_weighted_addr(a, set_labels) for a in added.all(1)) if e is not None)
        return Add(endpoints) if endpoints else None
    if which == 2:
        removed = _Fields(f.msg(2), {1: LEN})  # AddrSet{addrs = 1}
        addrs = tuple(a for a in (decode_tcp_address(raw) for raw in removed.all(1)) if a is not None)
        return Remove(addrs) if addrs else None
    if which == 3:
        return NoEndpoints(bool(_Fields(f.msg(3), {1: VARINT}).uint(1)))
    return None


# ---------------------------------------------------------------- the endpoint set (ref 6.3)

class EndpointSet:
    """The endpoints of one destination, kept by the update rules of ref 6.3. No I/O."""

    __slots__ = ("_entries", "_initial", "exists", "resolved")

    def __init__(self) -> None:
        self._entries: dict[Addr, tuple[Endpoint, EndpointExtras]] = {}
        self._initial = True  # the next update is the first of a stream
        self.exists: bool | None = None  # None until the controller has said
        self.resolved = False  # the first update (or a rejection) has been applied

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(endpoint for endpoint, _ in self._entries.values())

    def extras(self, addr: Addr) -> EndpointExtras | None:
        entry = self._entries.get(addr)
        return entry[1] if entry is not None else None

    def reconnected(self) -> None:
        """A new stream: its first ``add`` replaces the set; until then the old set stays."""
        self._initial = True

    def apply(self, update: Update | None) -> bool:
        """Apply one update; True when watchers should hear of it (the set or
        ``exists`` changed, or this is the first resolution)."""
        if update is None:
            return False
        if isinstance(update, Remove):
            if self._initial:
                return False  # a stream cannot start with a remove; linkerd ignores it
            entries = dict(self._entries)
            for addr in update.addrs:
                entries.pop(addr, None)
            exists = self.exists
        elif isinstance(update, Add):
            entries = {} if self._initial else dict(self._entries)
            for endpoint, extras in update.endpoints:
                entries[endpoint.addr] = (endpoint, extras)
            exists = True
        else:
            entries, exists = {}, update.exists
        self._initial = False
        return self._install(entries, exists)

    def reject(self) -> bool:
        """The controller refused the name (INVALID_ARGUMENT): nothing resolves."""
        return self._install({}, False)

    def _install(self, entries: dict[Addr, tuple[Endpoint, EndpointExtras]], exists: bool | None) -> bool:
        changed = not self.resolved or entries != self._entries or exists != self.exists
        self._entries, self.exists, self.resolved = entries, exists, True
        return changed


# ---------------------------------------------------------------- profiles

_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "HEAD", "TRACE")  # HttpMethod.Registered


@dataclass(frozen=True, slots=True)
class RequestMatch:
    """``RequestMatch``: kind is all | any | not | path | method."""

    kind: str
    children: tuple[RequestMatch, ...] = ()  # all/any; not has exactly one
    regex: re.Pattern[str] | None = None
    method: str = ""

    def matches(self, method: str, path: str) -> bool:
        """``path`` without the query, as linkerd matches ``uri().path()``."""
        if self.kind == "path":
            assert self.regex is not None
            return self.regex.search(path) is not None
        if self.kind == "method":
            return method == self.method
        if self.kind == "all":
            return all(c.matches(method, path) for c in self.children)
        if self.kind == "any":
            return any(c.matches(method, path) for c in self.children)
        return not self.children[0].matches(method, path)  # not


@dataclass(frozen=True, slots=True)
class ResponseMatch:
    """``ResponseMatch``: kind is all | any | not | status (``min..max`` inclusive)."""

    kind: str
    children: tuple[ResponseMatch, ...] = ()
    min: int = 0
    max: int = 0

    def matches(self, status: int) -> bool:
        if self.kind == "status":
            return self.min <= status <= self.max
        if self.kind == "all":
            return all(c.matches(status) for c in self.children)
        if self.kind == "any":
            return any(c.matches(status) for c in self.children)
        return not self.children[0].matches(status)


@dataclass(frozen=True, slots=True)
class ResponseClass:
    condition: ResponseMatch
    is_failure: bool


@dataclass(frozen=True, slots=True)
class ProfileRoute:
    condition: RequestMatch
    response_classes: tuple[ResponseClass, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # metrics_labels, sorted
    is_retryable: bool = False  # retried only when the profile also has a valid retry budget
    timeout: float | None = None  # seconds, from the request to the response headers

    def classify(self, status: int) -> bool | None:
        """``is_failure`` of the first class matching ``status``; None: no class
        matched, use the default classification."""
        for response_class in self.response_classes:
            if response_class.condition.matches(status):
                return response_class.is_failure
        return None


@dataclass(frozen=True, slots=True)
class ProfileRetryBudget:
    """Validated as linkerd does: ratio within 0..1000, ttl within 1..60 s."""

    retry_ratio: float
    min_retries_per_second: int
    ttl: float  # seconds


@dataclass(frozen=True, slots=True)
class WeightedDst:
    authority: str  # name:port, the path of a Destination.Get
    weight: int


@dataclass(frozen=True, slots=True)
class Profile:
    fully_qualified_name: str = ""  # without a port; "" when the target names no service
    opaque_protocol: bool = False
    routes: tuple[ProfileRoute, ...] = ()
    retry_budget: ProfileRetryBudget | None = None
    dst_overrides: tuple[WeightedDst, ...] = ()
    endpoint: Endpoint | None = None  # the target is this one endpoint, not a service

    @property
    def overrides_policy(self) -> bool:
        """Ref 10.1: profile routing wins over policy when it has routes or dst_overrides."""
        return bool(self.routes or self.dst_overrides)

    def route_for(self, method: str, path: str) -> ProfileRoute | None:
        """The first route matching the request (ref 10.2); None: the implicit
        default route. ``path`` is the request target; its query is not matched."""
        path = path.split("?", 1)[0]
        for route in self.routes:
            if route.condition.matches(method, path):
                return route
        return None


def _anchored(regex: str) -> re.Pattern[str] | None:
    regex = regex.strip()
    pattern = ("" if regex.startswith("^") else "^") + regex + ("" if regex.endswith("$") else "$")
    try:
        return re.compile(pattern)
    except re.error:
        log.warning("ignoring a route with an invalid path regex", regex=regex)
        return None


def decode_request_match(data: bytes | None) -> RequestMatch | None:
    """``oneof match {Seq all = 1; Seq any = 2; RequestMatch not = 3; PathMatch
    path = 4; HttpMethod method = 5}``, Seq = ``{repeated RequestMatch matches = 1}``."""
    f = _Fields(data, {1: LEN, 2: LEN, 3: LEN, 4: LEN, 5: LEN})
    which = f.which(1, 2, 3, 4, 5)
    if which in (1, 2):
        seq = _Fields(f.msg(which), {1: LEN}).all(1)
        children = tuple(m for m in (decode_request_match(raw) for raw in seq) if m is not None)
        return RequestMatch("all" if which == 1 else "any", children)
    if which == 3:
        inner = decode_request_match(f.msg(3))
        return RequestMatch("not", (inner,)) if inner is not None else None
    if which == 4:
        regex = _anchored(_Fields(f.msg(4), {1: LEN}).text(1))  # PathMatch{regex = 1}
        return RequestMatch("path", regex=regex) if regex is not None else None
    if which == 5:
        m = _Fields(f.msg(5), {1: VARINT, 2: LEN})  # HttpMethod{oneof type {Registered registered = 1; string unregistered = 2}}
        kind = m.which(1, 2)
        if kind == 1 and m.uint(1) < len(_METHODS):
            return RequestMatch("method", method=_METHODS[m.uint(1)])
        if kind == 2 and m.text(2):
            return RequestMatch("method", method=m.text(2))
    return None


def decode_response_match(data: bytes | None) -> ResponseMatch | None:
    """``oneof match {Seq all = 1; Seq any = 2; ResponseMatch not = 3;
    HttpStatusRange status = 4}``; an empty all/any is dropped (linkerd)."""
    f = _Fields(data, {1: LEN, 2: LEN, 3: LEN, 4: LEN})
    which = f.which(1, 2, 3, 4)
    if which in (1, 2):
        seq = _Fields(f.msg(which), {1: LEN}).all(1)
        children = tuple(m for m in (decode_response_match(raw) for raw in seq) if m is not None)
        return ResponseMatch("all" if which == 1 else "any", children) if children else None
    if which == 3:
        inner = decode_response_match(f.msg(3))
        return ResponseMatch("not", (inner,)) if inner is not None else None
    if which == 4:
        r = _Fields(f.msg(4), {1: VARINT, 2: VARINT})  # HttpStatusRange{min = 1, max = 2}
        low, high = r.uint(1) & _U32, r.uint(2) & _U32
        # The proto: with one bound unset, the range is that one status.
        low, high = (low or high), (high or low)
        if not (100 <= low <= 999 and 100 <= high <= 999):
            return None
        return ResponseMatch("status", min=low, max=high)
    return None


def decode_retry_budget(data: bytes | None) -> ProfileRetryBudget | None:
    """``RetryBudget{float retry_ratio = 1; uint32 min_retries_per_second = 2;
    Duration ttl = 3}``; None when absent or invalid (linkerd ``convert_retry_budget``)."""
    if data is None:
        return None
    f = _Fields(data, {1: FIXED32, 2: VARINT, 3: LEN})
    ratio = _float32(f.uint(1))
    min_retries = f.uint(2) & _U32
    ttl = _duration(f.msg(3))
    if min_retries > 2**31 - 1 or not 0.0 <= ratio <= 1000.0 or ttl is None:
        log.warning("ignoring an invalid retry budget", ratio=ratio, min_retries_per_second=min_retries, ttl=ttl)
        return None
    seconds, nanos = ttl
    total = seconds + nanos / 1e9
    if seconds < 0 or not 0 <= nanos <= 1_000_000_000 or not 1.0 <= total <= 60.0:
        log.warning("ignoring a retry budget with an invalid ttl", seconds=seconds, nanos=nanos)
        return None
    return ProfileRetryBudget(ratio, min_retries, total)


def decode_route(data: bytes) -> ProfileRoute | None:
    """``Route{condition = 1, response_classes = 2, metrics_labels = 3,
    is_retryable = 4, timeout = 5}``; dropped without a usable condition."""
    f = _Fields(data, {1: LEN, 2: LEN, 3: LEN, 4: VARINT, 5: LEN})
    condition = decode_request_match(f.msg(1)) if f.msg(1) is not None else None
    if condition is None:
        return None
    classes = []
    for raw in f.all(2):  # ResponseClass{ResponseMatch condition = 1; bool is_failure = 2}
        c = _Fields(raw, {1: LEN, 2: VARINT})
        match = decode_response_match(c.msg(1)) if c.msg(1) is not None else None
        if match is not None:
            classes.append(ResponseClass(match, bool(c.uint(2))))
    timeout = None
    duration = _duration(f.msg(5))
    if duration is not None:
        seconds, nanos = duration
        if seconds < 0 or nanos < 0:
            log.warning("ignoring a negative route timeout", seconds=seconds, nanos=nanos)
        else:
            timeout = seconds + nanos / 1e9
    labels = tuple(sorted(_labels(f.all(3)).items()))
    return ProfileRoute(condition, tuple(classes), labels, bool(f.uint(4)), timeout)


def _is_name_addr(authority: str) -> bool:
    host, sep, port = authority.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) <= 65535)


def decode_profile(data: bytes) -> Profile:
    """``DestinationProfile{routes = 1, retry_budget = 2, dst_overrides = 3,
    opaque_protocol = 4, fully_qualified_name = 5, endpoint = 6, parent_ref = 7,
    profile_ref = 8}``."""
    f = _Fields(data, {1: LEN, 2: LEN, 3: LEN, 4: VARINT, 5: LEN, 6: LEN})
    routes = tuple(r for r in (decode_route(raw) for raw in f.all(1)) if r is not None)
    overrides = []
    for raw in f.all(3):  # WeightedDst{authority = 1, weight = 2, backend_ref = 3}
        d = _Fields(raw, {1: LEN, 2: VARINT})
        authority, weight = d.text(1), d.uint(2) & _U32
        if weight and _is_name_addr(authority):
            overrides.append(WeightedDst(authority, weight))
    endpoint = None
    if f.msg(6) is not None:
        decoded = decode_weighted_addr(f.msg(6) or b"")
        endpoint = decoded[0] if decoded is not None else None
    return Profile(
        fully_qualified_name=f.text(5).rstrip("."),
        opaque_protocol=bool(f.uint(4)),
        routes=routes,
        retry_budget=decode_retry_budget(f.msg(2)),
        dst_overrides=tuple(overrides),
        endpoint=endpoint,
    )


# ---------------------------------------------------------------- which targets get profiles

def split_target(target: str) -> tuple[str, int]:
    """``name:port``, ``ip:port`` or ``[v6]:port`` -> (host without brackets, port)."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected name:port, ip:port or [ipv6]:port, got {target!r}")
    return host.strip("[]"), int(port)


class ProfileAllowlist:
    """Linkerd's ``AddrMatch``: a name matches a suffix (``.`` matches every name)
    on a label boundary, ignoring case and the trailing dot; an IP matches a network."""

    def __init__(self, suffixes: Iterable[str], networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        cleaned = [s.strip() for s in suffixes if s.strip()]
        self.any_name = "." in cleaned
        self.suffixes = tuple(s.rstrip(".").lower() for s in cleaned if s != ".")
        self.networks = tuple(networks)

    def allows(self, target: str) -> bool:
        host, _ = split_target(target)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return self.allows_name(host)
        return any(ip.version == net.version and ip in net for net in self.networks)

    def allows_name(self, name: str) -> bool:
        if self.any_name:
            return True
        name = name.rstrip(".").lower()
        return any(name == s or name.endswith("." + s) for s in self.suffixes)


# ---------------------------------------------------------------- the client

@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Limits on a control stream (linkerd ``ReceiveLimits``; the chart sets 3 s /
    5 m / 1 h), after which it is re-opened. Never applied to a loopback controller."""

    initial: float | None = None  # until the first message
    idle: float | None = None  # between messages
    lifetime: float | None = None  # of the whole stream


V = TypeVar("V")


class Watch(Generic[V]):
    """One subscriber of a lookup. ``close()`` ends the subscription, and the
    stream once no other watch of the same target is left."""

    def __init__(self, lookup: _Lookup[V], on_update: Callable[[V], None]) -> None:
        self._lookup = lookup
        self._on_update = on_update
        self.closed = False

    @property
    def target(self) -> str:
        return self._lookup.path

    @property
    def resolved(self) -> bool:
        """The controller has answered (a first message, or a rejection)."""
        return self._lookup.resolved

    @property
    def rejected(self) -> GrpcError | None:
        """The INVALID_ARGUMENT/FAILED_PRECONDITION that ended the lookup, if one did."""
        return self._lookup.rejected

    async def wait_resolved(self, timeout: float | None = None) -> bool:
        """Wait for the first answer; False if none came in time."""
        try:
            await asyncio.wait_for(self._lookup.ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._lookup.unsubscribe(self)

    def _deliver(self, value: V) -> None:
        if self.closed:
            return
        try:
            self._on_update(value)
        except Exception as exc:  # noqa: BLE001 - one bad subscriber must not end the stream
            log.error("a destination subscriber failed", target=self.target, error=repr(exc))

    def _deliver_current(self) -> None:
        self._deliver(self._lookup.value())


class EndpointWatch(Watch[tuple[Endpoint, ...]]):
    """A watch of ``Destination.Get``: the current endpoints, kept while disconnected."""

    _lookup: _EndpointLookup

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._lookup.state.endpoints

    @property
    def exists(self) -> bool | None:
        """False after ``no_endpoints{exists: false}`` or a rejection (try DNS); None before an answer."""
        return self._lookup.state.exists

    def extras(self, addr: Addr) -> EndpointExtras | None:
        return self._lookup.state.extras(addr)


class ProfileWatch(Watch[Profile | None]):
    """A watch of ``Destination.GetProfile``: the latest profile (None: no profile)."""

    _lookup: _ProfileLookup

    @property
    def profile(self) -> Profile | None:
        return self._lookup.current


class _Lookup(Generic[V]):
    """One stream to the controller for one target, shared by its watches."""

    method: ClassVar[str]

    def __init__(self, client: DestinationClient, path: str) -> None:
        self.client = client
        self.path = path
        self.watches: list[Watch[V]] = []
        self.resolved = False
        self.rejected: GrpcError | None = None
        self.ready = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"destination {self.method.rsplit('/', 1)[1]} {path}")

    # hooks
    def value(self) -> V:
        raise NotImplementedError

    def connected(self) -> None:
        pass

    def received(self, message: bytes) -> bool:
        """Apply one message; True when the watches should hear of it."""
        raise NotImplementedError

    def refused(self) -> bool:
        raise NotImplementedError

    # subscribers
    def subscribe(self, watch: Watch[V]) -> None:
        self.watches.append(watch)
        if self.resolved:  # a later subscriber hears the current value, but not from inside watch()
            asyncio.get_running_loop().call_soon(watch._deliver_current)

    def unsubscribe(self, watch: Watch[V]) -> None:
        if watch in self.watches:
            self.watches.remove(watch)
        if not self.watches:
            self.task.cancel()
            self.client._forget(self)

    def _publish(self) -> None:
        self.resolved = True
        self.ready.set()
        value = self.value()
        for watch in list(self.watches):
            watch._deliver(value)

    # the stream
    async def _run(self) -> None:
        client = self.client
        request = encode_get_destination(self.path, client.context_token)
        attempt = 0
        while True:
            established = False
            try:
                async with client.channel().server_stream(self.method, request) as stream:
                    self.connected()
                    async with aclosing(_limited(stream, client.limits)) as messages:
                        async for message in messages:
                            established = True
                            if self.received(message):
                                self._publish()
                log.debug("the destination service ended the stream; reconnecting", target=self.path)
            except GrpcError as exc:
                if exc.code in REJECTED_CODES:
                    log.info("the destination service rejected the lookup", target=self.path, error=str(exc))
                    self.rejected = exc
                    if self.refused():
                        self._publish()
                    self.resolved = True
                    self.ready.set()
                    return
                if established or attempt == 0:
                    log.warning("destination stream failed; reconnecting", target=self.path, error=str(exc))
                else:
                    log.debug("destination stream failed again", target=self.path, error=str(exc), attempt=attempt)
            except DecodeError as exc:
                log.warning("the destination service sent an undecodable message; reconnecting", target=self.path, error=str(exc))
            if established:
                attempt = 0  # a stream that delivered: start the backoff over (linkerd recover.rs)
            await asyncio.sleep(client.backoff.delay(attempt, client.rng))
            attempt += 1


class _EndpointLookup(_Lookup[tuple[Endpoint, ...]]):
    method = GET_METHOD

    def __init__(self, client: DestinationClient, path: str) -> None:
        self.state = EndpointSet()
        super().__init__(client, path)

    def value(self) -> tuple[Endpoint, ...]:
        return self.state.endpoints

    def connected(self) -> None:
        self.state.reconnected()

    def received(self, message: bytes) -> bool:
        return self.state.apply(decode_update(message))

    def refused(self) -> bool:
        return self.state.reject()


class _ProfileLookup(_Lookup[Profile | None]):
    method = GET_PROFILE_METHOD

    def __init__(self, client: DestinationClient, path: str) -> None:
        self.current: Profile | None = None
        super().__init__(client, path)

    def value(self) -> Profile | None:
        return self.current

    def received(self, message: bytes) -> bool:
        profile = decode_profile(message)  # every message replaces the whole profile
        changed = not self.resolved or profile != self.current
        self.current = profile
        return changed

    def refused(self) -> bool:
        # Rejected before any profile: no profile. After one, linkerd keeps the last.
        return not self.resolved


async def _limited(stream: Any, limits: StreamLimits) -> AsyncGenerator[bytes, None]:
    """The stream's messages, ended with DEADLINE_EXCEEDED when a limit is reached."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limits.lifetime if limits.lifetime else None
    wait = limits.initial
    while True:
        deadlines = [d for d in (loop.time() + wait if wait else None, end) if d is not None]
        try:
            async with asyncio.timeout_at(min(deadlines) if deadlines else None):
                message = await anext(stream)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise GrpcError(StatusCode.DEADLINE_EXCEEDED, "control stream limit reached") from None
        yield message
        wait = limits.idle


class DestinationClient:
    """Watches of ``io.linkerd.proxy.destination.Destination`` (ref 6).

    ``config`` supplies ``destination_svc_addr``/``_name``, ``destination_context``
    (sent as ``context_token``), ``destination_profile_suffixes``/``_networks``
    and the connect backoffs. ``ssl_context_factory`` returns the proxy's current
    client context (so a reconnect presents the newest certificate); without one,
    or to a loopback controller, the channel is plaintext. Call from the event
    loop that will run the streams."""

    def __init__(
        self,
        config: Any,
        *,
        ssl_context_factory: Callable[[], ssl.SSLContext] | None = None,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
        limits: StreamLimits | None = None,
    ) -> None:
        self.addr: str = config.destination_svc_addr
        if not self.addr:
            raise ValueError("LINKERD2_PROXY_DESTINATION_SVC_ADDR is required for the destination client")
        self.server_name: str = config.destination_svc_name or ""
        self.context_token: str = config.destination_context or ""
        self.allowlist = ProfileAllowlist(config.destination_profile_suffixes, config.destination_profile_networks)
        target = Target.parse(self.addr)
        self.loopback = target.is_unix or is_loopback(target.host)
        if ssl_context_factory is None and not self.loopback:
            log.warning("the destination service is not on loopback, but no TLS context was given: plaintext", addr=self.addr)
        if backoff is None:
            side = "inbound" if self.loopback else "outbound"
            lo, hi, jitter = _BACKOFF_DEFAULTS[side]
            backoff = Backoff(
                getattr(config, f"{side}_backoff_min", lo),
                getattr(config, f"{side}_backoff_max", hi),
                getattr(config, f"{side}_backoff_jitter", jitter),
            )
        self.backoff = backoff
        self.limits = StreamLimits() if self.loopback or limits is None else limits
        self.rng = rng or random.Random()
        self._ssl_context_factory = ssl_context_factory
        self._channel: GrpcChannel | None = None
        self._endpoints: dict[str, _EndpointLookup] = {}
        self._profiles: dict[str, _ProfileLookup] = {}
        self._closed = False

    def channel(self) -> GrpcChannel:
        if self._channel is None:
            self._channel = GrpcChannel(self.addr, ssl_context=self._ssl_context_factory, server_name=self.server_name or None)
        return self._channel

    def watch(self, authority: str, on_update: Callable[[tuple[Endpoint, ...]], None]) -> EndpointWatch:
        """Watch the endpoints of ``authority`` (``name:port``). ``on_update`` gets
        the whole set after each change (and the current set, soon, when the
        authority is already watched). ``close()`` the watch when done."""
        self._check_open()
        split_target(authority)
        lookup = self._endpoints.get(authority)
        if lookup is None:
            lookup = self._endpoints[authority] = _EndpointLookup(self, authority)
        watch = EndpointWatch(lookup, on_update)
        lookup.subscribe(watch)
        return watch

    def profile_allowed(self, target: str) -> bool:
        return self.allowlist.allows(target)

    def get_profile(self, target: str, on_update: Callable[[Profile | None], None]) -> ProfileWatch | None:
        """Watch the profile of ``target`` (``name:port`` or ``ip:port``); None,
        without a call, when the profile suffixes and networks exclude it."""
        self._check_open()
        if not self.allowlist.allows(target):
            log.debug("profile discovery skipped", target=target)
            return None
        lookup = self._profiles.get(target)
        if lookup is None:
            lookup = self._profiles[target] = _ProfileLookup(self, target)
        watch = ProfileWatch(lookup, on_update)
        lookup.subscribe(watch)
        return watch

    @property
    def watched(self) -> tuple[str, ...]:
        """Targets with an open lookup (endpoints, then profiles)."""
        return (*self._endpoints, *self._profiles)

    def _forget(self, lookup: _Lookup[Any]) -> None:
        table: dict[str, Any] = self._endpoints if isinstance(lookup, _EndpointLookup) else self._profiles
        if table.get(lookup.path) is lookup:
            del table[lookup.path]

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the destination client is closed")

    async def close(self) -> None:
        """End every lookup and the connection."""
        self._closed = True
        lookups: list[_Lookup[Any]] = [*self._endpoints.values(), *self._profiles.values()]
        self._endpoints.clear()
        self._profiles.clear()
        for lookup in lookups:
            lookup.task.cancel()
        await asyncio.gather(*(lookup.task for lookup in lookups), return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
