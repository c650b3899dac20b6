"""The HTTP stage of a connection: after detection, serve it as HTTP/1 or HTTP/2.

Owned per worker (``HttpStage``): the upstream pools (``Clients``) and the set
of live HTTP server connections, which the drain closes gracefully (HTTP/1
after the request in flight, HTTP/2 with GOAWAY).
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.config import Config
from proxy.http.access_log import AccessLog
from proxy.http.stack import Clients, HttpRoute
from proxy.native import load
from proxy.transport import relay as relay_mod

_http1, HTTP1_IMPLEMENTATION = load("http1", "proxy.http.h1")  # compiled from proxy/http/h1.py unless disabled
Http1Server = _http1.Http1Server

try:  # HTTP/2 proxying lives in its own module; without it h2c is relayed opaquely.
    from proxy.http.h2 import H2ServerConnection, H2Settings
except ImportError:  # pragma: no cover
    H2ServerConnection = None  # type: ignore[assignment,misc]
    H2Settings = None  # type: ignore[assignment,misc]


class HttpStage:
    def __init__(self, config: Config, metrics: Any, tracker: relay_mod.RelayTracker, pure: bool, local: Any = None) -> None:
        self.config = config
        self.local = local
        self.metrics = metrics
        self.tracker = tracker
        self.pure = pure
        self.clients = Clients(config)
        self.live: set[Any] = set()
        # Requests in flight per direction, against LINKERD2_PROXY_*_MAX_IN_FLIGHT (then 503, load shed).
        self.in_flight = {"inbound": [0, config.inbound_max_in_flight], "outbound": [0, config.outbound_max_in_flight]}
        self.access_log = AccessLog(config.access_log) if config.access_log else None  # inbound requests only
        self.h2_settings = {d: H2Settings.from_config(config, d) for d in ("inbound", "outbound")} if H2Settings is not None else {}

    @property
    def h2_available(self) -> bool:
        return H2ServerConnection is not None

    def _relay_factory(self, client: Any, upstream: Any, to_upstream: bytes, to_client: bytes, src: Any) -> None:
        relay_mod.join(self.tracker, src, client, upstream, to_upstream, to_client)

    def serve_http1(self, transport: Any, route: HttpRoute, prefix: bytes, src: Any) -> None:
        pool_idle = self.config.inbound_http1_pool_idle_timeout if route.direction == "inbound" else self.config.outbound_http1_pool_idle_timeout
        server = Http1Server(route, self.metrics, self.clients, self.pure, self.config.http_max_head_size, pool_idle,
                             self.config.max_idle_conns_per_endpoint, self.live, self._relay_factory, src, self.local,
                             self.in_flight[route.direction])
        if route.direction == "inbound":
            server.access_log = self.access_log
        else:
            # Requests to meshed endpoints go as HTTP/2 streams marked l5d-orig-proto (ref 3.3).
            server.h2_upgrade = self.h2_settings.get("outbound")
        transport.set_protocol(server)
        server.connection_made(transport)
        transport.resume_reading()
        if prefix:
            server.data_received(prefix)

    def serve_http2(self, transport: Any, route: HttpRoute, prefix: bytes, src: Any) -> None:
        assert H2ServerConnection is not None
        server = H2ServerConnection(route, self.metrics, self.clients, self.h2_settings[route.direction], local=self.local, src=src)
        server.in_flight_limit = self.in_flight[route.direction]  # streams count against max-in-flight too
        self.live.add(server)
        done = getattr(server, "done", None)
        if isinstance(done, asyncio.Future):
            def finished(_f: Any) -> None:
                self.live.discard(server)
                src.closed("")
            done.add_done_callback(finished)
        transport.set_protocol(server)
        server.connection_made(transport)
        transport.resume_reading()
        if prefix:
            server.data_received(prefix)

    def shutdown(self) -> None:
        for server in list(self.live):
            server.shutdown()

    async def wait_empty(self) -> None:
        while self.live:
            await asyncio.sleep(0.05)

    def close(self) -> None:
        self.clients.close()
