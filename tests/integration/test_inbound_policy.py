"""Inbound default policy (LINKERD2_PROXY_INBOUND_DEFAULT_POLICY): deny and all-authenticated refuse
unauthenticated clients (403 for HTTP, a closed connection for TCP) and count it; meshed peers get in
when the policy allows them."""

from __future__ import annotations

import socket

import pytest

from proxy.tls import ca
from tests.integration.test_identity_mtls import CLIENT_ID, SERVER_ID, write_identity
from tests.support import ThreadedServer, http_get, make_proxy, metric_value


def http_app():
    def handler(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    return ThreadedServer(handler)


@pytest.fixture(scope="module")
def issuer():
    return ca.make_ca("cluster.local")


@pytest.mark.parametrize("policy", ["deny", "all-authenticated"])
def test_unauthenticated_clients_are_refused_and_counted(tmp_path, issuer, policy):
    app = http_app()
    server = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}", LINKERD2_PROXY_INBOUND_DEFAULT_POLICY=policy,
                        **write_identity(tmp_path / "s", issuer, SERVER_ID)).start()
    try:
        status, _, _ = http_get(f"http://127.0.0.1:{server.inbound}/")
        assert status == 403
        assert app.accepted == 0
        with socket.create_connection(("127.0.0.1", server.inbound), timeout=5) as c:  # not HTTP: plain TCP
            c.sendall(b"\x00\x01 raw bytes that are not http\n")
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                if c.recv(100) == b"":
                    raise ConnectionResetError("closed")
        text = server.metrics()
        assert metric_value(text, "inbound_http_authz_deny_total", tls="no_identity") == 1
        assert metric_value(text, "inbound_tcp_authz_deny_total", tls="no_identity") == 1
        assert app.accepted == 0
    finally:
        server.stop()
        app.close()


@pytest.mark.parametrize("policy, meshed_allowed", [("all-authenticated", True), ("deny", False)])
def test_meshed_peers_get_in_when_the_policy_allows_them(tmp_path, issuer, policy, meshed_allowed):
    app = http_app()
    server = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}", LINKERD2_PROXY_INBOUND_DEFAULT_POLICY=policy,
                        **write_identity(tmp_path / "s", issuer, SERVER_ID)).start()
    discovery = tmp_path / "discovery.toml"
    discovery.write_text(f'[[services]]\nauthority = "web.default.svc.cluster.local"\nport = 80\n'
                         f'[[services.endpoints]]\naddr = "127.0.0.1:{server.inbound}"\nidentity = "{SERVER_ID}"\n')
    client = make_proxy(MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{server.inbound}", MESHPROXY_DISCOVERY_FILE=str(discovery),
                        **write_identity(tmp_path / "c", issuer, CLIENT_ID)).start()
    try:
        status, headers, body = http_get(f"http://127.0.0.1:{client.outbound}/")
        text = server.metrics()
        if meshed_allowed:
            assert (status, body) == (200, b"ok")
            assert metric_value(text, "inbound_http_authz_allow_total", tls="true", client_id=CLIENT_ID) == 1
        else:
            assert status == 403
            assert metric_value(text, "inbound_http_authz_deny_total", tls="true", client_id=CLIENT_ID) == 1
            assert app.accepted == 0
    finally:
        client.stop()
        server.stop()
        app.close()


@pytest.mark.parametrize("fmt", ["json", "apache"])
def test_access_log_lines_for_inbound_requests(tmp_path, fmt):
    import json as json_

    app = http_app()
    server = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}", LINKERD2_PROXY_ACCESS_LOG=fmt).start()
    try:
        status, _, _ = http_get(f"http://127.0.0.1:{server.inbound}/logged?x=1", headers={"User-Agent": "probe/1.0"})
        assert status == 200
        from tests.support import wait_until

        line = wait_until(lambda: next((x for x in server.read_output().splitlines() if "/logged?x=1" in x), None), 5,
                          what="an access log line")
        if fmt == "json":
            entry = json_.loads(line)
            assert entry["method"] == "GET" and entry["uri"] == "/logged?x=1" and entry["status"] == 200
            assert entry["user_agent"] == "probe/1.0" and entry["client.addr"].startswith("127.0.0.1:")
        else:
            assert line.startswith("127.0.0.1 - - [") and '"GET /logged?x=1 HTTP/1.1" 200' in line
    finally:
        server.stop()
        app.close()
