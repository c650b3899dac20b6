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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.config import Addr
from proxy.log import LEVELS, enabled, get_logger
from proxy.transport.orig_dst import original_dst, peer_addr
from proxy.transport.relay import Relay, RelayTracker, TcpSeries, reset

log = get_logger("proxy.transport.forward")


@dataclass(frozen=True, slots=True)
class Accepted:
    """What is known about an accepted connection before any byte is read."""

    client: Addr
    orig_dst: Addr
    redirected: bool


Route = Callable[[Accepted], "Addr | str"]  # an address to dial, or the reason to refuse
Labels = Callable[[Accepted, "Addr | None"], tuple[Any, ...]]


class Conn:
    """An accepted connection on its way through the stages."""

    __slots__ = ("transport", "accepted", "target", "src", "forwarder")

    def __init__(self, transport: Any, accepted: Accepted, target: Addr, src: TcpSeries, forwarder: Acceptor) -> None:
        self.transport = transport
        self.accepted = accepted
        self.target = target
        self.src = src
        self.forwarder = forwarder


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
    ) -> None:
        self.direction = direction
        self.route = route
        self.connect_timeout = connect_timeout
        self.metrics = metrics
        self.tracker = tracker
        self.server_labels = server_labels
        self.client_labels = client_labels
        self.errors = errors  # {inbound,outbound}_tcp_errors_total
        self.dispatch = dispatch or (lambda conn: forward_opaque(conn, b""))
        self.loop = asyncio.get_running_loop()

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
            log.debug("accepted", direction=self.direction, client=str(accepted.client), orig_dst=str(orig), target=str(target))
        if isinstance(target, str):
            self.errors.labels(target, str(orig), orig.host, str(orig.port)).value += 1
            log.info("connection refused", direction=self.direction, client=str(accepted.client), orig_dst=str(orig), reason=target)
            reset(transport)
            return
        conn = Conn(transport, accepted, target, TcpSeries(self.metrics, self.server_labels(accepted, target)), self)
        self.dispatch(conn)


def forward_opaque(conn: Conn, prefix: bytes, client_eof: bool = False) -> None:
    """Relay ``conn`` to its target byte for byte; ``prefix`` was already read from it."""
    fwd = conn.forwarder
    relay = Relay(fwd.tracker, conn.src)
    conn.transport.set_protocol(relay.client)
    relay.client.connection_made(conn.transport)
    if prefix:
        relay.client.data_received(prefix)
    if client_eof:
        relay.client.eof = True
    conn.transport.resume_reading()
    relay.connect_task = fwd.loop.create_task(_connect(fwd, relay, conn.accepted, conn.target))


async def _connect(fwd: Acceptor, relay: Relay, accepted: Accepted, target: Addr) -> None:
    try:
        await asyncio.wait_for(fwd.loop.create_connection(relay.new_upstream, target.host, target.port), fwd.connect_timeout)
    except asyncio.TimeoutError:
        _failed(fwd, relay, target, "connect timeout")
        return
    except OSError as exc:
        _failed(fwd, relay, target, f"i/o: {exc.strerror or exc}")
        return
    except asyncio.CancelledError:
        # The client left while we were connecting.
        if relay.upstream is not None and relay.upstream.transport is not None:
            relay.upstream.transport.close()
        relay.upstream = None
        relay.finish()
        return
    relay.connect_task = None
    if relay.client.lost:  # the client left just as the upstream answered
        relay.upstream.transport.close()
        return
    relay.connected(TcpSeries(fwd.metrics, fwd.client_labels(accepted, target)))


def _failed(fwd: Acceptor, relay: Relay, target: Addr, reason: str) -> None:
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
