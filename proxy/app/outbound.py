"""The outbound stack: the app's own connections, redirected to 4140.

Built from the connection upward, one line per layer:
  listener (SO_REUSEPORT)       transport.listen, one per worker
  -> original destination        transport.orig_dst (SO_ORIGINAL_DST)
  -> route                       discovery (standalone file) by orig dst, else orig dst / the fallback; never our own listener
  -> opaque ports                server-first ports skip detection (MESHPROXY_OUTBOUND_PORTS_DISABLE_PROTOCOL_DETECTION)
  -> HTTP detection              transport.detect + core.detect (one read, 10 s; timeout -> opaque)
  -> HTTP/1 | HTTP/2 | opaque    http.h1 / http.h2 with metrics and synthetic errors | transport.relay
"""

from __future__ import annotations

import ipaddress
from typing import Any

from proxy.balance.backend import Backends
from proxy.config import Addr, Config
from proxy.core import detect as core_detect
from proxy.discovery.static import StaticDiscovery
from proxy.http.server import HttpStage
from proxy.http.stack import HttpRoute
from proxy.tls.local import LocalIdentity
from proxy.transport import detect
from proxy.transport.forward import Accepted, Acceptor, Conn, Target, forward_opaque
from proxy.transport.relay import RelayTracker


def route(config: Config, discovery: StaticDiscovery | None, local: LocalIdentity | None, backends: Backends) -> Any:
    fallback: Addr | None = config.outbound_fallback
    listeners = set(config.outbound_listen)

    def choose(conn: Accepted) -> Target | str:
        if not conn.redirected:
            if fallback is None:
                return "not redirected and no MESHPROXY_OUTBOUND_FALLBACK_ADDR"
            dst = fallback
        elif conn.orig_dst in listeners:
            return "loop to own outbound listener"
        elif ipaddress.ip_address(conn.orig_dst.host).is_loopback:
            # ref 1.3, 3.8: iptables never redirects loopback traffic, so a redirected one is a loop.
            return "loopback destination"
        else:
            dst = conn.orig_dst
        found = discovery.resolve(dst) if discovery is not None else None
        if found is None:
            return Target(dst)
        if found.service is not None:
            # A logical service: its endpoints are balanced per request / connection (P2C, peak-EWMA),
            # and with none ready, requests wait in its queue until failfast (ref 3.9, 4).
            assert discovery is not None
            if hasattr(discovery, "backend_for"):  # the Destination API streams endpoints into the backend
                backend = discovery.backend_for(dst)
            else:
                backend = backends.get(found.service.name, found.endpoints, discovery.version, found.service, discovery)
            hint = found.endpoints[0].protocol if found.endpoints else ""
            return Target(dst, "", hint, found.service.name, backend)
        ep = found.endpoints[0]  # one endpoint's own address (a pod IP): that endpoint, meshed
        meshed = ep.identity if (local is not None and local.creds is not None) else ""
        return Target(ep.addr, meshed, ep.protocol, None, opaque_port=ep.opaque_transport_port if meshed else 0)

    return choose


def tls_labels(target: Target | None) -> tuple[Any, ...]:
    """(tls, server_id, client_id, no_tls_reason) of an outbound connection (ref 7.2)."""
    if target is not None and target.identity:
        return ("true", target.identity, None, None)
    return ("no_identity", None, None, "not_provided_by_service_discovery")


def server_labels(conn: Accepted, target: Target | None) -> tuple[Any, ...]:
    # The outbound server side always reads from the local app (ref 7.2).
    o = conn.orig_dst
    return ("outbound", "src", None, str(o), o.host, str(o.port), "no_identity", None, None, "loopback", None, None, None, None, None)


def client_labels(conn: Accepted, target: Target | None) -> tuple[Any, ...]:
    t = target.addr if target is not None else conn.orig_dst
    authority = target.authority if target is not None else None
    return ("outbound", "dst", authority, str(t), t.host, str(t.port), *tls_labels(target), None, None, None, None, None)


def http_labels(target: Target) -> tuple[Any, ...]:
    t = target.addr
    return ("outbound", target.authority, str(t), t.host, str(t.port), *tls_labels(target),
            None, None, None, None, None, None, None, None, None, None)


def endpoint_labels(ep: Any, authority: str | None, meshed: bool) -> tuple[tuple[Any, ...], tuple[Any, ...], str]:
    """(HTTP labels, TCP dst labels, identity) of one balanced endpoint."""
    identity = ep.endpoint.identity if meshed else ""
    t = Target(ep.addr, identity, ep.endpoint.protocol, authority)
    a = t.addr
    dst = ("outbound", "dst", authority, str(a), a.host, str(a.port), *tls_labels(t), None, None, None, None, None)
    return http_labels(t), dst, identity


def build(config: Config, metrics: Any, tracker: RelayTracker, http: HttpStage,
          discovery: StaticDiscovery | None = None, local: LocalIdentity | None = None) -> Acceptor:
    informational = not config.ingress_mode  # ref 1.5: OUTBOUND_DISABLE_INFORMATIONAL_HEADERS defaults to ingress mode
    dns_refresh = max(config.dns_min_ttl or 0.0, min(config.dns_max_ttl or 5.0, 5.0))
    backends = Backends(config.zone, config.outbound_http_queue_capacity, config.outbound_http_failfast_timeout, dns_refresh)

    def by_name(authority: str) -> Any:
        """Ingress mode (ref 3.10): the backend of a service named name:port, or None."""
        if discovery is None:
            return backends.dns(authority)
        if hasattr(discovery, "backend_for_name"):
            return discovery.backend_for_name(authority)
        found = discovery.resolve_name(authority)
        if found is None or found.service is None:
            return backends.dns(authority)  # not in the file: resolved by DNS (SPEC 6)
        return backends.get(found.service.name, found.endpoints, discovery.version, found.service, discovery)
    results, durations = metrics.outbound_tcp_detect_http_results_total, metrics.outbound_tcp_detect_http_duration_seconds

    def detected(conn: Conn, kind: str, prefix: bytes, client_eof: bool, elapsed: float) -> None:
        result = kind if kind in (core_detect.HTTP1, core_detect.HTTP2, detect.READ_TIMEOUT) else ("error" if kind == detect.CLOSED else "not_http")
        results.labels(result).value += 1
        durations.labels(result).observe(elapsed)
        target = conn.target
        route_ = HttpRoute("outbound", target.addr, http_labels(target), config.outbound_connect_timeout,
                           config.http_response_timeout, informational, identity=target.identity, protocol=target.protocol,
                           dst_labels=client_labels(conn.accepted, target), backend=target.backend,
                           endpoint_labels=endpoint_labels, ingress=by_name if config.ingress_mode else None)
        if kind == core_detect.HTTP1 and not client_eof:
            http.serve_http1(conn.transport, route_, prefix, conn.src)
        elif kind == core_detect.HTTP2 and not client_eof and http.h2_available:
            http.serve_http2(conn.transport, route_, prefix, conn.src)  # a balanced service: per stream (ref 4)
        elif kind == detect.CLOSED:
            conn.transport.close()
            conn.close_series()
        else:
            forward_opaque(conn, prefix, client_eof)  # not HTTP, or no bytes in time: bytes pass unchanged

    def dispatch(conn: Conn) -> None:
        conn.open_series()
        if config.ingress_mode:
            # Ingress mode always detects HTTP: requests are routed by name, not by orig dst (ref 3.10).
            detect.start(conn, core_detect.detect_http, detected, config.outbound_detect_timeout, core_detect.HTTP_DETECT_LIMIT, http.live)
            return
        if conn.target.protocol == "opaque" or conn.target.addr.port in config.outbound_opaque_ports:
            forward_opaque(conn, b"")
            return
        detect.start(conn, core_detect.detect_http, detected, config.outbound_detect_timeout, core_detect.HTTP_DETECT_LIMIT, http.live)

    acceptor = Acceptor("outbound", route(config, discovery, local, backends), config.outbound_connect_timeout, metrics, tracker,
                        server_labels, client_labels, metrics.outbound_tcp_errors_total, dispatch, local)
    acceptor.backends = backends  # the worker sweeps idle ones
    return acceptor
