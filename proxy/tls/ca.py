"""A small certificate authority shaped like Linkerd's (ref 5.2).

Theory of operation: a trust anchor (``root.linkerd.<trust-domain>``) signs an
issuer (``identity.linkerd.<trust-domain>``), and the issuer signs workload
leaves. Everything is ECDSA P-256 with SHA-256 signatures, as
``linkerd2:pkg/tls/ca.go``. A leaf is what Linkerd's identity service issues:
CN and one SAN equal to the identity (a URI SAN for ``spiffe://`` names),
KeyUsage digitalSignature + keyEncipherment, EKU serverAuth + clientAuth,
valid from 20 s ago (clock skew) until lifetime + 20 s from now, never past the
expiry of any certificate above it.

Used by ``meshproxy identity init/issue`` (standalone meshes), by the demo, and
by the tests' fake identity service (``sign_csr`` applies the identity
service's CSR rules).
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "cluster.local"  # Linkerd's default: the cluster domain
# Trust anchor: 10 years, the lifetime Linkerd's docs give `step certificate create`
# for the root (87600h); rotating anchors is the costly, rare operation.
ROOT_LIFETIME_S = 10 * 365 * 86400
# Issuer: one year, Linkerd's DefaultLifetime (pkg/tls/ca.go) and the docs' 8760h.
ISSUER_LIFETIME_S = 365 * 86400
# Leaf: 24 h, the identity service's issuanceLifetime (ref 5.2).
LEAF_LIFETIME_S = 86400
# identity.issuer.clockSkewAllowance in Linkerd's chart: NotBefore -20 s, NotAfter +20 s.
CLOCK_SKEW_S = 20

CA_CERT, CA_KEY, ISSUER_CERT, ISSUER_KEY = "ca.crt", "ca.key", "issuer.crt", "issuer.key"
LEAF_CERT, LEAF_KEY, LEAF_ROOTS = "cert.pem", "key.pem", "roots.pem"

Key = ec.EllipticCurvePrivateKey


class CsrError(ValueError):
    """A CSR the identity service would refuse."""


def generate_key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def root_name(trust_domain: str) -> str:
    return f"root.linkerd.{trust_domain}"


def issuer_name(trust_domain: str) -> str:
    return f"identity.linkerd.{trust_domain}"


def _subject(common_name: str) -> x509.Name:
    # Linkerd names often exceed X.520's 64-character CN bound (Go does not
    # enforce it, and the identity service copies the CN from the proxy's CSR).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # cryptography warns even when told not to validate
            attr = x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)
    except TypeError:  # a cryptography without the private switch
        if len(common_name) > 64:
            return x509.Name([])
        attr = x509.NameAttribute(NameOID.COMMON_NAME, common_name)
    return x509.Name([attr])


def _san(name: str) -> x509.GeneralName:
    if name.startswith("spiffe://"):
        return x509.UniformResourceIdentifier(name)
    return x509.DNSName(name)


def _utc(t: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(t, datetime.UTC)


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _ca_cert(name: str, key: Key, signer_cert: x509.Certificate | None, signer_key: Key, lifetime_s: float, path_length: int | None, now: float) -> x509.Certificate:
    not_after = now + lifetime_s + CLOCK_SKEW_S
    if signer_cert is not None:
        not_after = min(not_after, signer_cert.not_valid_after_utc.timestamp())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(name))
        .issuer_name(signer_cert.subject if signer_cert is not None else _subject(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - CLOCK_SKEW_S))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if signer_cert is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
    return builder.sign(signer_key, hashes.SHA256())


def make_ca(
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    root_lifetime_s: float = ROOT_LIFETIME_S,
    issuer_lifetime_s: float = ISSUER_LIFETIME_S,
    now: float | None = None,
) -> tuple[x509.Certificate, Key, x509.Certificate, Key]:
    """A trust anchor and an issuer: (root_cert, root_key, issuer_cert, issuer_key)."""
    now = _now(now)
    root_key, issuer_key = generate_key(), generate_key()
    root = _ca_cert(root_name(trust_domain), root_key, None, root_key, root_lifetime_s, None, now)
    # The issuer signs only leaves: path length 0.
    issuer = _ca_cert(issuer_name(trust_domain), issuer_key, root, root_key, issuer_lifetime_s, 0, now)
    return root, root_key, issuer, issuer_key


def _leaf(
    issuer_cert: x509.Certificate,
    issuer_key: Key,
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    public_key: ec.EllipticCurvePublicKey,
    lifetime_s: float,
    chain: Sequence[x509.Certificate],
    now: float,
    skew_s: float,
) -> x509.Certificate:
    # Never valid past anything above it, so a refresh comes before the chain breaks (ca.go).
    not_after = min([now + lifetime_s + skew_s, issuer_cert.not_valid_after_utc.timestamp()] + [c.not_valid_after_utc.timestamp() for c in chain])
    if not_after <= now:
        raise ValueError(f"the issuer chain has expired ({_utc(not_after).isoformat()}); refusing to issue")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - skew_s))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def issue_leaf(
    issuer_cert: x509.Certificate,
    issuer_key: Key,
    name: str,
    lifetime_s: float = LEAF_LIFETIME_S,
    key: Key | None = None,
    *,
    chain: Sequence[x509.Certificate] = (),
    now: float | None = None,
    skew_s: float = CLOCK_SKEW_S,
) -> tuple[x509.Certificate, Key]:
    """A workload leaf for ``name`` (a new P-256 key unless one is given).
    ``chain``: certificates above the issuer (e.g. the root), for the expiry clamp."""
    key = key or generate_key()
    cert = _leaf(issuer_cert, issuer_key, _subject(name), [_san(name)], key.public_key(), lifetime_s, chain, _now(now), skew_s)
    return cert, key


def make_csr(key: Key, name: str) -> x509.CertificateSigningRequest:
    """The CSR linkerd2-proxy-identity writes to csr.der: CN and one SAN = name."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(name))
        .add_extension(x509.SubjectAlternativeName([_san(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )


def sign_csr(
    issuer_cert: x509.Certificate,
    issuer_key: Key,
    csr: x509.CertificateSigningRequest | bytes,
    lifetime_s: float = LEAF_LIFETIME_S,
    *,
    expected_name: str | None = None,
    chain: Sequence[x509.Certificate] = (),
    now: float | None = None,
    skew_s: float = CLOCK_SKEW_S,
) -> x509.Certificate:
    """Sign a CSR as Linkerd's identity service does (ref 5.3, step 3): a valid
    signature, an ECDSA key, exactly one DNS SAN (equal to ``expected_name`` if
    given), CN empty or equal to it, no email, IP or URI SANs."""
    if isinstance(csr, bytes | bytearray):
        try:
            csr = x509.load_der_x509_csr(bytes(csr))
        except ValueError as exc:
            raise CsrError(f"not a DER CSR: {exc}") from None
    if not csr.is_signature_valid:
        raise CsrError("the CSR signature is not valid")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CsrError("the CSR must carry an ECDSA public key")
    try:
        sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        sans = []
    dns = [gn.value for gn in sans if isinstance(gn, x509.DNSName)]
    if len(dns) != 1 or len(sans) != 1:
        raise CsrError(f"the CSR must have exactly one DNS SAN and nothing else, has {[gn.value for gn in sans]}")
    if expected_name is not None and dns[0] != expected_name:
        raise CsrError(f"the CSR names {dns[0]!r}, not {expected_name!r}")
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns and cns != [dns[0]]:
        raise CsrError(f"the CSR's CN {cns} differs from its SAN {dns[0]!r}")
    return _leaf(issuer_cert, issuer_key, csr.subject, sans, public_key, lifetime_s, chain, _now(now), skew_s)


# ---------------------------------------------------------------- PEM and files

def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: Key) -> str:
    """PKCS#8 PEM, unencrypted."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def key_pkcs8_der(key: Key) -> bytes:
    """What linkerd2-proxy-identity writes to key.p8."""
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_file(path: str, data: str | bytes, private: bool = False) -> None:
    """Atomically (a reader never sees half a file); keys readable by the owner only."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_ca(directory: str, root: x509.Certificate, root_key: Key, issuer: x509.Certificate, issuer_key: Key) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    files = [
        (CA_CERT, cert_pem(root), False),
        (CA_KEY, key_pem(root_key), True),
        (ISSUER_CERT, cert_pem(issuer), False),
        (ISSUER_KEY, key_pem(issuer_key), True),
    ]
    for name, data, private in files:
        write_file(os.path.join(directory, name), data, private)
    return [os.path.join(directory, name) for name, _, _ in files]


def load_issuer(directory: str) -> tuple[x509.Certificate, Key, list[x509.Certificate]]:
    """(issuer cert, issuer key, roots) from a directory written by ``write_ca``."""
    with open(os.path.join(directory, ISSUER_CERT), "rb") as f:
        issuer = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(directory, ISSUER_KEY), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(os.path.join(directory, CA_CERT), "rb") as f:
        roots = x509.load_pem_x509_certificates(f.read())
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ISSUER_KEY} is not an ECDSA key")
    return issuer, key, roots


def write_leaf(out_dir: str, leaf: x509.Certificate, key: Key, issuer: x509.Certificate, roots: Sequence[x509.Certificate]) -> list[str]:
    """cert.pem (leaf then issuer), key.pem (PKCS#8), roots.pem: the files
    MESHPROXY_IDENTITY_CERT_FILE / _KEY_FILE and the trust anchors expect (SPEC 6)."""
    os.makedirs(out_dir, exist_ok=True)
    # Key first: a watcher that sees the new certificate finds its key already there.
    write_file(os.path.join(out_dir, LEAF_KEY), key_pem(key), private=True)
    write_file(os.path.join(out_dir, LEAF_CERT), cert_pem(leaf) + cert_pem(issuer))
    write_file(os.path.join(out_dir, LEAF_ROOTS), "".join(cert_pem(r) for r in roots))
    return [os.path.join(out_dir, n) for n in (LEAF_CERT, LEAF_KEY, LEAF_ROOTS)]
