"""Identity: two proxies with a CA made in the test speak mTLS (TLS 1.3, P-256) to each other."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time

import pytest

from proxy.tls import ca
from tests.support import ThreadedServer, http_get, make_proxy, metric_value, recv_all, wait_until  # noqa: F401

TRUST_DOMAIN = "cluster.local"
SERVER_ID = "web.default.serviceaccount.identity.linkerd.cluster.local"
CLIENT_ID = "client.default.serviceaccount.identity.linkerd.cluster.local"
MARKER = b"PLAINTEXT-MARKER-3f9a1c"


def write_identity(dirpath, issuer, name: str, lifetime: float = 3600) -> dict[str, str]:
    root_cert, _root_key, issuer_cert, issuer_key = issuer
    leaf, key = ca.issue_leaf(issuer_cert, issuer_key, name, lifetime)
    os.makedirs(dirpath, exist_ok=True)
    from cryptography.hazmat.primitives import serialization

    cert_pem = leaf.public_bytes(serialization.Encoding.PEM) + issuer_cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    roots_pem = root_cert.public_bytes(serialization.Encoding.PEM)
    for fname, data in (("cert.pem", cert_pem), ("key.pem", key_pem), ("roots.pem", roots_pem)):
        with open(os.path.join(dirpath, fname), "wb") as f:
            f.write(data)
    return {
        "MESHPROXY_IDENTITY_DISABLED": "false",
        "MESHPROXY_IDENTITY_CERT_FILE": os.path.join(dirpath, "cert.pem"),
        "MESHPROXY_IDENTITY_KEY_FILE": os.path.join(dirpath, "key.pem"),
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": roots_pem.decode(),
        "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": name,
    }


class Recorder:
    """A TCP relay between the two proxies that keeps every byte it carries: our capture of the hop."""

    def __init__(self, target_port: int) -> None:
        self.captured = bytearray()
        self.lock = threading.Lock()

        def handler(conn):
            up = socket.create_connection(("127.0.0.1", target_port))

            def pump(src, dst):
                try:
                    while data := src.recv(65536):
                        with self.lock:
                            self.captured += data
                        dst.sendall(data)
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            t = threading.Thread(target=pump, args=(up, conn), daemon=True)
            t.start()
            pump(conn, up)
            t.join(10)
            up.close()

        self.server = ThreadedServer(handler)
        self.port = self.server.port


def app_handler(seen: list):
    def handler(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        seen.append(data)
        body = b"hello " + MARKER
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    return handler


@pytest.fixture(scope="module")
def issuer():
    return ca.make_ca(TRUST_DOMAIN)


def mesh(tmp_path, issuer, server_issuer=None, expected_server_id=SERVER_ID, server_name=SERVER_ID):
    seen: list[bytes] = []
    app = ThreadedServer(app_handler(seen))
    server = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}",
                        **write_identity(tmp_path / "server", server_issuer or issuer, server_name)).start()
    recorder = Recorder(server.inbound)
    discovery = tmp_path / "discovery.toml"
    discovery.write_text(f'[[services]]\nauthority = "web.default.svc.cluster.local"\nport = 80\n'
                         f'[[services.endpoints]]\naddr = "127.0.0.1:{recorder.port}"\nidentity = "{expected_server_id}"\n')
    client = make_proxy(MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{recorder.port}", MESHPROXY_DISCOVERY_FILE=str(discovery),
                        **write_identity(tmp_path / "client", issuer, CLIENT_ID)).start()
    return app, server, recorder, client, seen


def stop_all(*things):
    for t in things:
        if hasattr(t, "stop"):
            t.stop()
        elif hasattr(t, "server"):
            t.server.close()
        elif hasattr(t, "close"):
            t.close()


def test_http_between_meshed_proxies_is_mtls_with_identities(tmp_path, issuer):
    app, server, recorder, client, seen = mesh(tmp_path, issuer)
    try:
        status, headers, body = http_get(f"http://127.0.0.1:{client.outbound}/hello", headers={"l5d-client-id": "spoofed"})
        assert status == 200 and body == b"hello " + MARKER
        # The app sees the authenticated client identity, never the spoofed one.
        assert b"l5d-client-id: " + CLIENT_ID.encode() in seen[0]
        assert b"spoofed" not in seen[0]
        # The hop between the proxies carried TLS 1.3 records, no plaintext.
        assert recorder.captured, "nothing crossed the hop"
        assert MARKER not in recorder.captured and b"GET /hello" not in recorder.captured
        assert recorder.captured[:3] == b"\x16\x03\x01"  # a TLS handshake record opens the hop
        client_metrics = client.metrics()
        assert metric_value(client_metrics, "tcp_open_total", direction="outbound", peer="dst", tls="true", server_id=SERVER_ID) >= 1
        assert metric_value(client_metrics, "request_total", direction="outbound", tls="true", server_id=SERVER_ID) == 1
        server_metrics = server.metrics()
        assert metric_value(server_metrics, "tcp_open_total", direction="inbound", peer="src", tls="true", client_id=CLIENT_ID) >= 1
        assert metric_value(server_metrics, "request_total", direction="inbound", tls="true", client_id=CLIENT_ID) == 1
    finally:
        stop_all(client, recorder, server, app)


def test_openssl_s_client_sees_tls13_and_a_p256_chain(tmp_path, issuer):
    app = ThreadedServer(app_handler([]))
    server = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}", **write_identity(tmp_path / "s", issuer, SERVER_ID)).start()
    try:
        roots = tmp_path / "s" / "roots.pem"
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{server.inbound}", "-servername", SERVER_ID, "-showcerts", "-CAfile", str(roots)],
            input=b"", capture_output=True, timeout=20,
        )
        text = (out.stdout + out.stderr).decode(errors="replace")
        assert re.search(r"Protocol\s*:?\s*TLSv1\.3|New, TLSv1\.3", text), text
        assert "Verify return code: 0 (ok)" in text, text  # leaf + issuer chain to the test's trust anchor
        chain = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", text, re.S)
        assert len(chain) == 2, "the proxy presents its leaf and the issuer"
        for pem in chain:
            parsed = subprocess.run(["openssl", "x509", "-noout", "-text"], input=pem.encode(), capture_output=True, timeout=10).stdout.decode()
            assert "ASN1 OID: prime256v1" in parsed and "ecdsa-with-SHA256" in parsed
        # Offering TLS 1.2 only is refused.
        out12 = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{server.inbound}", "-servername", SERVER_ID, "-tls1_2", "-brief"],
                               input=b"", capture_output=True, timeout=20)
        assert "Protocol version: TLSv1.2" not in (out12.stdout + out12.stderr).decode(errors="replace")
    finally:
        stop_all(server, app)


def impostor(tmp_path, issuer):
    """A TLS server whose certificate (from the right CA) names another identity, whatever the SNI."""
    import ssl

    env = write_identity(tmp_path / "impostor", issuer, "impostor.default.serviceaccount.identity.linkerd.cluster.local")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(env["MESHPROXY_IDENTITY_CERT_FILE"], env["MESHPROXY_IDENTITY_KEY_FILE"])
    seen: list[bytes] = []

    def handler(conn):
        with ctx.wrap_socket(conn, server_side=True) as tls:
            seen.append(tls.recv(65536))
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    return ThreadedServer(handler), seen


@pytest.mark.parametrize("case", ["other-identity", "other-root"])
def test_a_peer_with_the_wrong_identity_or_root_is_refused_visibly(tmp_path, issuer, case):
    if case == "other-identity":
        fake, fake_seen = impostor(tmp_path, issuer)
        discovery = tmp_path / "discovery.toml"
        discovery.write_text(f'[[services]]\nauthority = "web.default.svc.cluster.local"\nport = 80\n'
                             f'[[services.endpoints]]\naddr = "127.0.0.1:{fake.port}"\nidentity = "{SERVER_ID}"\n')
        client = make_proxy(MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{fake.port}", MESHPROXY_DISCOVERY_FILE=str(discovery),
                            **write_identity(tmp_path / "client", issuer, CLIENT_ID)).start()
        setup = (fake, client, client, client, fake_seen)
    else:
        setup = mesh(tmp_path, issuer, server_issuer=ca.make_ca(TRUST_DOMAIN))
    app, server, recorder, client, seen = setup
    try:
        status, headers, _ = http_get(f"http://127.0.0.1:{client.outbound}/hello")
        assert status == 502
        assert headers.get("l5d-proxy-error")
        assert not any(seen), "the request must not reach the app through an unverified peer"
        text = client.metrics()
        assert metric_value(text, "outbound_http_errors_total", error="identity required" if case == "other-identity" else "i/o") >= 1
    finally:
        stop_all(client, recorder, server, app)


def test_ready_waits_for_identity(tmp_path, issuer):
    """With identity files that appear only later, /ready is 503 and nothing is accepted until they do."""
    env = write_identity(tmp_path / "late", issuer, SERVER_ID)
    cert = env["MESHPROXY_IDENTITY_CERT_FILE"]
    os.rename(cert, cert + ".later")
    proxy = make_proxy(**env).start(wait_ready=False)
    try:
        wait_until(lambda: http_get(proxy.admin_url + "/ready", timeout=1)[0] == 503, 15, what="/ready 503")
        time.sleep(1)
        assert http_get(proxy.admin_url + "/ready")[0] == 503
        os.rename(cert + ".later", cert)
        wait_until(lambda: http_get(proxy.admin_url + "/ready", timeout=1)[0] == 200, 10, what="/ready 200 after the files appear")
    finally:
        proxy.stop()


def test_run_refuses_to_start_without_an_identity_source():
    proxy = make_proxy(MESHPROXY_IDENTITY_DISABLED="false")
    result = subprocess.run([os.sys.executable, "-m", "proxy", "run"], env=proxy.env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 64 and "no identity source" in result.stderr


def test_an_opaque_stream_across_the_mtls_hop_ends_cleanly(tmp_path, issuer):
    """Client sends 8 MiB and closes: the app gets every byte and the end; no connection stays open;
    SIGTERM then exits at once (a half-close cannot cross TLS: it becomes a close)."""
    import hashlib

    payload = os.urandom(8 << 20)
    got = {}

    def sink(conn):
        got["sha"] = hashlib.sha256(recv_all(conn)).hexdigest()

    app = ThreadedServer(sink)
    server = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}", **write_identity(tmp_path / "s", issuer, SERVER_ID)).start()
    discovery = tmp_path / "discovery.toml"
    discovery.write_text(f'[[services]]\nauthority = "sink.default.svc.cluster.local"\nport = 80\n'
                         f'[[services.endpoints]]\naddr = "127.0.0.1:{server.inbound}"\nidentity = "{SERVER_ID}"\nprotocol = "opaque"\n')
    client = make_proxy(MESHPROXY_OUTBOUND_FALLBACK_ADDR=f"127.0.0.1:{server.inbound}", MESHPROXY_DISCOVERY_FILE=str(discovery),
                        **write_identity(tmp_path / "c", issuer, CLIENT_ID)).start()
    try:
        with socket.create_connection(("127.0.0.1", client.outbound), timeout=20) as c:
            c.sendall(payload)
        wait_until(lambda: "sha" in got, 20, what="the app to read to the end")
        assert got["sha"] == hashlib.sha256(payload).hexdigest()
        for proxy, direction in ((client, "outbound"), (server, "inbound")):
            wait_until(lambda p=proxy, d=direction: metric_value(p.metrics(), "tcp_open_connections", direction=d, peer="src") == 0, 10,
                       what=f"{direction} connections closed")
        started = time.monotonic()
        assert client.stop() == 0 and server.stop() == 0
        assert time.monotonic() - started < 5
    finally:
        client.stop()
        server.stop()
        app.close()
