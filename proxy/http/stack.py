"""What HTTP/1 and HTTP/2 adapters share: where requests go, and how they are counted.

* ``HttpRoute``: decided once per accepted connection by the app layer (the
  direction's composition): the endpoint to dial, the metric labels, timeouts.
* ``Exchange``: one request/response, counted as Linkerd counts it (ref 7.1);
  defined in proxy.http.exchange (compiled twin: proxy._native.exchange).
* ``Clients``: the per-worker upstream connection pools, keyed by endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.config import Addr
from proxy.native import load

_exchange = load("exchange", "proxy.http.exchange")[0]  # per-request metrics: compiled twin unless disabled
if TYPE_CHECKING:
    from proxy.http.exchange import GRPC_FAILURE_CODES, Exchange, RouteSeries, route_series
else:
    GRPC_FAILURE_CODES = _exchange.GRPC_FAILURE_CODES
    Exchange = _exchange.Exchange
    RouteSeries = _exchange.RouteSeries
    route_series = _exchange.route_series


@dataclass(frozen=True, slots=True)
class HttpRoute:
    direction: str  # "inbound" | "outbound"
    target: Addr  # the endpoint requests are sent to
    labels: tuple[Any, ...]  # values for metrics.families.HTTP_LABELS
    connect_timeout: float
    response_timeout: float | None = None  # None: wait as long as the client does
    informational_headers: bool = True  # may l5d-proxy-error be sent to this client?
    error_labels: tuple[str, ...] = field(default=())  # labels after `error` of *_http_errors_total
    identity: str = ""  # the endpoint's TLS identity: requests go over mTLS when set
    protocol: str = ""  # discovery's protocol hint for the endpoint: "", "http1", "http2", "opaque"
    client_id: str = ""  # inbound: the authenticated peer identity ("" = none), for l5d-client-id
    dst_labels: tuple[Any, ...] | None = None  # TCP labels of connections to the endpoint (tcp_* peer="dst")
    authorized: bool = True  # inbound: does the default policy let this client in? (else 403 per request)
    authz_labels: tuple[Any, ...] | None = None  # inbound: labels of inbound_http_authz_{allow,deny}_total
    backend: Any = None  # outbound logical service: an endpoint is picked per request (balance.backend)
    endpoint_labels: Any = None  # (endpoint state, authority, meshed) -> (HTTP labels, TCP dst labels, identity)
    ingress: Any = None  # ingress mode: name:port -> backend (or None), from l5d-dst-override or the Host header


class Clients:
    """Upstream connections of one worker, shared by every client connection.

    ``pools`` maps (protocol, endpoint) to a pool object the protocol adapter
    creates on first use; idle pools are closed by their own idle timers.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.pools: dict[tuple[str, Addr], Any] = {}

    def get(self, kind: str, target: Addr, factory: Any) -> Any:
        key = (kind, target)
        pool = self.pools.get(key)
        if pool is None or pool.closed:
            pool = self.pools[key] = factory()
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
