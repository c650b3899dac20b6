"""Direct connections to the inbound port with the transport.l5d.io/v1 header (ref 3.7), as a Linkerd
client in transport-header mode makes them: mTLS, ALPN transport.l5d.io/v1, then the header."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys

import pytest

from proxy.core import transport_header as th
from proxy.tls import ca
from tests.integration.test_identity_mtls import CLIENT_ID, SERVER_ID, write_identity
from tests.support import ThreadedServer, echo_handler, make_proxy, metric_value, recv_all


@pytest.fixture(scope="module")
def issuer():
    return ca.make_ca("cluster.local")


def client_context(tmp_path, issuer, alpn: bool = True) -> ssl.SSLContext:
    env = write_identity(tmp_path / "client", issuer, CLIENT_ID)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=env["LINKERD2_PROXY_IDENTITY_TRUST_ANCHORS"])
    ctx.load_cert_chain(env["MESHPROXY_IDENTITY_CERT_FILE"], env["MESHPROXY_IDENTITY_KEY_FILE"])
    if alpn:
        ctx.set_alpn_protocols([th.ALPN])
    return ctx


def direct(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=SERVER_ID)


@pytest.fixture
def server(tmp_path, issuer):
    # No fallback address: a connection to the inbound port itself is a direct one.
    proxy = make_proxy(**write_identity(tmp_path / "server", issuer, SERVER_ID)).start()
    yield proxy
    proxy.stop()


def test_opaque_and_http1_through_the_header(tmp_path, issuer, server):
    echo = ThreadedServer(echo_handler)

    def http_app(conn):
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndirect")

    web = ThreadedServer(http_app)
    ctx = client_context(tmp_path, issuer)
    try:
        with direct(server.inbound, ctx) as tls:
            assert tls.selected_alpn_protocol() == th.ALPN
            tls.sendall(th.encode(th.Header(echo.port)) + b"opaque bytes through the header")
            assert tls.recv(100) == b"opaque bytes through the header"
        with direct(server.inbound, ctx) as tls:
            tls.sendall(th.encode(th.Header(web.port, protocol=th.HTTP1)) + b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            reply = recv_all(tls)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"direct")
        text = server.metrics()
        assert metric_value(text, "tcp_open_total", direction="inbound", peer="src", tls="true", client_id=CLIENT_ID) >= 2
        assert metric_value(text, "request_total", direction="inbound", tls="true", client_id=CLIENT_ID) == 1
    finally:
        echo.close()
        web.close()


def test_direct_connections_without_the_header_are_refused(tmp_path, issuer, server):
    plain = socket.create_connection(("127.0.0.1", server.inbound), timeout=10)
    plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        if plain.recv(100) == b"":
            raise ConnectionResetError("closed")
    plain.close()
    with direct(server.inbound, client_context(tmp_path, issuer, alpn=False)) as tls:  # mTLS, but no ALPN
        tls.sendall(b"hello")
        with pytest.raises((ConnectionResetError, ssl.SSLError, BrokenPipeError)):
            if tls.recv(100) == b"":
                raise ConnectionResetError("closed")
    with direct(server.inbound, client_context(tmp_path, issuer)) as tls:  # ALPN, but garbage instead of a header
        tls.sendall(b"not a transport header at all, sorry")
        with pytest.raises((ConnectionResetError, ssl.SSLError, BrokenPipeError)):
            if tls.recv(100) == b"":
                raise ConnectionResetError("closed")
    text = server.metrics()
    assert metric_value(text, "inbound_tcp_errors_total", error="direct connections require transport header negotiation") >= 2
    assert metric_value(text, "inbound_tcp_errors_total", error="invalid transport header") == 1


def test_the_header_codec_matches_protobuf(tmp_path):
    """Our hand-written encoding against the protobuf library's, from a .proto with Linkerd's fields."""
    proto = tmp_path / "transport_header.proto"
    proto.write_text('syntax = "proto3";\npackage transport.l5d.io;\n'
                     "message Header { int32 port = 1; string name = 2; SessionProtocol session_protocol = 3; }\n"
                     "message SessionProtocol { oneof kind { Http1 http1 = 1; Http2 http2 = 2; }\n"
                     "  message Http1 {}\n  message Http2 {}\n}\n")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", str(proto)], check=True)
    sys.path.insert(0, str(tmp_path))
    try:
        import transport_header_pb2 as pb
    finally:
        sys.path.remove(str(tmp_path))
    for header in (th.Header(8080), th.Header(80, "web.ns.svc.cluster.local", th.HTTP1), th.Header(65535, "", th.HTTP2)):
        msg = pb.Header(port=header.port, name=header.name)
        if header.protocol == th.HTTP1:
            msg.session_protocol.http1.SetInParent()
        elif header.protocol == th.HTTP2:
            msg.session_protocol.http2.SetInParent()
        theirs = msg.SerializeToString()
        ours = th.encode(header)
        assert ours[len(th.PREFACE) + 4:] == theirs
        assert th.decode(th.PREFACE + len(theirs).to_bytes(4, "big") + theirs + b"x") == (header, b"x")
