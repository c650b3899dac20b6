"""The inbound stack: connections from peers, redirected to 4143, to the local app.

Built from the connection upward:
  listener (SO_REUSEPORT)           one per worker, transport.listen
  -> original destination            SO_ORIGINAL_DST, transport.orig_dst
  -> route                           podIP:port of the app; never our own inbound port (a loop)
  -> opaque relay                    transport.relay (TLS and HTTP detection come later)
"""

from __future__ import annotations

from typing import Any

from proxy.config import Addr, Config
from proxy.transport.forward import Accepted, TcpForwarder
from proxy.transport.relay import RelayTracker

# The default server of Linkerd's inbound policy when no policy controller answers.
DEFAULT_SERVER = ("", "default")


def route(config: Config) -> Any:
    fallback: Addr | None = config.inbound_fallback
    inbound_port = config.inbound_listen.port
    allowed_ips = config.inbound_ips

    def choose(conn: Accepted) -> Addr | str:
        if not conn.redirected:
            if fallback is not None:
                return fallback
            return "not redirected and no MESHPROXY_INBOUND_FALLBACK_ADDR"
        if conn.orig_dst.port == inbound_port:
            return "loop to own inbound port"
        if allowed_ips and conn.orig_dst.host not in allowed_ips:
            return "original destination is not one of LINKERD2_PROXY_INBOUND_IPS"
        return conn.orig_dst

    return choose


def make_server_labels(config: Config) -> Any:
    policy = config.inbound_default_policy

    def labels(conn: Accepted, target: Addr | None) -> tuple[Any, ...]:
        o = conn.orig_dst
        return ("inbound", "src", None, str(o), o.host, str(o.port), "no_identity", None, None, "no_tls_from_remote", None,
                DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(o.port))

    return labels


def client_labels(conn: Accepted, target: Addr | None) -> tuple[Any, ...]:
    t = target or conn.orig_dst
    # The app is local: the inbound client side is plaintext over "loopback" (ref 7.2).
    return ("inbound", "dst", None, str(t), t.host, str(t.port), "no_identity", None, None, "loopback", None, None, None, None, None)


def build(config: Config, metrics: Any, tracker: RelayTracker) -> TcpForwarder:
    return TcpForwarder(
        "inbound", route(config), config.inbound_connect_timeout, metrics, tracker,
        make_server_labels(config), client_labels, metrics.inbound_tcp_errors_total,
    )
