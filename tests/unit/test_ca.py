"""`meshproxy identity init/issue` and the CA library: Linkerd's shapes (ref 5.2),
checked with cryptography's own RFC 5280 verifier, independent of OpenSSL."""

from __future__ import annotations

import datetime
import os
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from proxy import identity_cmd
from proxy.tls import ca
from proxy.tls.credentials import Credentials, CredentialsError

NAME = "web.default.serviceaccount.identity.linkerd.cluster.local"
SPIFFE = "spiffe://cluster.local/ns/default/sa/web"


def _certs(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())


def _key(path):
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def _cn(cert):
    return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _sans(cert):
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def _is_p256(key):
    return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


@pytest.fixture
def ca_dir(tmp_path):
    d = tmp_path / "ca"
    assert identity_cmd.main(["init", "--dir", str(d), "--trust-domain", "example.org"]) == 0
    return d


def test_init_writes_anchor_and_issuer(ca_dir):
    assert sorted(os.listdir(ca_dir)) == ["ca.crt", "ca.key", "issuer.crt", "issuer.key"]
    (root,), (issuer,) = _certs(ca_dir / "ca.crt"), _certs(ca_dir / "issuer.crt")
    assert _cn(root) == ["root.linkerd.example.org"]
    assert _cn(issuer) == ["identity.linkerd.example.org"]
    assert issuer.issuer == root.subject
    for cert, key_file in ((root, "ca.key"), (issuer, "issuer.key")):
        key = _key(ca_dir / key_file)
        assert _is_p256(key) and _is_p256(cert.public_key())
        assert cert.public_key().public_numbers() == key.public_key().public_numbers()
        assert cert.signature_hash_algorithm.name == "sha256"
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
        assert stat.S_IMODE(os.stat(ca_dir / key_file).st_mode) == 0o600
    assert issuer.not_valid_after_utc <= root.not_valid_after_utc


def test_init_refuses_to_replace_a_ca(ca_dir, capsys):
    before = (ca_dir / "ca.crt").read_bytes()
    assert identity_cmd.main(["init", "--dir", str(ca_dir)]) == 64
    assert "--force" in capsys.readouterr().err
    assert (ca_dir / "ca.crt").read_bytes() == before
    assert identity_cmd.main(["init", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "ca.crt").read_bytes() != before


def _verify_with_cryptography(leaf, issuer, root, name=None):
    builder = PolicyBuilder().store(Store([root])).time(datetime.datetime.now(datetime.UTC))
    if name is not None:
        builder.build_server_verifier(x509.DNSName(name)).verify(leaf, [issuer])
    verified = builder.build_client_verifier().verify(leaf, [issuer])
    assert verified.chain[-1] == root


def test_issue_dns_leaf_as_linkerd(ca_dir, tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    assert identity_cmd.main(["issue", "--dir", str(ca_dir), "--name", NAME, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["cert.pem", "key.pem", "roots.pem"]
    leaf, issuer = _certs(out / "cert.pem")  # leaf then issuer (SPEC 6)
    (root,) = _certs(out / "roots.pem")
    assert issuer == _certs(ca_dir / "issuer.crt")[0] and root == _certs(ca_dir / "ca.crt")[0]
    key = _key(out / "key.pem")
    assert (out / "key.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert stat.S_IMODE(os.stat(out / "key.pem").st_mode) == 0o600
    assert _is_p256(key) and leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert _cn(leaf) == [NAME]
    assert [type(g) for g in _sans(leaf)] == [x509.DNSName] and _sans(leaf)[0].value == NAME
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert eku == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert leaf.signature_hash_algorithm.name == "sha256"
    # NotBefore now - 20 s, NotAfter now + 24 h + 20 s (ref 5.2).
    assert abs(leaf.not_valid_before_utc.timestamp() - (t0 - 20)) < 3
    assert abs(leaf.not_valid_after_utc.timestamp() - (t0 + 86400 + 20)) < 3
    _verify_with_cryptography(leaf, issuer, root, NAME)
    # And the files make installable credentials.
    Credentials.from_pem(NAME, (out / "key.pem").read_text(), (out / "cert.pem").read_text(), (out / "roots.pem").read_text()).verify()


def test_issue_spiffe_leaf_has_uri_san(ca_dir, tmp_path):
    out = tmp_path / "spiffe"
    assert identity_cmd.main(["issue", "--dir", str(ca_dir), "--name", SPIFFE, "--out", str(out), "--lifetime", "1h"]) == 0
    leaf, issuer = _certs(out / "cert.pem")
    (root,) = _certs(out / "roots.pem")
    sans = _sans(leaf)
    assert len(sans) == 1 and isinstance(sans[0], x509.UniformResourceIdentifier) and sans[0].value == SPIFFE
    assert abs(leaf.not_valid_after_utc.timestamp() - (time.time() + 3600 + 20)) < 3
    _verify_with_cryptography(leaf, issuer, root)


def test_issue_rejects_bad_input(ca_dir, tmp_path, capsys):
    assert identity_cmd.main(["issue", "--dir", str(ca_dir), "--name", "not a name!", "--out", str(tmp_path / "x")]) == 64
    assert identity_cmd.main(["issue", "--dir", str(ca_dir), "--name", NAME, "--out", str(tmp_path / "x"), "--lifetime", "1.5h"]) == 64
    assert identity_cmd.main(["issue", "--dir", str(tmp_path / "nothing"), "--name", NAME, "--out", str(tmp_path / "x")]) == 1
    assert identity_cmd.main(["bogus"]) == 64
    assert not (tmp_path / "x").exists()


def test_leaf_is_clamped_to_the_issuer():
    root, _, issuer, issuer_key = ca.make_ca(issuer_lifetime_s=3600)
    leaf, _ = ca.issue_leaf(issuer, issuer_key, NAME, 86400, chain=[root])
    assert leaf.not_valid_after_utc == issuer.not_valid_after_utc


@pytest.mark.filterwarnings("ignore:Attribute's length")
def test_long_names_keep_their_cn():
    # 70 characters: longer than X.520's CN bound, as many Linkerd names are.
    long_name = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"
    _, _, issuer, issuer_key = ca.make_ca()
    leaf, _ = ca.issue_leaf(issuer, issuer_key, long_name)
    assert _cn(leaf) == [long_name]


def test_sign_csr_applies_identity_service_rules():
    root, _, issuer, issuer_key = ca.make_ca()
    key = ca.generate_key()
    csr_der = ca.make_csr(key, NAME).public_bytes(serialization.Encoding.DER)
    leaf = ca.sign_csr(issuer, issuer_key, csr_der, 20, expected_name=NAME, chain=[root], skew_s=0)
    assert _sans(leaf)[0].value == NAME and _cn(leaf) == [NAME]
    assert abs(leaf.not_valid_after_utc.timestamp() - (time.time() + 20)) < 3
    with pytest.raises(ca.CsrError):
        ca.sign_csr(issuer, issuer_key, csr_der, expected_name="other.default.serviceaccount.identity.linkerd.cluster.local")
    with pytest.raises(ca.CsrError):  # Linkerd's identity service refuses URI SANs
        ca.sign_csr(issuer, issuer_key, ca.make_csr(key, SPIFFE))
    with pytest.raises(ca.CsrError):
        ca.sign_csr(issuer, issuer_key, b"not a csr")


def test_credentials_verify_refuses_wrong_name_other_ca_and_expired():
    root, _, issuer, issuer_key = ca.make_ca()
    other_root, _, _, _ = ca.make_ca()
    leaf, key = ca.issue_leaf(issuer, issuer_key, NAME, chain=[root])
    chain = ca.cert_pem(leaf) + ca.cert_pem(issuer)
    Credentials.from_pem(NAME, ca.key_pem(key), chain, ca.cert_pem(root)).verify()
    with pytest.raises(CredentialsError, match="does not name"):
        Credentials.from_pem("other.name", ca.key_pem(key), chain, ca.cert_pem(root)).verify()
    with pytest.raises(CredentialsError, match="chain"):
        Credentials.from_pem(NAME, ca.key_pem(key), chain, ca.cert_pem(other_root)).verify()
    with pytest.raises(CredentialsError, match="key"):
        Credentials.from_pem(NAME, ca.key_pem(ca.generate_key()), chain, ca.cert_pem(root)).verify()
    with pytest.raises(CredentialsError, match="expired"):
        Credentials.from_pem(NAME, ca.key_pem(key), chain, ca.cert_pem(root)).verify(now=time.time() + 2 * 86400)


def test_credentials_json_round_trip():
    root, _, issuer, issuer_key = ca.make_ca()
    leaf, key = ca.issue_leaf(issuer, issuer_key, SPIFFE, chain=[root])
    creds = Credentials.from_pem(SPIFFE, ca.key_pem(key), ca.cert_pem(leaf) + ca.cert_pem(issuer), ca.cert_pem(root), server_name="web.example.org")
    again = Credentials.from_json(creds.to_json())
    assert again == creds and again.sni == "web.example.org"
    assert again.not_after == leaf.not_valid_after_utc.timestamp()
