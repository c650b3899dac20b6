"""The inbound stack: connections from peers, redirected to 4143, to the local app.

Built from the connection upward, one line per layer:
  listener (SO_REUSEPORT)       transport.listen, one per worker
  -> original destination        transport.orig_dst (SO_ORIGINAL_DST)
  -> route                       podIP:port of the app; never our own inbound port (a loop)
  -> opaque ports                skip detection entirely (LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION)
  -> TLS ClientHello peek        core.detect; TLS not for us is passed through opaque (mTLS: next)
  -> HTTP detection              one read, 10 s; timeout or not HTTP -> opaque
  -> HTTP/1 | HTTP/2 | opaque    http.h1 / http.h2 | transport.relay
"""

from __future__ import annotations

from typing import Any

from proxy.config import Addr, Config
from proxy.core import detect as core_detect
from proxy.http.server import HttpStage
from proxy.http.stack import HttpRoute
from proxy.transport import detect
from proxy.transport.forward import Accepted, Acceptor, Conn, forward_opaque
from proxy.transport.relay import RelayTracker

# The default server of Linkerd's inbound policy when no policy controller answers.
DEFAULT_SERVER = ("", "default")
TLS = "tls"


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
    opaque = config.inbound_opaque_ports

    def labels(conn: Accepted, target: Addr | None) -> tuple[Any, ...]:
        o = conn.orig_dst
        reason = "port_skipped" if o.port in opaque else "no_tls_from_remote"
        return ("inbound", "src", None, str(o), o.host, str(o.port), "no_identity", None, None, reason, None,
                DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(o.port))

    return labels


def client_labels(conn: Accepted, target: Addr | None) -> tuple[Any, ...]:
    t = target or conn.orig_dst
    # The app is local: the inbound client side is plaintext over "loopback" (ref 7.2).
    return ("inbound", "dst", None, str(t), t.host, str(t.port), "no_identity", None, None, "loopback", None, None, None, None, None)


def decide(buf: bytes) -> str:
    """TLS first (ref 2.1), then HTTP."""
    sni = core_detect.client_hello_sni(buf)
    if sni == core_detect.NEED_MORE:
        return core_detect.NEED_MORE
    if sni is not None:
        return TLS
    return core_detect.detect_http(buf)


def build(config: Config, metrics: Any, tracker: RelayTracker, http: HttpStage) -> Acceptor:
    policy = config.inbound_default_policy
    results, durations = metrics.inbound_tcp_detect_http_results_total, metrics.inbound_tcp_detect_http_duration_seconds

    def detected(conn: Conn, kind: str, prefix: bytes, client_eof: bool, elapsed: float) -> None:
        if kind != TLS:
            result = kind if kind in (core_detect.HTTP1, core_detect.HTTP2, detect.READ_TIMEOUT) else ("error" if kind == detect.CLOSED else "not_http")
            results.labels(result).value += 1
            durations.labels(result).observe(elapsed)
        t = conn.target
        o = conn.accepted.orig_dst
        labels = ("inbound", None, str(o), o.host, str(o.port), "no_identity", None, None, "no_tls_from_remote",
                  DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(o.port), "", "default", "default", "", "default", policy)
        route_ = HttpRoute("inbound", t, labels, config.inbound_connect_timeout, config.http_response_timeout,
                           True, (str(o), o.host, str(o.port), DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(o.port)))
        if kind == core_detect.HTTP1 and not client_eof:
            http.serve_http1(conn.transport, route_, prefix, conn.src)
        elif kind == core_detect.HTTP2 and not client_eof and http.h2_available:
            http.serve_http2(conn.transport, route_, prefix, conn.src)
        elif kind == detect.CLOSED:
            conn.transport.close()
            conn.src.closed("")
        else:
            forward_opaque(conn, prefix, client_eof)

    def dispatch(conn: Conn) -> None:
        if conn.accepted.orig_dst.port in config.inbound_opaque_ports:
            forward_opaque(conn, b"")  # opaque port: no detection at all (server-speaks-first protocols)
            return
        detect.start(conn, decide, detected, config.inbound_detect_timeout, core_detect.TLS_DETECT_LIMIT, http.live)

    return Acceptor("inbound", route(config), config.inbound_connect_timeout, metrics, tracker,
                    make_server_labels(config), client_labels, metrics.inbound_tcp_errors_total, dispatch)
