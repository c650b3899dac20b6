"""Ingress mode (route by l5d-dst-override, else Host) and zone-aware balancing (MESHPROXY_ZONE)."""

from __future__ import annotations

import socket
import time

from tests.integration.test_discovery_balance import endpoint, get_many, vip_port
from tests.support import ThreadedServer, make_proxy, recv_all


def recording_endpoint(name: str, seen: list):
    def handler(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        seen.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(name), name.encode()))
    return ThreadedServer(handler)


def raw_get(port: int, host: str, extra: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET /x HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + extra + b"Connection: close\r\n\r\n")
        return recv_all(c)


def test_ingress_mode_routes_by_override_then_host(tmp_path):
    seen_web: list[bytes] = []
    seen_api: list[bytes] = []
    web, api = recording_endpoint("web", seen_web), recording_endpoint("api", seen_api)
    disc = tmp_path / "d.toml"
    disc.write_text(
        f'[[services]]\nauthority = "web.default.svc.cluster.local"\nport = 80\n[[services.endpoints]]\naddr = "127.0.0.1:{web.port}"\n'
        f'[[services]]\nauthority = "api.default.svc.cluster.local"\nport = 8080\n[[services.endpoints]]\naddr = "127.0.0.1:{api.port}"\n')
    elsewhere = vip_port()  # the connection's own destination: nobody listens there
    proxy = make_proxy(LINKERD2_PROXY_INGRESS_MODE="true", MESHPROXY_DISCOVERY_FILE=str(disc),
                       MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{elsewhere}").start()
    try:
        reply = raw_get(proxy.outbound, "web.default.svc.cluster.local")  # Host, default port 80
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"web")
        reply = raw_get(proxy.outbound, "web.default.svc.cluster.local", b"l5d-dst-override: api.default.svc.cluster.local:8080\r\n")
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"api")
        assert len(seen_api) == 1 and b"l5d-dst-override" not in seen_api[0].lower()  # stripped: no open relay
        assert len(seen_web) == 1
    finally:
        proxy.stop()
        web.close()
        api.close()


def test_traffic_stays_in_zone_while_an_in_zone_endpoint_is_ready(tmp_path):
    delay = [0.0]
    local, far1, far2 = endpoint("local", delay), endpoint("far1", delay), endpoint("far2", delay)
    vip = vip_port()
    disc = tmp_path / "d.toml"

    def write(endpoints):
        body = "".join(f'[[services.endpoints]]\naddr = "127.0.0.1:{p}"\nzone = "{z}"\n' for p, z in endpoints)
        disc.write_text(f'[[services]]\nauthority = "web.default.svc.cluster.local"\nport = 80\nvip = "127.0.0.1:{vip}"\n{body}')

    write([(local.port, "zone-a"), (far1.port, "zone-b"), (far2.port, "zone-b")])
    proxy = make_proxy(MESHPROXY_ZONE="zone-a", MESHPROXY_DISCOVERY_FILE=str(disc), MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{vip}").start()
    url = f"http://127.0.0.1:{proxy.outbound}/"
    try:
        results = get_many(url, 200, 4)
        assert all(status == 200 for status, _ in results)
        assert local.served["n"] == 200 and far1.served["n"] == far2.served["n"] == 0
        write([(far1.port, "zone-b"), (far2.port, "zone-b")])  # no in-zone endpoint left: spill over
        time.sleep(0.6)
        results = get_many(url, 100, 4)
        assert all(status == 200 for status, _ in results)
        assert far1.served["n"] + far2.served["n"] == 100
    finally:
        proxy.stop()
        for e in (local, far1, far2):
            e.close()


def test_ingress_names_not_in_the_file_resolve_by_dns_and_idle_state_is_evicted(tmp_path):
    seen: list[bytes] = []
    app = ThreadedServerDual(seen)
    disc = tmp_path / "d.toml"
    disc.write_text("")  # knows no service: names go to DNS
    proxy = make_proxy(LINKERD2_PROXY_INGRESS_MODE="true", MESHPROXY_DISCOVERY_FILE=str(disc),
                       MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{vip_port()}",
                       LINKERD2_PROXY_OUTBOUND_DISCOVERY_IDLE_TIMEOUT="1s").start()
    try:
        reply = raw_get(proxy.outbound, f"localhost:{app.port}")  # resolved by DNS (getaddrinfo)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"dns"), reply
        from tests.support import metric_value, wait_until
        assert metric_value(proxy.metrics(), "meshproxy_outbound_backends") == 1
        # Unused for the discovery idle timeout: the destination's state is dropped (ref 3.1).
        wait_until(lambda: metric_value(proxy.metrics(), "meshproxy_outbound_backends") == 0, 10, interval=0.3,
                   what="the idle destination to be evicted")
        reply = raw_get(proxy.outbound, f"localhost:{app.port}")  # and comes back on the next request
        assert reply.endswith(b"dns")
    finally:
        proxy.stop()
        app.close()


def ThreadedServerDual(seen: list):  # noqa: N802 - a factory named like the class it builds
    """An HTTP server on [::] (dual stack), so "localhost" answers on 127.0.0.1 and ::1."""
    def handler(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        seen.append(data)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\ndns")
    return ThreadedServer(handler, host="::")
