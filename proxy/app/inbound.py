"""The inbound stack: connections from peers, redirected to 4143, to the local app.

Built from the connection upward, one line per layer:
  listener (SO_REUSEPORT)       transport.listen, one per worker
  -> original destination        transport.orig_dst (SO_ORIGINAL_DST)
  -> route                       podIP:port of the app; never our own inbound port (a loop)
  -> opaque ports                skip detection entirely (LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION)
  -> TLS ClientHello peek        tls.server: SNI == our name -> terminate mTLS; other TLS -> opaque passthrough
  -> HTTP detection              transport.detect: one read, 10 s; timeout or not HTTP -> opaque
  -> HTTP/1 | HTTP/2 | opaque    http.h1 / http.h2 (l5d-client-id set or stripped) | transport.relay
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from proxy.config import Addr, Config
from proxy.core import detect as core_detect
from proxy.core import transport_header
from proxy.core.policy import allows as policy_allows
from proxy.http.server import HttpStage
from proxy.http.stack import HttpRoute
from proxy.log import get_logger
from proxy.tls import server as tls_server
from proxy.tls.local import LocalIdentity
from proxy.transport import detect
from proxy.transport.forward import Accepted, Acceptor, Conn, Target, forward_opaque
from proxy.transport.relay import RelayTracker, reset

log = get_logger("proxy.app.inbound")

# The default server of Linkerd's inbound policy when no policy controller answers.
DEFAULT_SERVER = ("", "default")


def route(config: Config) -> Any:
    fallback: Addr | None = config.inbound_fallback
    inbound_port = config.inbound_listen.port
    allowed_ips = config.inbound_ips

    def choose(conn: Accepted) -> Target | str:
        if not conn.redirected:
            if fallback is not None:
                return Target(fallback)
            if conn.orig_dst.port == inbound_port:
                return Target(conn.orig_dst)  # a direct connection: it must carry a transport header (ref 3.7)
            return "not redirected and no MESHPROXY_INBOUND_FALLBACK_ADDR"
        if conn.orig_dst.port == inbound_port:
            return "loop to own inbound port"
        if allowed_ips and conn.orig_dst.host not in allowed_ips:
            return "original destination is not one of LINKERD2_PROXY_INBOUND_IPS"
        return Target(conn.orig_dst)

    return choose


def tls_labels(conn: Conn, reason: str) -> tuple[Any, ...]:
    """(tls, server_id, client_id, no_tls_reason, sni) of an inbound connection (ref 5.5, 7.2)."""
    if conn.tls:
        return ("true", None, conn.client_id, None, None)
    return ("no_identity", None, None, reason, None)


def client_labels(conn: Accepted, target: Target | None) -> tuple[Any, ...]:
    t = target.addr if target is not None else conn.orig_dst
    # The app is local: the inbound client side is plaintext over "loopback" (ref 7.2).
    return ("inbound", "dst", None, str(t), t.host, str(t.port), "no_identity", None, None, "loopback", None, None, None, None, None)


def build(config: Config, metrics: Any, tracker: RelayTracker, http: HttpStage, local: LocalIdentity | None = None) -> Acceptor:
    policy = config.inbound_default_policy
    opaque_ports = config.inbound_opaque_ports
    results, durations = metrics.inbound_tcp_detect_http_results_total, metrics.inbound_tcp_detect_http_duration_seconds

    def server_labels(conn: Conn, reason: str) -> tuple[Any, ...]:
        o = conn.accepted.orig_dst
        return ("inbound", "src", None, str(o), o.host, str(o.port), *tls_labels(conn, reason),
                DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(o.port))

    def authorized(conn: Conn) -> bool:
        return policy_allows(policy, conn.accepted.client.host, conn.client_id if conn.tls else "", config.policy_cluster_networks)

    def tcp_authz(conn: Conn) -> bool:
        """Count the connection against the default policy (ref 7.3); False: close it."""
        o = conn.accepted.orig_dst
        server = (str(o), o.host, str(o.port), DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(o.port))
        tls, client_id = ("true" if conn.tls else "no_identity"), (conn.client_id if conn.tls else "")
        if authorized(conn):
            metrics.inbound_tcp_authz_allow_total.labels(*server, "", "default", policy, tls, client_id).value += 1
            return True
        metrics.inbound_tcp_authz_deny_total.labels(*server, tls, client_id).value += 1
        log.info("connection denied by the default inbound policy", policy=policy, client=str(conn.accepted.client), client_id=client_id)
        reset(conn.transport)
        if conn.src is not None:
            conn.close_series()
        return False

    def detected(conn: Conn, kind: str, prefix: bytes, client_eof: bool, elapsed: float) -> None:
        result = kind if kind in (core_detect.HTTP1, core_detect.HTTP2, detect.READ_TIMEOUT) else ("error" if kind == detect.CLOSED else "not_http")
        results.labels(result).value += 1
        durations.labels(result).observe(elapsed)
        o = conn.accepted.orig_dst
        tls, server_id, client_id, reason, _sni = tls_labels(conn, "no_tls_from_remote")
        labels = ("inbound", None, str(o), o.host, str(o.port), tls, server_id, client_id, reason,
                  DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(o.port), "", "default", "default", "", "default", policy)
        server = (str(o), o.host, str(o.port), DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(o.port))
        tls_label = "true" if conn.tls else "no_identity"
        authz_labels = ((*server, "", "default", "default", "", "default", policy, tls_label, client_id or ""),
                        (*server, "", "default", "default", tls_label, client_id or ""))
        route_ = HttpRoute("inbound", conn.target.addr, labels, config.inbound_connect_timeout, config.http_response_timeout,
                           conn.tls, server, client_id=conn.client_id if conn.tls else "",
                           dst_labels=client_labels(conn.accepted, conn.target), authorized=authorized(conn), authz_labels=authz_labels)
        if kind == core_detect.HTTP1 and not client_eof:
            http.serve_http1(conn.transport, route_, prefix, conn.src)
        elif kind == core_detect.HTTP2 and not client_eof and http.h2_available:
            http.serve_http2(conn.transport, route_, prefix, conn.src)
        elif kind == detect.CLOSED:
            conn.transport.close()
            conn.close_series()
        elif tcp_authz(conn):
            forward_opaque(conn, prefix, client_eof)

    async def serve(conn: Conn) -> None:
        sock = conn.sock
        conn.sock = None
        timeout = config.inbound_detect_timeout
        if conn.accepted.orig_dst.port in opaque_ports:
            kind, sni = "opaque-port", ""  # no detection at all (server-speaks-first protocols)
        else:
            kind, sni = await tls_server.peek_client_hello(sock, timeout)
        ours = kind == "tls" and local is not None and local.creds is not None and sni == local.server_name
        try:
            transport, hold = await tls_server.adopt(sock, local.server_ctx if ours else None, timeout)  # type: ignore[union-attr]
        except (TimeoutError, ssl.SSLError, OSError, ConnectionError) as exc:
            log.info("TLS handshake failed" if ours else "connection failed", client=str(conn.accepted.client), error=str(exc))
            metrics.inbound_tcp_errors_total.labels("tls handshake" if ours else "i/o", *_target(conn)).value += 1
            sock.close()
            return
        conn.transport = transport
        if ours:
            from proxy.tls.credentials import peer_identity

            ssl_object = transport.get_extra_info("ssl_object")
            conn.tls = True
            conn.client_id = peer_identity(ssl_object) or ""
            conn.open_series(server_labels(conn, ""))
            if ssl_object.selected_alpn_protocol() == transport_header.ALPN:
                # A direct connection to the inbound port (ref 3.7): the header says where it goes.
                proto = detect.DetectProtocol(conn, header_ready, direct, timeout, transport_header.MAX_HEADER, http.live)
                tls_server.hand_over(transport, hold, proto)
                return
            if direct_only(conn):
                log.info("direct connection without transport header negotiation refused", client=str(conn.accepted.client))
                metrics.inbound_tcp_errors_total.labels("direct connections require transport header negotiation", *_target(conn)).value += 1
                reset(transport)
                conn.close_series()
                return
        elif direct_only(conn):
            log.info("direct connection without mTLS and a transport header refused", client=str(conn.accepted.client))
            metrics.inbound_tcp_errors_total.labels("direct connections require transport header negotiation", *_target(conn)).value += 1
            reset(transport)
            return
        elif kind == "opaque-port":
            conn.open_series(server_labels(conn, "port_skipped"))
        elif kind == "tls":
            # TLS for someone else (the app terminates it): pass it through untouched (ref 2.1).
            conn.open_series(("inbound", "src", None, *_target(conn), "opaque", None, None, None, sni,
                              DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(conn.accepted.orig_dst.port)))
        else:
            conn.open_series(server_labels(conn, "no_tls_from_remote"))
        if kind in ("tls", "opaque-port") and not ours:
            if tcp_authz(conn):
                forward_opaque(conn, b"".join(hold.chunks), hold.eof)
            return
        proto = detect.DetectProtocol(conn, core_detect.detect_http, detected, timeout, core_detect.HTTP_DETECT_LIMIT, http.live)
        tls_server.hand_over(transport, hold, proto)

    def direct_only(conn: Conn) -> bool:
        """A connection to the inbound port itself, with no fallback configured."""
        return config.inbound_fallback is None and not conn.accepted.redirected

    def header_ready(buf: bytes) -> str:
        try:
            return core_detect.NEED_MORE if transport_header.decode(buf) == transport_header.NEED_MORE else "header"
        except ValueError:
            return "invalid"

    def direct(conn: Conn, kind: str, buf: bytes, client_eof: bool, elapsed: float) -> None:
        """The transport header is read: serve the local target it names."""
        try:
            found = transport_header.decode(buf) if kind == "header" else None
        except ValueError:
            found = None
        if not isinstance(found, tuple):
            log.info("direct connection without a valid transport header refused", client=str(conn.accepted.client), kind=kind)
            metrics.inbound_tcp_errors_total.labels("invalid transport header", *_target(conn)).value += 1
            reset(conn.transport)
            conn.close_series()
            return
        header, rest = found
        if header.name or header.port == config.inbound_listen.port:
            # Gateway targets (a name) are not served; the inbound port itself would be a loop (ref 3.8).
            reason = "gateway targets are not supported" if header.name else "loop to own inbound port"
            metrics.inbound_tcp_errors_total.labels(reason, *_target(conn)).value += 1
            reset(conn.transport)
            conn.close_series()
            return
        conn.target = Target(Addr(conn.accepted.orig_dst.host, header.port))
        if header.protocol == transport_header.HTTP1:
            detected(conn, core_detect.HTTP1, rest, client_eof, elapsed)
        elif header.protocol == transport_header.HTTP2:
            detected(conn, core_detect.HTTP2, rest, client_eof, elapsed)
        elif tcp_authz(conn):
            forward_opaque(conn, rest, client_eof)

    def dispatch(conn: Conn) -> None:
        asyncio.get_running_loop().create_task(serve(conn))

    def _target(conn: Conn) -> tuple[str, str, str]:
        o = conn.accepted.orig_dst
        return (str(o), o.host, str(o.port))

    return Acceptor("inbound", route(config), config.inbound_connect_timeout, metrics, tracker,
                    lambda a, t: ("inbound", "src", None, str(a.orig_dst), a.orig_dst.host, str(a.orig_dst.port), "no_identity", None, None,
                                  "no_tls_from_remote", None, DEFAULT_SERVER[0], DEFAULT_SERVER[1], policy, str(a.orig_dst.port)),
                    client_labels, metrics.inbound_tcp_errors_total, dispatch, local)
