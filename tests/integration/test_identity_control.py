"""Identity from a control plane: a fake Linkerd identity service and a fake SPIRE agent,
both speaking the real protobuf APIs over real gRPC, in front of real proxies."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.tls import ca
from tests.fakes.identity_service import FakeIdentityService
from tests.fakes.spire_agent import FakeSpireAgent, svid_for
from tests.support import ThreadedServer, http_get, make_proxy, wait_until

SERVER_ID = "web.default.serviceaccount.identity.linkerd.cluster.local"
IDENTITY_SVC = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"


def pem(cert) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def linkerd_identity_env(tmp_path, name: str, root, port: int) -> dict[str, str]:
    """What Linkerd's injector and proxy-identity wrapper prepare: key.p8, csr.der, a token."""
    d = tmp_path / name.split(".")[0]
    d.mkdir()
    key = ca.generate_key()
    (d / "key.p8").write_bytes(ca.key_pkcs8_der(key))
    (d / "csr.der").write_bytes(ca.make_csr(key, name).public_bytes(serialization.Encoding.DER))
    (d / "token").write_text("a-service-account-token")
    return {
        "MESHPROXY_IDENTITY_DISABLED": "false",
        "LINKERD2_PROXY_IDENTITY_DIR": str(d),
        "LINKERD2_PROXY_IDENTITY_TOKEN_FILE": str(d / "token"),
        "LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS": pem(root),
        "LINKERD2_PROXY_IDENTITY_LOCAL_NAME": name,
        "LINKERD2_PROXY_IDENTITY_SVC_ADDR": f"127.0.0.1:{port}",  # loopback: plaintext (ref 1.1)
        "LINKERD2_PROXY_IDENTITY_SVC_NAME": IDENTITY_SVC,
        "LINKERD2_PROXY_IDENTITY_MIN_REFRESH": "1s",
    }


def served_leaf(port: int, sni: str) -> x509.Certificate:
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", sni],
                         input=b"", capture_output=True, timeout=20)
    found = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out.stdout, re.S)
    assert found, out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
    return x509.load_pem_x509_certificate(found.group(0))


def echo_app():
    def handler(conn):
        while data := conn.recv(65536):
            conn.sendall(data)
    return ThreadedServer(handler)


@pytest.fixture(scope="module")
def authority():
    return ca.make_ca("cluster.local")


def test_not_ready_and_no_traffic_until_the_identity_service_answers(tmp_path, authority):
    root, _, issuer, issuer_key = authority
    fake = FakeIdentityService(issuer, issuer_key, [root], lifetime_s=3600, delay_s=3.0)
    port = fake.start()
    app = echo_app()
    proxy = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}",
                       LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION="",
                       **linkerd_identity_env(tmp_path, SERVER_ID, root, port))
    proxy.env["LINKERD2_PROXY_INBOUND_PORTS_DISABLE_PROTOCOL_DETECTION"] = ""
    started = time.monotonic()
    proxy.start(wait_ready=False)
    try:
        wait_until(lambda: http_get(proxy.admin_url + "/ready", timeout=1)[0] == 503, 10, what="/ready 503")
        # The listener is bound (the connect succeeds: it waits in the backlog) but nothing is served yet.
        early = socket.create_connection(("127.0.0.1", proxy.inbound), timeout=10)
        early.sendall(b"early bytes\n")
        answered = {}
        threading.Thread(target=lambda: answered.setdefault("at", (early.recv(100), time.monotonic())), daemon=True).start()
        time.sleep(1.0)
        assert "at" not in answered, "traffic flowed before the proxy had an identity"
        assert http_get(proxy.admin_url + "/ready")[0] == 503
        wait_until(lambda: http_get(proxy.admin_url + "/ready", timeout=1)[0] == 200, 15, what="/ready 200")
        ready_after = time.monotonic() - started
        assert ready_after >= 2.5, f"ready after {ready_after:.1f} s, before the identity service answered"
        wait_until(lambda: "at" in answered, 10, what="the early connection to be served")
        assert answered["at"][0] == b"early bytes\n"
        assert fake.calls and fake.calls[0].identity == SERVER_ID and fake.calls[0].token == b"a-service-account-token"
        early.close()
    finally:
        proxy.stop()
        app.close()
        fake.stop()


@pytest.mark.timeout(120)
def test_short_leaves_are_renewed_and_new_connections_see_the_new_leaf(tmp_path, authority):
    root, _, issuer, issuer_key = authority
    fake = FakeIdentityService(issuer, issuer_key, [root], lifetime_s=20)
    port = fake.start()
    app = echo_app()
    proxy = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}",
                       **linkerd_identity_env(tmp_path, SERVER_ID, root, port)).start()
    try:
        first = served_leaf(proxy.inbound, SERVER_ID)
        # A connection opened before the renewal (plaintext inbound, relayed to the echo app).
        held = socket.create_connection(("127.0.0.1", proxy.inbound), timeout=10)
        held.sendall(b"not http, just bytes\n")
        assert held.recv(100) == b"not http, just bytes\n"
        # Refresh at 70 % of the remaining 20 s: the second Certify comes after ~14 s.
        wait_until(lambda: len(fake.calls) >= 2, 30, interval=0.5, what="a renewal")
        renewed_at = fake.calls[1].at - fake.calls[0].at
        assert 10 <= renewed_at <= 20, f"renewed after {renewed_at:.1f} s"
        second = wait_until(lambda: (leaf := served_leaf(proxy.inbound, SERVER_ID)).serial_number != first.serial_number and leaf, 10,
                            interval=0.5, what="new connections to present the new leaf")
        assert second.not_valid_after_utc > first.not_valid_after_utc
        held.sendall(b"still here\n")  # the connection opened before the renewal still works
        assert held.recv(100) == b"still here\n"
        held.close()
        text = proxy.metrics()
        assert re.search(r'identity_cert_refreshes_total\{result="ok"\} [2-9]', text), text[:2000]
        assert "identity_cert_expiration_timestamp_seconds" in text
    finally:
        proxy.stop()
        app.close()
        fake.stop()


def test_spire_agent_gives_a_spiffe_identity_and_mtls_is_served_with_it(tmp_path, authority):
    root, _, issuer, issuer_key = authority
    spiffe_id = "spiffe://root.linkerd.cluster.local/external-workload"
    server_name = "external-workload.cluster.local"
    sock = str(tmp_path / "agent.sock")
    agent = FakeSpireAgent(sock)
    agent.push([svid_for(issuer, issuer_key, spiffe_id, roots=[root])])
    agent.start()
    app = echo_app()
    client_leaf, client_key = ca.issue_leaf(issuer, issuer_key, "client.default.serviceaccount.identity.linkerd.cluster.local", 3600)
    (tmp_path / "c.pem").write_text(pem(client_leaf) + pem(issuer))
    (tmp_path / "c.key").write_bytes(ca.key_pem(client_key) if isinstance(ca.key_pem(client_key), bytes) else ca.key_pem(client_key).encode())
    (tmp_path / "roots.pem").write_text(pem(root))
    proxy = make_proxy(MESHPROXY_INBOUND_FALLBACK_ADDR=f"127.0.0.1:{app.port}", MESHPROXY_IDENTITY_DISABLED="false",
                       LINKERD2_PROXY_IDENTITY_SPIRE_WORKLOAD_API_ADDRESS=f"unix://{sock}",
                       LINKERD2_PROXY_IDENTITY_SERVER_ID=spiffe_id, LINKERD2_PROXY_IDENTITY_SERVER_NAME=server_name,
                       LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS=pem(root)).start()
    try:
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.inbound}", "-servername", server_name,
             "-cert", str(tmp_path / "c.pem"), "-key", str(tmp_path / "c.key"), "-CAfile", str(tmp_path / "roots.pem")],
            input=b"ping through mTLS\n", capture_output=True, timeout=20,
        )
        text = out.stdout.decode(errors="replace")
        assert "Verify return code: 0 (ok)" in text and "TLSv1.3" in text, text + out.stderr.decode(errors="replace")
        leaf = served_leaf(proxy.inbound, server_name)
        uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == [spiffe_id]
        # A client with its own certificate: the echo app answers through the terminated mTLS connection.
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(tmp_path / "roots.pem"))
        ctx.load_cert_chain(str(tmp_path / "c.pem"), str(tmp_path / "c.key"))
        with socket.create_connection(("127.0.0.1", proxy.inbound), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                assert tls.version() == "TLSv1.3"
                tls.sendall(b"ping through mTLS\n")
                assert tls.recv(100) == b"ping through mTLS\n"
        metrics = proxy.metrics()
        assert 'client_id="client.default.serviceaccount.identity.linkerd.cluster.local"' in metrics
    finally:
        proxy.stop()
        app.close()
        agent.stop()
