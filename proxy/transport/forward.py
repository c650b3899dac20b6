"""Accept a connection, learn where it was going, and hand it to a stage.

An ``Acceptor`` serves one listener. For each connection it reads the
original destination, asks the direction's ``route`` where to send it (an
address, or the reason to refuse it), opens the connection's server-side TCP
metrics, and calls the direction's ``dispatch`` with a ``Conn``. The dispatch
(composed in proxy.app) picks the next stage: protocol detection, the HTTP
servers, or ``forward_opaque``, which dials the target and relays bytes,
replaying any bytes already read during detection.
"""

from __future__ import annotations

import asyncio
import copy
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.balance.queue import FailFast, LoadShed
from proxy.config import Addr
from proxy.core import transport_header
from proxy.log import LEVELS, enabled, get_logger
from proxy.tls.local import IdentityMismatch, LocalIdentity
from proxy.transport.connect import connect
from proxy.transport.orig_dst import original_dst, peer_addr
from proxy.transport.relay import Relay, RelayTracker, TcpSeries, reset

log = get_logger("proxy.transport.forward")
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Accepted:
    """What is known about an accepted connection before any byte is read."""

    client: Addr
    orig_dst: Addr
    redirected: bool


@dataclass(frozen=True, slots=True)
class Target:
    """Where a connection goes: an address, and what discovery knows of it."""

    addr: Addr
    identity: str = ""  # the peer's TLS identity when it is meshed; "" = plaintext
    protocol: str = ""  # discovery's protocol hint: "", "http1", "http2", "opaque"
    authority: str | None = None  # the logical service name:port, when there is one
    backend: Any = None  # a balance.backend.Backend: the endpoint is picked per connection / request
    opaque_port: int = 0  # meshed: opaque TCP goes to this inbound port behind a transport header (ref 3.7)


Route = Callable[[Accepted], "Target | str"]  # where to go, or the reason to refuse
Labels = Callable[[Accepted, "Target | None"], tuple[Any, ...]]


class Conn:
    """An accepted connection on its way through the stages."""

    __slots__ = ("transport", "accepted", "target", "src", "forwarder", "client_id", "tls", "sock")

    def __init__(self, transport: Any, accepted: Accepted, target: Target, src: TcpSeries | None, forwarder: Acceptor) -> None:
        self.transport = transport
        self.accepted = accepted
        self.target = target
        self.src = src
        self.forwarder = forwarder
        self.sock: Any = None  # the raw socket while no transport exists yet (inbound peek)
        self.tls = False  # inbound: mTLS terminated by us
        self.client_id = ""  # inbound: the peer's identity, when it presented a certificate

    def open_series(self, labels: tuple[Any, ...] | None = None) -> TcpSeries:
        """Count the connection as open (tcp_open_total etc.), with the labels known by now."""
        fwd = self.forwarder
        self.src = TcpSeries(fwd.metrics, labels or fwd.server_labels(self.accepted, self.target))
        return self.src

    def close_series(self, errno: str = "") -> None:
        """Count the connection as closed (when no relay or HTTP server took it over)."""
        if self.src is not None:
            self.src.closed(errno)


class Acceptor:
    def __init__(
        self,
        direction: str,
        route: Route,
        connect_timeout: float,
        metrics: Any,
        tracker: RelayTracker,
        server_labels: Labels,
        client_labels: Labels,
        errors: Any,
        dispatch: Callable[[Conn], None] | None = None,
        local: LocalIdentity | None = None,
    ) -> None:
        self.local = local
        self.direction = direction
        self.route = route
        self.connect_timeout = connect_timeout
        self.metrics = metrics
        self.tracker = tracker
        self.server_labels = server_labels
        self.client_labels = client_labels
        self.errors = errors  # {inbound,outbound}_tcp_errors_total
        self.dispatch = dispatch or (lambda conn: forward_opaque(conn, b""))
        self.backends: Any = None  # outbound: the per-destination backends, swept by the worker
        self.loop = asyncio.get_running_loop()
        self._transport_identity: tuple[int, Any] | None = None  # (identity generation, its ALPN twin)

    def transport_identity(self) -> Any:
        """Our identity with a client context offering ALPN transport.l5d.io/v1 (opaque
        transport), made once per certificate."""
        local = self.local
        assert local is not None
        cached = self._transport_identity
        if cached is None or cached[0] != local.generation:
            twin = copy.copy(local)
            twin.client_ctx = local.make_client_context(alpn=[transport_header.ALPN])
            cached = self._transport_identity = (local.generation, twin)
        return cached[1]

    def __call__(self) -> AcceptProtocol:
        return AcceptProtocol(self)

    def accepted(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        try:
            orig, redirected = original_dst(sock)
            accepted = Accepted(peer_addr(sock), orig, redirected)
        except OSError:
            transport.abort()  # the client is already gone
            return
        target = self.route(accepted)
        if enabled(log.name, LEVELS["debug"]):
            log.debug("accepted", direction=self.direction, client=str(accepted.client), orig_dst=str(orig), target=str(getattr(target, "addr", target)))
        if isinstance(target, str):
            self.errors.labels(target, str(orig), orig.host, str(orig.port)).value += 1
            log.info("connection refused", direction=self.direction, client=str(accepted.client), orig_dst=str(orig), reason=target)
            reset(transport)
            return
        conn = Conn(transport, accepted, target, None, self)
        self.dispatch(conn)  # the dispatch opens the server-side series once it knows the TLS state


    def accepted_socket(self, sock: Any) -> None:
        """The same as ``accepted`` for a raw socket (no transport yet)."""
        try:
            orig, redirected = original_dst(sock)
            accepted = Accepted(peer_addr(sock), orig, redirected)
        except OSError:
            sock.close()
            return
        target = self.route(accepted)
        if isinstance(target, str):
            self.errors.labels(target, str(orig), orig.host, str(orig.port)).value += 1
            log.info("connection refused", direction=self.direction, client=str(accepted.client), orig_dst=str(orig), reason=target)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
            return
        conn = Conn(None, accepted, target, None, self)
        conn.sock = sock
        self.dispatch(conn)


def forward_opaque(conn: Conn, prefix: bytes, client_eof: bool = False) -> None:
    """Relay ``conn`` to its target byte for byte; ``prefix`` was already read from it."""
    fwd = conn.forwarder
    assert conn.src is not None, "the dispatch opens the series before forwarding"
    relay = Relay(fwd.tracker, conn.src)
    conn.transport.set_protocol(relay.client)
    relay.client.connection_made(conn.transport)
    if prefix:
        relay.client.data_received(prefix)
    if client_eof:
        relay.client.eof = True
    conn.transport.resume_reading()
    relay.connect_task = fwd.loop.create_task(_connect(fwd, relay, conn.accepted, conn.target))


async def _connect(fwd: Acceptor, relay: Relay, accepted: Accepted, target: Target) -> None:
    backend = target.backend
    if backend is not None:
        # Opaque TCP is balanced per connection (ref 4): pending = open connections.
        try:
            ep = backend.pick_now() or await backend.acquire()
        except (FailFast, LoadShed) as exc:
            _failed(fwd, relay, target.addr, exc.error)
            return
        except asyncio.CancelledError:
            relay.upstream = None
            relay.finish()
            return
        meshed = ep.endpoint.identity if (fwd.local is not None and fwd.local.creds is not None) else ""
        target = Target(ep.addr, meshed, ep.endpoint.protocol, target.authority,
                        opaque_port=ep.endpoint.opaque_transport_port if meshed else 0)
        started = fwd.loop.time()
        relay.balance = (ep, ep.load.start(started), 0.0)
    dial, local, header = target.addr, fwd.local, b""
    if target.identity and target.opaque_port and local is not None:
        # Opaque transport (ref 3.7): to the peer's inbound port, ALPN transport.l5d.io/v1, and a
        # header naming the port the app meant, so the peer terminates mTLS even for an opaque port.
        dial, local = Addr(target.addr.host, target.opaque_port), fwd.transport_identity()
        header = transport_header.encode(transport_header.Header(target.addr.port))
    try:
        await connect(relay.new_upstream, dial, fwd.connect_timeout, target.identity, local)
    except TimeoutError:
        _failed(fwd, relay, target.addr, "connect timeout", backend)
        return
    except IdentityMismatch as exc:
        _failed(fwd, relay, target.addr, f"identity required: {exc}", backend)
        return
    except OSError as exc:
        _failed(fwd, relay, target.addr, f"i/o: {exc.strerror or exc}", backend)
        return
    except asyncio.CancelledError:
        # The client left while we were connecting.
        if relay.upstream is not None and relay.upstream.transport is not None:
            relay.upstream.transport.close()
        relay.upstream = None
        relay.finish()
        return
    relay.connect_task = None
    if header:
        relay.upstream.transport.write(header)  # before any application byte
    if relay.balance is not None:
        ep, handle, _rtt = relay.balance
        relay.balance = (ep, handle, fwd.loop.time() - handle)  # RTT sample: the connect (and TLS) handshake
    if relay.client.lost:  # the client left just as the upstream answered
        relay.upstream.transport.close()
        return
    relay.connected(TcpSeries(fwd.metrics, fwd.client_labels(accepted, target)))


def _failed(fwd: Acceptor, relay: Relay, target: Addr, reason: str, backend: Any = None) -> None:
    if relay.balance is not None:
        ep, handle, _rtt = relay.balance
        relay.balance = None
        ep.load.complete(handle, fwd.loop.time())
        if backend is not None:
            backend.failed(ep)  # back off from an endpoint that cannot be reached
    fwd.errors.labels(reason.split(":")[0], str(target), target.host, str(target.port)).value += 1
    log.info("connect failed", direction=fwd.direction, target=str(target), reason=reason)
    relay.upstream = None
    relay.connect_task = None
    relay.fail("ECONNREFUSED" if "refused" in reason.lower() else "")


class AcceptProtocol:
    """Lives for the moment between accept and the next stage taking the socket over."""

    __slots__ = ("forwarder",)

    def __init__(self, forwarder: Acceptor) -> None:
        self.forwarder = forwarder

    def connection_made(self, transport: Any) -> None:
        self.forwarder.accepted(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        pass

    def data_received(self, data: bytes) -> None:  # not reached: a stage takes over first
        pass

    def eof_received(self) -> bool:
        return False
