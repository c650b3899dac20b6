"""Every metric family the proxy exports, in one place (ref section 7).

Label names are listed in Linkerd's emission order. A series sets a label to
None when Linkerd would omit it (for example ``authority`` without a logical
name, or ``server_id`` on a plaintext connection); the renderer skips those.
"""

from __future__ import annotations

from proxy.metrics.registry import Counter, Gauge, Histogram, Registry

# Transport labels (ref 7.2): who, where to, and what TLS the connection had.
TCP_LABELS = (
    "direction", "peer", "authority", "target_addr", "target_ip", "target_port",
    "tls", "server_id", "client_id", "no_tls_reason", "sni",
    "srv_group", "srv_kind", "srv_name", "srv_port",
)

# Endpoint labels of the legacy HTTP families (ref 7.1), inbound and outbound in one order.
HTTP_LABELS = (
    "direction", "authority", "target_addr", "target_ip", "target_port",
    "tls", "server_id", "client_id", "no_tls_reason",
    "srv_group", "srv_kind", "srv_name", "srv_port",
    "route_group", "route_kind", "route_name",
    "authz_group", "authz_kind", "authz_name",
)
# Linkerd's response_latency_ms buckets, in milliseconds (ref 7.1).
LATENCY_MS_BUCKETS = (1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000)
DETECT_SECONDS_BUCKETS = (0.001, 0.01, 0.1, 1, 10)


class ProxyMetrics:
    """The families of one worker process."""

    def __init__(self, retain_idle: float = 600.0) -> None:
        r = self.registry = Registry(retain_idle)
        self.tcp_open_total = r.add(Counter("tcp_open_total", "Total count of opened connections", TCP_LABELS))
        self.tcp_open_connections = r.add(Gauge("tcp_open_connections", "Number of currently-open connections", TCP_LABELS))
        self.tcp_read_bytes_total = r.add(Counter("tcp_read_bytes_total", "Total count of bytes read from peers", TCP_LABELS))
        self.tcp_write_bytes_total = r.add(Counter("tcp_write_bytes_total", "Total count of bytes written to peers", TCP_LABELS))
        self.tcp_close_total = r.add(Counter("tcp_close_total", "Total count of closed connections", TCP_LABELS + ("errno",)))
        self.inbound_tcp_errors_total = r.add(Counter("inbound_tcp_errors_total", "The total number of inbound TCP connections that could not be processed due to a proxy error", ("error", "target_addr", "target_ip", "target_port")))
        self.request_total = r.add(Counter("request_total", "Total count of HTTP requests", HTTP_LABELS))
        self.response_total = r.add(Counter("response_total", "Total count of HTTP responses", HTTP_LABELS + ("status_code", "classification", "grpc_status", "error")))
        self.response_latency_ms = r.add(Histogram("response_latency_ms", "Elapsed times between a request's headers being received and its response stream completing", HTTP_LABELS + ("status_code",), LATENCY_MS_BUCKETS))
        self.inbound_http_errors_total = r.add(Counter("inbound_http_errors_total", "The total number of inbound HTTP requests that could not be processed due to a proxy error", ("error", "target_addr", "target_ip", "target_port", "srv_group", "srv_kind", "srv_name", "srv_port")))
        self.outbound_http_errors_total = r.add(Counter("outbound_http_errors_total", "The total number of outbound HTTP requests that could not be processed due to a proxy error", ("error",)))
        self.inbound_tcp_detect_http_results_total = r.add(Counter("inbound_tcp_detect_http_results_total", "Results of HTTP protocol detection on inbound connections", ("result",)))
        self.outbound_tcp_detect_http_results_total = r.add(Counter("outbound_tcp_detect_http_results_total", "Results of HTTP protocol detection on outbound connections", ("result",)))
        self.inbound_tcp_detect_http_duration_seconds = r.add(Histogram("inbound_tcp_detect_http_duration_seconds", "Time taken by HTTP protocol detection on inbound connections", ("result",), DETECT_SECONDS_BUCKETS))
        self.outbound_tcp_detect_http_duration_seconds = r.add(Histogram("outbound_tcp_detect_http_duration_seconds", "Time taken by HTTP protocol detection on outbound connections", ("result",), DETECT_SECONDS_BUCKETS))
        authz = ("target_addr", "target_ip", "target_port", "srv_group", "srv_kind", "srv_name", "srv_port")
        self.inbound_http_authz_allow_total = r.add(Counter("inbound_http_authz_allow_total", "The total number of inbound HTTP requests that were authorized", authz + ("route_group", "route_kind", "route_name", "authz_group", "authz_kind", "authz_name", "tls", "client_id")))
        self.inbound_http_authz_deny_total = r.add(Counter("inbound_http_authz_deny_total", "The total number of inbound HTTP requests that could not be processed due to a proxy error", authz + ("route_group", "route_kind", "route_name", "tls", "client_id")))
        self.inbound_tcp_authz_allow_total = r.add(Counter("inbound_tcp_authz_allow_total", "The total number of inbound TCP connections that were authorized", authz + ("authz_group", "authz_kind", "authz_name", "tls", "client_id")))
        self.inbound_tcp_authz_deny_total = r.add(Counter("inbound_tcp_authz_deny_total", "The total number of inbound TCP connections that were denied", authz + ("tls", "client_id")))
        # Route metrics of service profiles (ref 7.1): the logical destination and the route's name.
        route = ("direction", "dst", "rt_route")
        self.route_request_total = r.add(Counter("route_request_total", "Total count of HTTP requests", route))
        self.route_response_total = r.add(Counter("route_response_total", "Total count of HTTP responses", route + ("status_code", "classification")))
        self.route_response_latency_ms = r.add(Histogram("route_response_latency_ms", "Elapsed times between a request's headers being received and its response stream completing", route + ("status_code",), LATENCY_MS_BUCKETS))
        self.route_actual_request_total = r.add(Counter("route_actual_request_total", "Total count of HTTP requests sent, retries included", route))
        self.route_retryable_total = r.add(Counter("route_retryable_total", "Total count of retryable HTTP responses", route + ("skipped",)))
        # meshproxy extension: the event loop's task count, to see that abandoned requests leave nothing behind.
        self.outbound_backends = r.add(Gauge("meshproxy_outbound_backends", "Logical destinations whose discovery and balancer state is held", ()))
        self.process_asyncio_tasks = r.add(Gauge("meshproxy_asyncio_tasks", "Number of asyncio tasks alive in the workers", ()))
        self.outbound_tcp_errors_total = r.add(Counter("outbound_tcp_errors_total", "The total number of outbound TCP connections that could not be processed due to a proxy error", ("error", "target_addr", "target_ip", "target_port")))
