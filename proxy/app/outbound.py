"""The outbound stack: the app's own connections, redirected to 4140.

Built from the connection upward:
  listener (SO_REUSEPORT)           one per worker, transport.listen
  -> original destination            SO_ORIGINAL_DST, transport.orig_dst
  -> route                           orig dst, or the fallback when not redirected
  -> opaque relay                    transport.relay (protocol detection and HTTP come later)
"""

from __future__ import annotations

from typing import Any

from proxy.config import Addr, Config
from proxy.transport.forward import Accepted, TcpForwarder
from proxy.transport.relay import RelayTracker


def route(config: Config) -> Any:
    fallback: Addr | None = config.outbound_fallback
    listeners = set(config.outbound_listen)

    def choose(conn: Accepted) -> Addr | str:
        if not conn.redirected:
            if fallback is not None:
                return fallback
            return "not redirected and no MESHPROXY_OUTBOUND_FALLBACK_ADDR"
        if conn.orig_dst in listeners:
            return "loop to own outbound listener"
        return conn.orig_dst

    return choose


def server_labels(conn: Accepted, target: Addr | None) -> tuple[Any, ...]:
    # The outbound server side always reads from the local app (ref 7.2).
    o = conn.orig_dst
    return ("outbound", "src", None, str(o), o.host, str(o.port), "no_identity", None, None, "loopback", None, None, None, None, None)


def client_labels(conn: Accepted, target: Addr | None) -> tuple[Any, ...]:
    t = target or conn.orig_dst
    return ("outbound", "dst", None, str(t), t.host, str(t.port), "no_identity", None, None, "not_provided_by_service_discovery", None, None, None, None, None)


def build(config: Config, metrics: Any, tracker: RelayTracker) -> TcpForwarder:
    return TcpForwarder(
        "outbound", route(config), config.outbound_connect_timeout, metrics, tracker,
        server_labels, client_labels, metrics.outbound_tcp_errors_total,
    )
