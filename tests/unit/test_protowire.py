"""The runtime's protobuf codec, alone and against the real protobuf library
(our .proto files compiled by grpcio-tools at test time)."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.control import protowire as pw
from tests.fakes.identity_service import compile_protos


@pytest.fixture(scope="module")
def protos(tmp_path_factory):
    return compile_protos(str(tmp_path_factory.mktemp("protos")))


# ---------------------------------------------------------------- alone

@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**63 - 1, 2**64 - 1])
def test_varint_round_trip(value):
    data = pw.encode_varint(value)
    assert pw.decode_varint(data, 0) == (value, len(data))


def test_varint_known_bytes_and_negative():
    assert pw.encode_varint(300) == b"\xac\x02"
    assert pw.encode_varint(-1) == b"\xff" * 9 + b"\x01"  # int64 -1: ten bytes
    with pytest.raises(pw.DecodeError):
        pw.decode_varint(b"\x80\x80", 0)


def test_messages_round_trip():
    messages = [
        pw.CertifyRequest("web.default.serviceaccount.identity.linkerd.cluster.local", b"token", b"\x30\x82csr"),
        pw.CertifyRequest(),
        pw.CertifyResponse(b"leaf", (b"i1", b"", b"i3"), pw.Timestamp(1_700_000_000, 5)),
        pw.CertifyResponse(b"leaf"),
        pw.Timestamp(-62135596800, 999_999_999),
        pw.X509SVIDRequest(),
        pw.X509SVIDResponse(
            (pw.X509SVID("spiffe://a/b", b"chain", b"key", b"bundle", "internal"), pw.X509SVID("spiffe://c")),
            (b"crl1",),
            {"spiffe://other": b"bundle2", "spiffe://x": b""},
        ),
    ]
    for message in messages:
        assert type(message).decode(message.encode()) == message


def test_defaults_are_not_written_and_unknown_fields_are_skipped():
    assert pw.CertifyRequest().encode() == b""
    assert pw.CertifyResponse(valid_until=pw.Timestamp()).encode() == b"\x1a\x00"  # a present, empty message
    extra = pw.key(9, pw.VARINT) + pw.encode_varint(7) + pw.key(10, pw.LEN) + b"\x02hi" + pw.key(11, pw.FIXED64) + b"\0" * 8 + pw.key(12, pw.FIXED32) + b"\0" * 4
    assert pw.CertifyRequest.decode(extra + pw.CertifyRequest(identity="x").encode()) == pw.CertifyRequest(identity="x")


def test_truncated_and_wrong_types_are_errors():
    good = pw.CertifyRequest(identity="abc").encode()
    with pytest.raises(pw.DecodeError):
        pw.CertifyRequest.decode(good[:-1])
    with pytest.raises(pw.DecodeError):  # identity (a string) sent as a varint
        pw.CertifyRequest.decode(pw.key(1, pw.VARINT) + b"\x01")
    with pytest.raises(pw.DecodeError):
        pw.CertifyRequest.decode(pw.key(1, pw.LEN) + b"\x02\xff\xfe")  # not UTF-8


def test_repeated_numbers_packed_and_unpacked():
    @dataclasses.dataclass(frozen=True)
    class Numbers(pw.Message):
        values: tuple[int, ...] = pw.pb(1, "int64", repeated=True)
        flags: tuple[bool, ...] = pw.pb(2, "bool", repeated=True)
        score: int = pw.pb(3, "sint32")

    message = Numbers((1, -2, 300), (True, False), -5)
    assert Numbers.decode(message.encode()) == message
    unpacked = b"".join(pw.key(1, pw.VARINT) + pw.encode_varint(v) for v in (1, -2, 300))
    assert Numbers.decode(unpacked).values == (1, -2, 300)
    assert message.encode().startswith(pw.key(1, pw.LEN))  # proto3 packs by default


def test_singular_message_fields_merge():
    # Protobuf merges repeated occurrences of a singular message field.
    a = pw.CertifyResponse(valid_until=pw.Timestamp(5, 0)).encode()
    b = pw.CertifyResponse(valid_until=pw.Timestamp(0, 7)).encode()
    assert pw.CertifyResponse.decode(a + b).valid_until == pw.Timestamp(5, 7)


def test_timestamp_epoch():
    ts = pw.Timestamp.from_epoch(1_700_000_000.25)
    assert ts == pw.Timestamp(1_700_000_000, 250_000_000) and ts.to_epoch() == 1_700_000_000.25


# ---------------------------------------------------------------- against protobuf

def _descriptor_fields(descriptor):
    return {f.name: f.number for f in descriptor.fields}


def _our_fields(cls):
    return {name: number for number, (name, *_rest) in cls._fields().items()}


def test_field_numbers_and_names_match_the_proto_files(protos):
    ident, work = protos.identity_pb2, protos.workload_pb2
    assert _our_fields(pw.CertifyRequest) == _descriptor_fields(ident.CertifyRequest.DESCRIPTOR)
    assert _our_fields(pw.CertifyResponse) == _descriptor_fields(ident.CertifyResponse.DESCRIPTOR)
    assert _our_fields(pw.X509SVID) == _descriptor_fields(work.X509SVID.DESCRIPTOR)
    assert _our_fields(pw.X509SVIDResponse) == _descriptor_fields(work.X509SVIDResponse.DESCRIPTOR)
    assert _our_fields(pw.X509SVIDRequest) == _descriptor_fields(work.X509SVIDRequest.DESCRIPTOR) == {}
    service = ident.DESCRIPTOR.services_by_name["Identity"]
    assert f"/{service.full_name}/{service.methods_by_name['Certify'].name}" == pw.CERTIFY_METHOD
    spire = work.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]
    method = spire.methods_by_name["FetchX509SVID"]
    assert f"/{spire.full_name}/{method.name}" == pw.FETCH_X509_SVID_METHOD
    assert method.server_streaming and not method.client_streaming


def test_certify_request_bytes_equal_protobuf(protos):
    ours = pw.CertifyRequest("web.default.serviceaccount.identity.linkerd.cluster.local", b"tok\x00en", bytes(range(256)))
    theirs = protos.identity_pb2.CertifyRequest(identity=ours.identity, token=ours.token, certificate_signing_request=ours.certificate_signing_request)
    assert ours.encode() == theirs.SerializeToString(deterministic=True)
    parsed = protos.identity_pb2.CertifyRequest.FromString(ours.encode())
    assert (parsed.identity, parsed.token, parsed.certificate_signing_request) == (ours.identity, ours.token, ours.certificate_signing_request)


def test_certify_response_from_protobuf(protos):
    theirs = protos.identity_pb2.CertifyResponse(leaf_certificate=b"\x30leaf", intermediate_certificates=[b"\x30i1", b"\x30i2"])
    theirs.valid_until.FromSeconds(1_800_000_000)
    theirs.valid_until.nanos = 42
    ours = pw.CertifyResponse.decode(theirs.SerializeToString())
    assert ours == pw.CertifyResponse(b"\x30leaf", (b"\x30i1", b"\x30i2"), pw.Timestamp(1_800_000_000, 42))
    assert ours.encode() == theirs.SerializeToString(deterministic=True)
    negative = protos.identity_pb2.CertifyResponse()
    negative.valid_until.seconds = -5
    assert pw.CertifyResponse.decode(negative.SerializeToString()).valid_until == pw.Timestamp(-5, 0)
    assert protos.identity_pb2.CertifyResponse.FromString(pw.CertifyResponse(valid_until=pw.Timestamp(-5, 0)).encode()).valid_until.seconds == -5


def test_x509_svid_response_both_ways(protos):
    wp = protos.workload_pb2
    theirs = wp.X509SVIDResponse(
        svids=[wp.X509SVID(spiffe_id="spiffe://td/a", x509_svid=b"chain", x509_svid_key=b"key", bundle=b"roots", hint="internal"), wp.X509SVID(spiffe_id="spiffe://td/b")],
        crl=[b"crl"],
        federated_bundles={"spiffe://other": b"fb"},
    )
    ours = pw.X509SVIDResponse.decode(theirs.SerializeToString())
    assert ours == pw.X509SVIDResponse(
        (pw.X509SVID("spiffe://td/a", b"chain", b"key", b"roots", "internal"), pw.X509SVID("spiffe://td/b")),
        (b"crl",),
        {"spiffe://other": b"fb"},
    )
    assert ours.encode() == theirs.SerializeToString(deterministic=True)
    back = wp.X509SVIDResponse.FromString(ours.encode())
    assert back == theirs
    assert pw.X509SVIDRequest().encode() == wp.X509SVIDRequest().SerializeToString() == b""
