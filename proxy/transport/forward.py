"""Accept, learn the original destination, connect, relay: opaque TCP forwarding.

A ``TcpForwarder`` serves one listener. ``route`` (supplied by the app layer,
one per direction) maps the original destination to the address to dial, or
to None to refuse the connection (a loop, an address we must not serve). The
accepted socket is handed to the relay at once; bytes that arrive while the
upstream connects are held (bounded) and replayed.
"""

from __future__ import annotations

import asyncio
import socket
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


class TcpForwarder:
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
    ) -> None:
        self.direction = direction
        self.route = route
        self.connect_timeout = connect_timeout
        self.metrics = metrics
        self.tracker = tracker
        self.server_labels = server_labels
        self.client_labels = client_labels
        self.errors = errors  # {inbound,outbound}_tcp_errors_total
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
        relay = Relay(self.tracker, TcpSeries(self.metrics, self.server_labels(accepted, target)))
        transport.set_protocol(relay.client)
        relay.client.connection_made(transport)
        relay.connect_task = self.loop.create_task(self.connect(relay, accepted, target))

    async def connect(self, relay: Relay, accepted: Accepted, target: Addr) -> None:
        try:
            await asyncio.wait_for(
                self.loop.create_connection(relay.new_upstream, target.host, target.port),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            self._failed(relay, target, "connect timeout")
            return
        except OSError as exc:
            self._failed(relay, target, f"i/o: {exc.strerror or exc}")
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
        relay.connected(TcpSeries(self.metrics, self.client_labels(accepted, target)))

    def _failed(self, relay: Relay, target: Addr, reason: str) -> None:
        self.errors.labels(reason.split(":")[0], str(target), target.host, str(target.port)).value += 1
        log.info("connect failed", direction=self.direction, target=str(target), reason=reason)
        relay.upstream = None
        relay.connect_task = None
        relay.fail("ECONNREFUSED" if "refused" in reason.lower() else "")


class AcceptProtocol:
    """Lives for the moment between accept and the relay taking the socket over."""

    __slots__ = ("forwarder",)

    def __init__(self, forwarder: TcpForwarder) -> None:
        self.forwarder = forwarder

    def connection_made(self, transport: Any) -> None:
        self.forwarder.accepted(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        pass

    def data_received(self, data: bytes) -> None:  # not reached: the relay takes over first
        pass

    def eof_received(self) -> bool:
        return False


def set_nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
