"""A fake Linkerd destination controller speaking the real API over real gRPC.

The protobuf and gRPC code is generated at test time by grpcio-tools from the
``.proto`` files the runtime's decoder is written against
(``proxy/control/proto/destination.proto`` and ``net.proto``); grpcio serves it,
plaintext on loopback (as a loopback ``DESTINATION_SVC_ADDR`` is in Linkerd).

Scripting, per authority (the ``path`` of the request):
  * ``script(authority, *updates)``: what every new ``Get`` stream for it is sent
    first (a controller re-sends its state to each subscriber); the stream then
    stays open;
  * ``push(authority, *updates)``: sent now to every open stream for it;
  * ``end(authority, code=None)``: end the open streams, OK or with a status;
  * ``reject(authority, code)``: answer new calls with that status at once;
  * the same for ``GetProfile`` with ``script_profile``/``push_profile`` (or
    ``kind="profile"`` on ``end``/``reject``);
  * ``stop()`` kills the server (every connection dropped, no goodbye) and
    ``start(port=...)`` brings it back on the same port.

Every request is recorded in ``requests`` (scheme, path, context token).
Message builders (``add``, ``remove``, ``no_endpoints``, ``profile``, ...) make
the protobuf messages from plain values.

    fake = FakeDestinationService()
    fake.script("web.ns.svc.cluster.local:80", add("10.0.0.1:80", labels={"namespace": "ns"}))
    port = fake.start()
    ...
    fake.stop()
"""

from __future__ import annotations

import ipaddress
import os
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import grpc

from tests.fakes import protos

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proxy", "control", "proto")



def compile_protos() -> SimpleNamespace:
    """protoc's code for ("destination", "net") (tests/fakes/protos.py), compiled once per process."""
    return protos.compile_protos(("destination", "net"))

# ---------------------------------------------------------------- message builders

def tcp_address(addr: str) -> Any:
    """``10.0.0.1:80`` or ``[fd00::1]:80`` -> net.TcpAddress (IPv6 as two big-endian halves)."""
    net = compile_protos().net_pb2
    host, _, port = addr.rpartition(":")
    ip = ipaddress.ip_address(host.strip("[]"))
    if ip.version == 4:
        address = net.IPAddress(ipv4=int(ip))
    else:
        value = int(ip)
        address = net.IPAddress(ipv6=net.IPv6(first=value >> 64, last=value & (2**64 - 1)))
    return net.TcpAddress(ip=address, port=int(port))


def weighted_addr(
    addr: str,
    *,
    weight: int = 10000,  # what Linkerd's controller sends for every endpoint
    labels: dict[str, str] | None = None,
    identity: str | None = None,
    uri_identity: str | None = None,
    server_name: str | None = None,
    hint: str | None = None,  # "h2" | "opaque"
    opaque_port: int | None = None,
    authority_override: str | None = None,
    resource: str | None = None,
) -> Any:
    pb = compile_protos().destination_pb2
    wa = pb.WeightedAddr(addr=tcp_address(addr), weight=weight, metric_labels=labels or {})
    if identity is not None:
        wa.tls_identity.dns_like_identity.name = identity
    if uri_identity is not None:
        wa.tls_identity.uri_like_identity.uri = uri_identity
    if server_name is not None:
        wa.tls_identity.server_name.name = server_name
    if hint == "h2":
        wa.protocol_hint.h2.SetInParent()
    elif hint == "opaque":
        wa.protocol_hint.opaque.SetInParent()
    if opaque_port is not None:
        wa.protocol_hint.opaque_transport.inbound_port = opaque_port
    if authority_override is not None:
        wa.authority_override.authority_override = authority_override
    if resource is not None:  # a field the client does not read: it must skip it
        wa.resource_ref.resource.kind = "Pod"
        wa.resource_ref.resource.name = resource
    return wa


def add(*addrs: Any, labels: dict[str, str] | None = None) -> Any:
    """Update.add; each addr is ``"ip:port"`` or a ``weighted_addr(...)``."""
    pb = compile_protos().destination_pb2
    items = [weighted_addr(a) if isinstance(a, str) else a for a in addrs]
    return pb.Update(add=pb.WeightedAddrSet(addrs=items, metric_labels=labels or {}))


def remove(*addrs: str) -> Any:
    pb = compile_protos().destination_pb2
    return pb.Update(remove=pb.AddrSet(addrs=[tcp_address(a) for a in addrs]))


def no_endpoints(exists: bool = True) -> Any:
    pb = compile_protos().destination_pb2
    return pb.Update(no_endpoints=pb.NoEndpoints(exists=exists))


def path_match(regex: str) -> Any:
    pb = compile_protos().destination_pb2
    return pb.RequestMatch(path=pb.PathMatch(regex=regex))


def method_match(method: str) -> Any:
    pb = compile_protos().destination_pb2
    registered = pb.HttpMethod.Registered
    if method in registered.keys():
        return pb.RequestMatch(method=pb.HttpMethod(registered=registered.Value(method)))
    return pb.RequestMatch(method=pb.HttpMethod(unregistered=method))


def all_of(*matches: Any) -> Any:
    pb = compile_protos().destination_pb2
    return pb.RequestMatch(all=pb.RequestMatch.Seq(matches=list(matches)))


def any_of(*matches: Any) -> Any:
    pb = compile_protos().destination_pb2
    return pb.RequestMatch(any=pb.RequestMatch.Seq(matches=list(matches)))


def not_(match: Any) -> Any:
    pb = compile_protos().destination_pb2
    return pb.RequestMatch(**{"not": match})


def status_class(low: int, high: int = 0, *, failure: bool = True) -> Any:
    pb = compile_protos().destination_pb2
    return pb.ResponseClass(condition=pb.ResponseMatch(status=pb.HttpStatusRange(min=low, max=high)), is_failure=failure)


def route(condition: Any, *, classes: tuple[Any, ...] = (), labels: dict[str, str] | None = None,
          retryable: bool = False, timeout: float | None = None) -> Any:
    pb = compile_protos().destination_pb2
    r = pb.Route(condition=condition, response_classes=list(classes), metrics_labels=labels or {}, is_retryable=retryable)
    if timeout is not None:
        r.timeout.FromNanoseconds(int(round(timeout * 1e9)))
    return r


def retry_budget(ratio: float = 0.2, min_per_second: int = 10, ttl: float = 10.0) -> Any:
    pb = compile_protos().destination_pb2
    budget = pb.RetryBudget(retry_ratio=ratio, min_retries_per_second=min_per_second)
    budget.ttl.FromNanoseconds(int(round(ttl * 1e9)))
    return budget


def profile(*, routes: tuple[Any, ...] = (), budget: Any = None, dst_overrides: tuple[tuple[str, int], ...] = (),
            fqn: str = "", opaque: bool = False, endpoint: Any = None) -> Any:
    pb = compile_protos().destination_pb2
    p = pb.DestinationProfile(
        routes=list(routes),
        dst_overrides=[pb.WeightedDst(authority=a, weight=w) for a, w in dst_overrides],
        fully_qualified_name=fqn,
        opaque_protocol=opaque,
    )
    if budget is not None:
        p.retry_budget.CopyFrom(budget)
    if endpoint is not None:
        p.endpoint.CopyFrom(endpoint)
    p.profile_ref.resource.kind = "ServiceProfile"  # unread by the client: skipped
    return p


# ---------------------------------------------------------------- the service

@dataclass(frozen=True)
class Request:
    kind: str  # "get" | "profile"
    scheme: str
    path: str
    context_token: str
    at: float


class _End:
    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        self.code = code
        self.message = message


_CANCELLED = object()


class _OpenStream:
    def __init__(self, kind: str, path: str) -> None:
        self.kind = kind
        self.path = path
        self.queue: queue.Queue[Any] = queue.Queue()


class FakeDestinationService:
    """``io.linkerd.proxy.destination.Destination`` with scripted answers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scripts: dict[tuple[str, str], list[Any]] = {}
        self._rejects: dict[tuple[str, str], grpc.StatusCode] = {}
        self._open: list[_OpenStream] = []
        self.requests: list[Request] = []
        self.server: grpc.Server | None = None
        self.port = 0

    # scripting

    def script(self, authority: str, *updates: Any) -> None:
        with self._lock:
            self._scripts[("get", authority)] = list(updates)

    def script_profile(self, target: str, *profiles: Any) -> None:
        with self._lock:
            self._scripts[("profile", target)] = list(profiles)

    def push(self, authority: str, *updates: Any, kind: str = "get") -> int:
        """Send to every open stream for ``authority`` now; returns how many it reached."""
        with self._lock:
            streams = [s for s in self._open if s.kind == kind and s.path == authority]
        for stream in streams:
            for update in updates:
                stream.queue.put(update)
        return len(streams)

    def push_profile(self, target: str, *profiles: Any) -> int:
        return self.push(target, *profiles, kind="profile")

    def end(self, authority: str, code: grpc.StatusCode | None = None, message: str = "", kind: str = "get") -> int:
        with self._lock:
            streams = [s for s in self._open if s.kind == kind and s.path == authority]
        for stream in streams:
            stream.queue.put(_End(code, message))
        return len(streams)

    def reject(self, authority: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT, kind: str = "get") -> None:
        with self._lock:
            self._rejects[(kind, authority)] = code

    def open_streams(self, authority: str, kind: str = "get") -> int:
        with self._lock:
            return sum(1 for s in self._open if s.kind == kind and s.path == authority)

    def calls(self, authority: str, kind: str = "get") -> list[Request]:
        return [r for r in list(self.requests) if r.kind == kind and r.path == authority]

    # gRPC handlers (run on the server's threads)

    def _serve(self, kind: str, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append(Request(kind, request.scheme, request.path, request.context_token, time.monotonic()))
        with self._lock:
            code = self._rejects.get((kind, request.path))
            initial = list(self._scripts.get((kind, request.path), ()))
            stream = _OpenStream(kind, request.path)
            if code is None:
                self._open.append(stream)
        if code is not None:
            context.abort(code, f"{request.path} is not resolvable here")
        context.add_callback(lambda: stream.queue.put(_CANCELLED))
        try:
            yield from initial
            while context.is_active():
                try:
                    item = stream.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if item is _CANCELLED:
                    return
                if isinstance(item, _End):
                    if item.code is not None:
                        context.abort(item.code, item.message or "ended by the test")
                    return
                yield item
        finally:
            with self._lock:
                if stream in self._open:
                    self._open.remove(stream)

    # lifecycle

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``port`` (0: a free one; the previous port to restart). Returns it."""
        protos = compile_protos()
        fake = self

        class Destination(protos.destination_pb2_grpc.DestinationServicer):
            def Get(self, request, context):  # noqa: N802 - the gRPC method's name
                return fake._serve("get", request, context)

            def GetProfile(self, request, context):  # noqa: N802
                return fake._serve("profile", request, context)

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), options=[("grpc.so_reuseport", 0)])
        protos.destination_pb2_grpc.add_DestinationServicer_to_server(Destination(), server)
        deadline = time.monotonic() + 5.0
        while True:  # a restart may race the old listener's release for a moment
            try:
                bound = server.add_insecure_port(f"{host}:{port}")
            except RuntimeError:
                bound = 0
            if bound or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not bound:
            raise RuntimeError(f"could not bind {host}:{port}")
        server.start()
        self.server, self.port = server, bound
        return bound

    def stop(self) -> None:
        """Kill: cancel every call and drop every connection at once."""
        server, self.server = self.server, None
        if server is not None:
            with self._lock:
                streams = list(self._open)
            for stream in streams:
                stream.queue.put(_CANCELLED)
            server.stop(grace=0).wait(5)

    def restart(self) -> int:
        port = self.port
        self.stop()
        return self.start(port=port)
