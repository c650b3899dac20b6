"""How one HTTP request is counted, as Linkerd counts it (ref 7.1); see proxy.http.stack.

``Exchange`` adds ``request_total`` when the request is dispatched,
``response_latency_ms`` at the first response byte (headers) and
``response_total`` when the response stream ends (with status,
classification, grpc-status and error). ``RouteSeries`` resolves the series of
one endpoint label set once, so a request costs small-key dict lookups.

Compiled as it is (setup.py COMPILED_TWINS, proxy._native.exchange): every
HTTP/1 request and HTTP/2 stream makes one ``Exchange``.
"""

from __future__ import annotations

from bisect import bisect_left
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.http.errors import ProxyError
    from proxy.http.stack import HttpRoute

# gRPC codes Linkerd classifies as failures (ref 7.1).
GRPC_FAILURE_CODES = frozenset({15, 4, 13, 7, 14, 2})  # DATA_LOSS, DEADLINE_EXCEEDED, INTERNAL, PERMISSION_DENIED, UNAVAILABLE, UNKNOWN


class RouteSeries:
    """The HTTP series of one endpoint label set, resolved once: a request then costs
    dict lookups on small keys instead of hashing the ~20 endpoint labels three times."""

    __slots__ = ("metrics", "labels", "requests", "latency", "responses", "checked", "by_status")

    def __init__(self, metrics: Any, labels: tuple[Any, ...]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.requests = metrics.request_total.labels(*labels)
        self.checked = metrics.request_total.last_snapshot  # registered as of this snapshot
        self.latency: dict[int, Any] = {}
        # (status, failure, grpc-status, error) -> response_total series; labels are built on a miss only.
        self.responses: dict[tuple[Any, ...], Any] = {}
        # status -> its StatusSeries: what a plain HTTP response needs, found with one int key.
        self.by_status: dict[int, StatusSeries] = {}

    def status_series(self, status: int) -> StatusSeries:
        found = self.by_status.get(status)
        if found is None:
            found = self.by_status[status] = StatusSeries(self.latency_for(status), self.response_for((status, status >= 500, None, "")))
        return found

    def latency_for(self, status: int) -> Any:
        series = self.latency.get(status)
        if series is None:
            series = self.latency[status] = self.metrics.response_latency_ms.labels(*self.labels, str(status))
        return series

    def response_for(self, key: tuple[Any, ...]) -> Any:
        series = self.responses.get(key)
        if series is None:
            status, failure, grpc_status, error = key
            series = self.responses[key] = self.metrics.response_total.labels(
                *self.labels, str(status) if status is not None else None, "failure" if failure else "success",
                str(grpc_status) if grpc_status is not None else "", error)
        return series


class StatusSeries:
    """The series one response status ends in when it is neither gRPC nor failed by an error:
    its latency histogram and its response_total counter."""

    __slots__ = ("latency", "plain")

    def __init__(self, latency: Any, plain: Any) -> None:
        self.latency = latency
        self.plain = plain


_ROUTE_SERIES: dict[tuple[int, tuple[Any, ...]], RouteSeries] = {}
_ROUTE_SERIES_MAX = 4096  # bounded: endpoint labels churn with the endpoints
# The same label tuple object is passed for every request of a connection (or endpoint):
# keyed by its id, a request skips hashing the labels. Each entry keeps its own tuple (equal
# tuples of other connections share the RouteSeries, not the id), so the id cannot be reused
# while it is cached.
_BY_LABELS_ID: dict[int, tuple[tuple[Any, ...], RouteSeries]] = {}


def route_series(metrics: Any, labels: tuple[Any, ...]) -> RouteSeries:
    entry = _BY_LABELS_ID.get(id(labels))
    family = metrics.request_total
    found = None
    if entry is not None and entry[0] is labels and entry[1].metrics is metrics:
        found = entry[1]
        # Still the registered series? Only a snapshot drops series (idle ones), so the
        # labels are looked up again once per snapshot, not once per request.
        last = family.last_snapshot
        if found.checked == last:
            return found
        if family.series.get(labels) is found.requests:
            found.checked = last
            return found
    key = (id(metrics), labels)
    found = _ROUTE_SERIES.get(key)
    if found is None or metrics.request_total.series.get(labels) is not found.requests:
        if len(_ROUTE_SERIES) >= _ROUTE_SERIES_MAX:
            _ROUTE_SERIES.clear()
        found = _ROUTE_SERIES[key] = RouteSeries(metrics, labels)
    if len(_BY_LABELS_ID) >= _ROUTE_SERIES_MAX:
        _BY_LABELS_ID.clear()
    _BY_LABELS_ID[id(labels)] = (labels, found)
    return found


class Exchange:
    """The metrics of one request. Call ``response_head`` at the first response
    byte and ``end`` once, when the response stream is over (or failed)."""

    __slots__ = ("metrics", "route", "series", "started", "status", "grpc", "ended", "by_status")

    def __init__(self, metrics: Any, route: HttpRoute, grpc: bool, labels: tuple[Any, ...] | None = None) -> None:
        self.metrics = metrics
        self.route = route
        series = self.series = route_series(metrics, labels or route.labels)
        self.started = monotonic()
        self.status: int | None = None
        self.by_status: StatusSeries | None = None  # the status's series, once a head is seen
        self.grpc = grpc
        self.ended = False
        series.requests.value += 1
        authz = route.authz_labels
        if authz is not None:
            if route.authorized:
                metrics.inbound_http_authz_allow_total.labels(*authz[0]).value += 1
            else:
                metrics.inbound_http_authz_deny_total.labels(*authz[1]).value += 1

    def response_head(self, status: int) -> None:
        self.status = status
        series = self.series
        found = series.by_status.get(status)
        if found is None:
            found = series.status_series(status)
        self.by_status = found
        latency = found.latency
        ms = (monotonic() - self.started) * 1000.0
        # HistogramSeries.observe, inlined as hot paths update series in place (metrics.registry):
        # one Python-level call less per request.
        latency.counts[bisect_left(latency.bounds, ms)] += 1
        latency.sum += ms
        latency.count += 1

    def end(self, grpc_status: int | None = None, error: str = "") -> None:
        """``grpc_status`` from headers or trailers; ``error`` when the stream failed."""
        if self.ended:
            return
        self.ended = True
        status = self.status
        if not error and not self.grpc and self.by_status is not None:
            self.by_status.plain.value += 1  # the common case: no key to build and hash
            return
        if error:
            failure = True
        elif self.grpc:
            if grpc_status is None:
                grpc_status = 2  # gRPC without a status in trailers counts as UNKNOWN (ref 7.1)
            failure = grpc_status in GRPC_FAILURE_CODES
        else:
            failure = status is None or status >= 500
        self.series.response_for((status, failure, grpc_status, error)).value += 1

    def proxy_error(self, err: ProxyError) -> None:
        """The proxy answered by itself: count it where Linkerd counts it."""
        family = self.metrics.inbound_http_errors_total if self.route.direction == "inbound" else self.metrics.outbound_http_errors_total
        family.labels(err.metric, *self.route.error_labels).value += 1
