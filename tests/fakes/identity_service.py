"""A fake Linkerd identity service speaking the real API over real gRPC.

The protobuf and gRPC code is generated at test time by grpcio-tools from the
``.proto`` files the runtime's own codec is written against
(``proxy/control/proto``); grpcio serves it. The fake signs the proxy's CSR
with a CA the test made (``proxy.tls.ca.sign_csr`` applies the identity
service's CSR rules), can answer after a delay, issues leaves of any lifetime,
and serves either plaintext or TLS with its own certificate and **no ALPN**.

TLS is terminated in front of the gRPC server by a small relay that
negotiates no ALPN, as the Linkerd proxy in front of the real controller does.
(grpcio's own TLS server closes any connection that did not negotiate ``h2``
by ALPN, so it cannot stand in for the real thing.) The relay requests, but
does not require, a client certificate, and records who presented one.

    protos = compile_protos()            # generated modules, built once per process
    fake = FakeIdentityService(issuer, issuer_key, [root], lifetime_s=20)
    port = fake.start(tls=(key_pem, chain_pem))
    ...
    fake.stop()
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
from cryptography.hazmat.primitives import serialization

from proxy.tls import ca
from proxy.tls.credentials import Credentials, peer_identity
from tests.fakes import protos

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proxy", "control", "proto")



def compile_protos(out_dir: str | None = None) -> SimpleNamespace:
    """protoc's code for ("identity", "workload") (tests/fakes/protos.py), compiled once per process."""
    return protos.compile_protos(("identity", "workload"), out_dir)

@dataclass
class CertifyCall:
    identity: str
    token: bytes
    at: float


class FakeIdentityService:
    """``io.linkerd.proxy.identity.Identity/Certify`` backed by a test CA."""

    def __init__(self, issuer_cert, issuer_key, roots=(), *, lifetime_s: float = ca.LEAF_LIFETIME_S, skew_s: float = 0.0, delay_s: float = 0.0, expected_token: bytes | None = None) -> None:
        self.issuer_cert = issuer_cert
        self.issuer_key = issuer_key
        self.roots = list(roots)
        self.lifetime_s = lifetime_s
        # valid_until = now + lifetime + skew; 0 by default so a test's "20 s leaf" lives 20 s.
        self.skew_s = skew_s
        self.delay_s = delay_s
        self.expected_token = expected_token
        self.fail_with: grpc.StatusCode | None = None  # set to make every call fail
        self.calls: list[CertifyCall] = []
        self.server: grpc.Server | None = None
        self.relay: TlsRelay | None = None
        self.port = 0

    def _certify(self, request, context):
        protos = compile_protos()
        if self.delay_s:
            time.sleep(self.delay_s)
        self.calls.append(CertifyCall(request.identity, request.token, time.time()))
        if self.fail_with is not None:
            context.abort(self.fail_with, "failing on purpose")
        if not request.token or (self.expected_token is not None and request.token != self.expected_token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "token rejected")
        try:
            leaf = ca.sign_csr(
                self.issuer_cert, self.issuer_key, request.certificate_signing_request, self.lifetime_s,
                expected_name=request.identity, chain=self.roots, skew_s=self.skew_s,
            )
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = protos.identity_pb2.CertifyResponse(
            leaf_certificate=leaf.public_bytes(serialization.Encoding.DER),
            intermediate_certificates=[self.issuer_cert.public_bytes(serialization.Encoding.DER)],
        )
        response.valid_until.FromSeconds(int(leaf.not_valid_after_utc.timestamp()))
        return response

    def start(self, host: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> int:
        """Serve on a free port; ``tls`` = (key PEM, chain PEM) for TLS. Returns the port."""
        protos = compile_protos()
        servicer = type("Identity", (protos.identity_pb2_grpc.IdentityServicer,), {"Certify": lambda _self, req, ctx: self._certify(req, ctx)})()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        protos.identity_pb2_grpc.add_IdentityServicer_to_server(servicer, self.server)
        grpc_port = self.server.add_insecure_port(f"{host}:0")
        self.server.start()
        if tls is None:
            self.port = grpc_port
        else:
            key_pem, chain_pem = tls
            roots = "".join(ca.cert_pem(r) for r in self.roots)
            context = Credentials.from_pem("identity", key_pem, chain_pem, roots).server_context(alpn=None)
            self.relay = TlsRelay(context, host, grpc_port)
            self.port = self.relay.start()
        return self.port

    @property
    def tls_peers(self) -> list[str | None]:
        """Per TLS connection: the client certificate's first SAN, None without one."""
        return list(self.relay.peers) if self.relay is not None else []

    @property
    def tls_alpn(self) -> list[str | None]:
        return list(self.relay.alpn) if self.relay is not None else []

    @property
    def tls_sni(self) -> list[str | None]:
        return list(self.relay.sni) if self.relay is not None else []

    def stop(self) -> None:
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        if self.server is not None:
            self.server.stop(grace=0).wait(5)
            self.server = None


class TlsRelay:
    """TLS in front of a plaintext port, no ALPN: a thread with its own event loop."""

    def __init__(self, context, host: str, backend_port: int) -> None:
        self.context = context
        self.host = host
        self.backend_port = backend_port
        self.peers: list[str | None] = []
        self.alpn: list[str | None] = []  # what each connection negotiated
        self.sni: list[str | None] = []
        context.sni_callback = lambda _obj, name, _ctx: self.sni.append(name)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-relay", daemon=True)
        self.server: asyncio.AbstractServer | None = None

    def start(self) -> int:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, self.host, 0, ssl=self.context), self.loop
        ).result(5)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        self.peers.append(peer_identity(ssl_object) if ssl_object else None)
        self.alpn.append(ssl_object.selected_alpn_protocol() if ssl_object else None)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.backend_port)
        except OSError:
            writer.close()
            return

        async def pipe(src, dst) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def make_identity_dir(directory: str, name: str) -> str:
    """What linkerd2-proxy-identity leaves in LINKERD2_PROXY_IDENTITY_DIR:
    key.p8 (PKCS#8 DER, 0600) and csr.der. Returns the directory."""
    key = ca.generate_key()
    ca.write_file(os.path.join(directory, "key.p8"), ca.key_pkcs8_der(key), private=True)
    ca.write_file(os.path.join(directory, "csr.der"), ca.make_csr(key, name).public_bytes(serialization.Encoding.DER))
    return directory
