"""Every metric family the proxy exports, in one place (ref section 7).

Label names are listed in Linkerd's emission order. A series sets a label to
None when Linkerd would omit it (for example ``authority`` without a logical
name, or ``server_id`` on a plaintext connection); the renderer skips those.
"""

from __future__ import annotations

from proxy.metrics.registry import Counter, Gauge, Registry

# Transport labels (ref 7.2): who, where to, and what TLS the connection had.
TCP_LABELS = (
    "direction", "peer", "authority", "target_addr", "target_ip", "target_port",
    "tls", "server_id", "client_id", "no_tls_reason", "sni",
    "srv_group", "srv_kind", "srv_name", "srv_port",
)


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
        self.outbound_tcp_errors_total = r.add(Counter("outbound_tcp_errors_total", "The total number of outbound TCP connections that could not be processed due to a proxy error", ("error", "target_addr", "target_ip", "target_port")))
