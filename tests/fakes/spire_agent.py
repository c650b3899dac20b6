"""A fake SPIRE agent: the SPIFFE Workload API's ``FetchX509SVID`` over real
gRPC on a unix socket, with protobuf code generated at test time from
``proxy/control/proto/workload.proto``.

Like the real agent it refuses a call without the ``workload.spiffe.io: true``
metadata (InvalidArgument), sends the current SVIDs at once and then a new
message whenever the test ``push``es new ones (a rotation).

    agent = FakeSpireAgent(socket_path)
    agent.push([svid_for(issuer, issuer_key, "spiffe://...", roots=[root])])
    agent.start()
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from cryptography.hazmat.primitives import serialization

from proxy.tls import ca
from tests.fakes.identity_service import compile_protos


@dataclass(frozen=True)
class Svid:
    spiffe_id: str
    chain_der: bytes  # leaf first, concatenated
    key_der: bytes  # PKCS#8
    bundle_der: bytes  # roots, concatenated
    not_after: float


def svid_for(issuer_cert, issuer_key, spiffe_id: str, roots=(), lifetime_s: float = 3600) -> Svid:
    """An X.509-SVID for ``spiffe_id`` (URI SAN) signed by the test CA."""
    leaf, key = ca.issue_leaf(issuer_cert, issuer_key, spiffe_id, lifetime_s, chain=list(roots))
    der = serialization.Encoding.DER
    return Svid(
        spiffe_id,
        leaf.public_bytes(der) + issuer_cert.public_bytes(der),
        ca.key_pkcs8_der(key),
        b"".join(r.public_bytes(der) for r in roots),
        leaf.not_valid_after_utc.timestamp(),
    )


class FakeSpireAgent:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._svids: list[Svid] = []
        self._version = 0
        self._cond = threading.Condition()
        self.calls = 0
        self.rejected = 0
        self.server: grpc.Server | None = None

    def push(self, svids: list[Svid]) -> None:
        """Replace the SVIDs; every open stream gets a message with them."""
        with self._cond:
            self._svids = list(svids)
            self._version += 1
            self._cond.notify_all()

    def _message(self, svids: list[Svid]):
        pb = compile_protos().workload_pb2
        return pb.X509SVIDResponse(svids=[
            pb.X509SVID(spiffe_id=s.spiffe_id, x509_svid=s.chain_der, x509_svid_key=s.key_der, bundle=s.bundle_der)
            for s in svids
        ])

    def _fetch(self, request, context):
        self.calls += 1
        metadata = dict(context.invocation_metadata())
        if metadata.get("workload.spiffe.io") != "true":
            self.rejected += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        sent = -1
        while context.is_active():
            with self._cond:
                if self._version == sent or not self._svids:
                    self._cond.wait(timeout=0.2)
                    continue
                sent, svids = self._version, list(self._svids)
            yield self._message(svids)

    def start(self) -> None:
        protos = compile_protos()
        servicer = type("Workload", (protos.workload_pb2_grpc.SpiffeWorkloadAPIServicer,), {"FetchX509SVID": lambda _self, req, ctx: self._fetch(req, ctx)})()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        protos.workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, self.server)
        self.server.add_insecure_port(f"unix:{self.socket_path}")
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0).wait(5)
            self.server = None
        with self._cond:
            self._cond.notify_all()
