"""The outbound stack: the app's own connections, redirected to 4140.

Built from the connection upward, one line per layer:
  listener (SO_REUSEPORT)       transport.listen, one per worker
  -> original destination        transport.orig_dst (SO_ORIGINAL_DST)
  -> route                       orig dst, or the fallback when not redirected; never our own listener
  -> opaque ports                server-first ports skip detection (MESHPROXY_OUTBOUND_PORTS_DISABLE_PROTOCOL_DETECTION)
  -> HTTP detection              transport.detect + core.detect (one read, 10 s; timeout -> opaque)
  -> HTTP/1 | HTTP/2 | opaque    http.h1 / http.h2 with metrics and synthetic errors | transport.relay
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


def http_labels(target: Addr) -> tuple[Any, ...]:
    # Endpoint labels (ref 7.1): no logical authority until discovery exists.
    return ("outbound", None, str(target), target.host, str(target.port), "no_identity", None, None, "not_provided_by_service_discovery",
            None, None, None, None, None, None, None, None, None, None)


def build(config: Config, metrics: Any, tracker: RelayTracker, http: HttpStage) -> Acceptor:
    informational = not config.ingress_mode  # ref 1.5: OUTBOUND_DISABLE_INFORMATIONAL_HEADERS defaults to ingress mode
    results, durations = metrics.outbound_tcp_detect_http_results_total, metrics.outbound_tcp_detect_http_duration_seconds

    def detected(conn: Conn, kind: str, prefix: bytes, client_eof: bool, elapsed: float) -> None:
        result = kind if kind in (core_detect.HTTP1, core_detect.HTTP2, detect.READ_TIMEOUT) else ("error" if kind == detect.CLOSED else "not_http")
        results.labels(result).value += 1
        durations.labels(result).observe(elapsed)
        route_ = HttpRoute("outbound", conn.target, http_labels(conn.target), config.outbound_connect_timeout,
                           config.http_response_timeout, informational)
        if kind == core_detect.HTTP1 and not client_eof:
            http.serve_http1(conn.transport, route_, prefix, conn.src)
        elif kind == core_detect.HTTP2 and not client_eof and http.h2_available:
            http.serve_http2(conn.transport, route_, prefix, conn.src)
        elif kind == detect.CLOSED:
            conn.transport.close()
            conn.src.closed("")
        else:
            forward_opaque(conn, prefix, client_eof)  # not HTTP, or no bytes in time: bytes pass unchanged

    def dispatch(conn: Conn) -> None:
        if conn.target.port in config.outbound_opaque_ports:
            forward_opaque(conn, b"")
            return
        detect.start(conn, core_detect.detect_http, detected, config.outbound_detect_timeout, core_detect.HTTP_DETECT_LIMIT, http.live)

    return Acceptor("outbound", route(config), config.outbound_connect_timeout, metrics, tracker,
                    server_labels, client_labels, metrics.outbound_tcp_errors_total, dispatch)
