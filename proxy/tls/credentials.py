"""The proxy's TLS credentials and the SSL contexts built from them (ref 5.2, 5.4).

Theory of operation: one ``Credentials`` value is the whole identity of the
proxy at one moment: its name, its private key, its chain (leaf first, then the
intermediates it presents) and the trust anchors it verifies peers against.
Identity sources (``proxy.tls.identity``) make a new value on every renewal and
hand it over; workers rebuild their contexts from it. It is plain PEM text, so
the supervisor can pass it to worker processes as JSON.

Contexts follow Linkerd's rustls setup: TLS 1.3 only; the server asks for a
client certificate but accepts a connection without one; the client verifies
the server's chain against the roots but not the host name (the SNI is an
identity, and rustls in Linkerd ignores it for verification); after the
handshake the caller checks the expected identity among the leaf's DNS and URI
SANs with ``check_server_identity``. ``peer_identity`` is the first DNS or URI
SAN, which is what Linkerd reports as ``client_id``.

Python's ``ssl`` loads a certificate chain only from a file. The PEM goes
through an anonymous in-memory file (``memfd``), so a private key never touches
a disk.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import ssl
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import crypto


class CredentialsError(ValueError):
    """Credentials that must not be installed (expired, wrong name, bad chain...)."""


class _HasPeerCert(Protocol):
    def getpeercert(self, binary_form: bool = ...) -> Any: ...


@dataclass(frozen=True, slots=True)
class Credentials:
    """One identity: PEM key, PEM chain (leaf then intermediates), PEM roots."""

    name: str  # the identity: a DNS-like Linkerd name or a spiffe:// URI
    key_pem: str  # PKCS#8
    chain_pem: str
    roots_pem: str
    not_after: float  # epoch seconds, the leaf's NotAfter
    # The TLS server name (SNI) peers use to reach us. Equal to ``name`` for
    # Linkerd identities; a separate DNS name for SPIFFE ones (ref 5.1).
    server_name: str = ""

    # ------------------------------------------------------------ building

    @classmethod
    def from_pem(cls, name: str, key_pem: str, chain_pem: str, roots_pem: str, server_name: str = "") -> Credentials:
        certs = load_pem_certs(chain_pem)
        if not certs:
            raise CredentialsError("the certificate chain holds no certificate")
        return cls(name, key_pem, chain_pem, roots_pem, certs[0].not_valid_after_utc.timestamp(), server_name or name)

    @classmethod
    def from_der(cls, name: str, key_pkcs8_der: bytes, chain_der: Sequence[bytes], roots_pem: str, server_name: str = "") -> Credentials:
        """From what the identity service and SPIRE send: a PKCS#8 DER key and DER certificates."""
        try:
            key = serialization.load_der_private_key(key_pkcs8_der, password=None)
            certs = [x509.load_der_x509_certificate(der) for der in chain_der]
        except ValueError as exc:
            raise CredentialsError(f"cannot parse key or certificate: {exc}") from None
        if not certs:
            raise CredentialsError("the certificate chain holds no certificate")
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
        chain_pem = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)
        return cls(name, key_pem, chain_pem, roots_pem, certs[0].not_valid_after_utc.timestamp(), server_name or name)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Credentials:
        return cls(**json.loads(text))

    # ------------------------------------------------------------ inspection

    @property
    def sni(self) -> str:
        return self.server_name or self.name

    def leaf(self) -> x509.Certificate:
        return load_pem_certs(self.chain_pem)[0]

    def verify(self, now: float | None = None) -> None:
        """Raise CredentialsError unless these may be installed: the key matches
        the leaf, the leaf is within its validity, names ``name`` and chains
        to the roots (Linkerd checks the same before swapping its configs)."""
        now = time.time() if now is None else now
        try:
            chain = load_pem_certs(self.chain_pem)
            roots = load_pem_certs(self.roots_pem)
            key = serialization.load_pem_private_key(self.key_pem.encode(), password=None)
        except ValueError as exc:
            raise CredentialsError(f"cannot parse credentials: {exc}") from None
        if not chain:
            raise CredentialsError("the certificate chain holds no certificate")
        if not roots:
            raise CredentialsError("no trust anchors")
        leaf = chain[0]
        if _public_der(key.public_key()) != _public_der(leaf.public_key()):
            raise CredentialsError("the private key does not belong to the leaf certificate")
        if leaf.not_valid_after_utc.timestamp() <= now:
            raise CredentialsError(f"the leaf certificate expired at {leaf.not_valid_after_utc.isoformat()}")
        if self.name not in cert_identities(leaf):
            raise CredentialsError(f"the leaf certificate does not name {self.name!r} (it names {cert_identities(leaf)})")
        verify_chain(leaf, chain[1:], roots, now)

    # ------------------------------------------------------------ contexts

    def server_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """Inbound mTLS: our chain, client certificate requested, not required."""
        ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, self.roots_pem)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        # Our own clients never resume (ref 5.4), so tickets would be wasted bytes and CPU.
        ctx.num_tickets = 0
        self._load_chain(ctx)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """Outbound mTLS: present our chain, verify the server's chain, not its host name."""
        ctx = roots_client_context(self.roots_pem, alpn)
        self._load_chain(ctx)
        return ctx

    def _load_chain(self, ctx: ssl.SSLContext) -> None:
        with _memory_file(self.chain_pem + self.key_pem) as path:
            ctx.load_cert_chain(path)


def roots_client_context(roots_pem: str, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client context that verifies servers against ``roots_pem`` and presents
    no certificate: what the identity client uses before it has a leaf."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, roots_pem)
    # The SNI is the peer's identity; the name is checked among the SANs after
    # the handshake (check_server_identity), as rustls in Linkerd does.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def _base_context(protocol: int, roots_pem: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    # TLS 1.3 only, as Linkerd 2.12+ (ref 5.4). OpenSSL's TLS 1.3 suites are the
    # same three Linkerd offers (AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305).
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION
    if roots_pem.strip():
        ctx.load_verify_locations(cadata=roots_pem)
    # webpki (Linkerd) treats every configured anchor as trusted, self-signed or
    # not; OpenSSL needs PARTIAL_CHAIN for an intermediate used as an anchor.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


@contextlib.contextmanager
def _memory_file(text: str) -> Iterator[str]:
    data = text.encode()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("meshproxy-credentials", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    # Not Linux: a private temporary file, removed at once.
    fd, path = tempfile.mkstemp(prefix="meshproxy-credentials-")
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


# ---------------------------------------------------------------- certificates

def load_pem_certs(pem: str | bytes) -> list[x509.Certificate]:
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN" not in data:
        return []
    return x509.load_pem_x509_certificates(data)


def split_der_certs(data: bytes) -> list[bytes]:
    """Concatenated DER certificates (SPIFFE's x509_svid and bundle) into a list."""
    out, pos = [], 0
    while pos < len(data):
        if data[pos] != 0x30 or pos + 2 > len(data):
            raise CredentialsError("not a DER certificate sequence")
        first = data[pos + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + 2 + count > len(data):
                raise CredentialsError("bad DER length")
            length, header = int.from_bytes(data[pos + 2:pos + 2 + count], "big"), 2 + count
        end = pos + header + length
        if end > len(data):
            raise CredentialsError("truncated DER certificate")
        out.append(data[pos:end])
        pos = end
    return out


def der_to_pem(ders: Sequence[bytes]) -> str:
    return "".join(x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM).decode() for d in ders)


def cert_identities(cert: x509.Certificate) -> list[str]:
    """DNS and URI SANs, in certificate order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [gn.value for gn in san if isinstance(gn, x509.DNSName | x509.UniformResourceIdentifier)]


def verify_chain(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: float | None = None) -> None:
    """Raise CredentialsError unless ``leaf`` chains to one of ``roots`` at ``now``,
    with OpenSSL, the verifier the handshakes will use."""
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    if now is not None:
        store.set_time(datetime.datetime.fromtimestamp(now, datetime.UTC).replace(tzinfo=None))
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf), [crypto.X509.from_cryptography(c) for c in intermediates])
    try:
        ctx.verify_certificate()
    except crypto.X509StoreContextError as exc:
        raise CredentialsError(f"the certificate does not chain to the trust anchors: {exc}") from None


def _public_der(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def is_p256(cert: x509.Certificate) -> bool:
    key = cert.public_key()
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


# ---------------------------------------------------------------- peers

@functools.lru_cache(maxsize=4096)
def _identities_of_der(der: bytes) -> tuple[str, ...]:
    # Peers present the same few leaves again and again; parse each once.
    try:
        return tuple(cert_identities(x509.load_der_x509_certificate(der)))
    except ValueError:
        return ()


def peer_identity(ssl_object: _HasPeerCert) -> str | None:
    """The peer's identity: the first DNS or URI SAN of its leaf; None without a certificate."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    names = _identities_of_der(der)
    return names[0] if names else None


def check_server_identity(ssl_object: _HasPeerCert, expected: str) -> bool:
    """True when ``expected`` is among the DNS or URI SANs of the peer's leaf
    (DNS names compared without case, as names are)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der or not expected:
        return False
    wanted = expected.rstrip(".").lower() if not expected.startswith("spiffe://") else expected
    for name in _identities_of_der(der):
        if name == expected or ("://" not in name and name.rstrip(".").lower() == wanted):
            return True
    return False
