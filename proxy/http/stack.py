"""What HTTP/1 and HTTP/2 adapters share: where requests go, and how they are counted.

* ``HttpRoute``: decided once per accepted connection by the app layer (the
  direction's composition): the endpoint to dial, the metric labels, timeouts.
* ``Exchange``: one request/response, counted as Linkerd counts it (ref 7.1):
  ``request_total`` when the request is dispatched, ``response_latency_ms`` at
  the first response byte (headers), ``response_total`` when the response
  stream ends (with status, classification, grpc-status and error).
* ``Clients``: the per-worker upstream connection pools, keyed by endpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Addr
from proxy.http.errors import ProxyError

# gRPC codes Linkerd classifies as failures (ref 7.1).
GRPC_FAILURE_CODES = frozenset({15, 4, 13, 7, 14, 2})  # DATA_LOSS, DEADLINE_EXCEEDED, INTERNAL, PERMISSION_DENIED, UNAVAILABLE, UNKNOWN


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


class RouteSeries:
    """The HTTP series of one endpoint label set, resolved once: a request then costs
    dict lookups on small keys instead of hashing the ~20 endpoint labels three times."""

    __slots__ = ("metrics", "labels", "requests", "latency", "responses")

    def __init__(self, metrics: Any, labels: tuple[Any, ...]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.requests = metrics.request_total.labels(*labels)
        self.latency: dict[int, Any] = {}
        self.responses: dict[tuple[Any, ...], Any] = {}

    def latency_for(self, status: int) -> Any:
        series = self.latency.get(status)
        if series is None:
            series = self.latency[status] = self.metrics.response_latency_ms.labels(*self.labels, str(status))
        return series

    def response_for(self, key: tuple[Any, ...]) -> Any:
        series = self.responses.get(key)
        if series is None:
            series = self.responses[key] = self.metrics.response_total.labels(*self.labels, *key)
        return series


_ROUTE_SERIES: dict[tuple[int, tuple[Any, ...]], RouteSeries] = {}
_ROUTE_SERIES_MAX = 4096  # bounded: endpoint labels churn with the endpoints


def route_series(metrics: Any, labels: tuple[Any, ...]) -> RouteSeries:
    key = (id(metrics), labels)
    found = _ROUTE_SERIES.get(key)
    if found is None or metrics.request_total.series.get(labels) is not found.requests:
        if len(_ROUTE_SERIES) >= _ROUTE_SERIES_MAX:
            _ROUTE_SERIES.clear()
        found = _ROUTE_SERIES[key] = RouteSeries(metrics, labels)
    return found


class Exchange:
    """The metrics of one request. Call ``response_head`` at the first response
    byte and ``end`` once, when the response stream is over (or failed)."""

    __slots__ = ("metrics", "route", "series", "started", "status", "grpc", "ended")

    def __init__(self, metrics: Any, route: HttpRoute, grpc: bool, labels: tuple[Any, ...] | None = None) -> None:
        self.metrics = metrics
        self.route = route
        self.series = route_series(metrics, labels or route.labels)
        self.started = time.monotonic()
        self.status: int | None = None
        self.grpc = grpc
        self.ended = False
        self.series.requests.value += 1
        authz = route.authz_labels
        if authz is not None:
            if route.authorized:
                metrics.inbound_http_authz_allow_total.labels(*authz[0]).value += 1
            else:
                metrics.inbound_http_authz_deny_total.labels(*authz[1]).value += 1

    def response_head(self, status: int) -> None:
        self.status = status
        self.series.latency_for(status).observe((time.monotonic() - self.started) * 1000.0)

    def end(self, grpc_status: int | None = None, error: str = "") -> None:
        """``grpc_status`` from headers or trailers; ``error`` when the stream failed."""
        if self.ended:
            return
        self.ended = True
        status = self.status
        if error:
            failure = True
        elif self.grpc:
            if grpc_status is None:
                grpc_status = 2  # gRPC without a status in trailers counts as UNKNOWN (ref 7.1)
            failure = grpc_status in GRPC_FAILURE_CODES
        else:
            failure = status is None or status >= 500
        self.series.response_for((
            str(status) if status is not None else None,
            "failure" if failure else "success",
            str(grpc_status) if grpc_status is not None else "",
            error,
        )).value += 1

    def proxy_error(self, err: ProxyError) -> None:
        """The proxy answered by itself: count it where Linkerd counts it."""
        family = self.metrics.inbound_http_errors_total if self.route.direction == "inbound" else self.metrics.outbound_http_errors_total
        family.labels(err.metric, *self.route.error_labels).value += 1


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
