"""The TLS 1.3 record layer in memory, both twins: the pure ``proxy.tls.records`` and the
compiled ``proxy._native.records`` (libcrypto EVP), a Sealer paired with an Opener, and each
twin's records opened by the other.

No sockets: bytes in, plaintext and errors out. The key schedule is checked
against RFC 8448's trace; the round trip with real OpenSSL peers is in
tests/integration/test_tls_record_layer.py.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.tls import records
from proxy.tls.records import RecordError, hkdf_expand_label

SUITE = "TLS_AES_128_GCM_SHA256"
SECRET = bytes(range(32))
TWINS: dict[str, Any] = {"python": records}


def _compiled() -> Any:
    try:
        return importlib.import_module("proxy._native.records")
    except ImportError:
        return None


@pytest.fixture(params=["cython", "python"], autouse=True)
def twin(request) -> Any:
    """Every test runs on both twins; ``pair()`` builds from the one under test."""
    if request.param == "cython":
        mod = _compiled()
        if mod is None:
            pytest.fail("proxy._native.records is not built; run `python setup.py build_ext --inplace`")
    else:
        mod = records
    TWINS["current"] = mod
    return mod


def pair(suite: str = SUITE, secret: bytes = SECRET) -> tuple[Any, Any]:
    mod = TWINS["current"]
    return mod.Sealer(suite, secret), mod.Opener(suite, secret)


def open_all(opener: Any, wire: bytes, step: int | None = None) -> bytes:
    """Feed ``wire`` (in pieces of ``step`` bytes) and read every plaintext byte out."""
    out = memoryview(bytearray(1 << 20))
    got = bytearray()
    pieces = [wire] if step is None else [wire[i:i + step] for i in range(0, len(wire), step)]
    for piece in pieces:
        opener.feed(piece)
        while True:
            n = opener.read_into(out)
            if not n:
                break
            got += out[:n]
    return bytes(got)


def test_key_schedule_matches_rfc8448():
    # RFC 8448 section 3, "derive write traffic keys for handshake data" (server side).
    secret = bytes.fromhex("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
    assert hkdf_expand_label(secret, b"key", b"", 16, "sha256").hex() == "3fce516009c21727d0f2e4e86ee403bc"
    assert hkdf_expand_label(secret, b"iv", b"", 12, "sha256").hex() == "5d313eb2671276ee13000b30"


@pytest.mark.parametrize("suite", sorted(records.SUITES))
def test_every_suite_round_trips(suite):
    secret = os.urandom(48 if suite.endswith("SHA384") else 32)
    sealer, opener = pair(suite, secret)
    data = os.urandom(100_000)
    assert open_all(opener, bytes(sealer.seal(data))) == data


def test_records_are_full_size_and_headers_say_application_data():
    sealer, _ = pair()
    wire = bytes(sealer.seal(b"x" * (3 * records.MAX_PLAINTEXT + 10)))
    lengths = []
    pos = 0
    while pos < len(wire):
        assert wire[pos:pos + 3] == b"\x17\x03\x03"
        length = int.from_bytes(wire[pos + 3:pos + 5], "big")
        lengths.append(length)
        pos += 5 + length
    assert lengths == [records.MAX_PLAINTEXT + 17] * 3 + [10 + 17]


def test_the_first_record_is_what_an_independent_aead_makes():
    """Nonce = IV xor sequence number, AAD = the record header (RFC 8446 5.2-5.3)."""
    sealer, _ = pair()
    key = hkdf_expand_label(SECRET, b"key", b"", 16, "sha256")
    iv = hkdf_expand_label(SECRET, b"iv", b"", 12, "sha256")
    wire = bytes(sealer.seal(b"one")) + bytes(sealer.seal(b"two"))
    first, second = wire[:5 + 3 + 17], wire[5 + 3 + 17:]
    assert AESGCM(key).decrypt(iv, first[5:], first[:5]) == b"one\x17"
    nonce1 = (int.from_bytes(iv, "big") ^ 1).to_bytes(12, "big")
    assert AESGCM(key).decrypt(nonce1, second[5:], second[:5]) == b"two\x17"


def test_sequence_numbers_stay_in_step_over_many_records_and_odd_pieces():
    sealer, opener = pair()
    chunks = [os.urandom(n) for n in (1, 7, 16384, 16385, 40000, 3, 99999)] * 30
    wire = b"".join(bytes(sealer.seal(c)) for c in chunks)
    assert open_all(opener, wire, step=4093) == b"".join(chunks)
    assert sealer.keys.seq == opener.keys.seq == 16 * 30  # 1+1+1+2+3+1+7 records per round


def test_byte_by_byte_input():
    sealer, opener = pair()
    data = os.urandom(3000)
    assert open_all(opener, bytes(sealer.seal(data)), step=1) == data


def test_read_into_stops_at_a_full_buffer_and_goes_on_later():
    sealer, opener = pair()
    data = os.urandom(5 * records.MAX_PLAINTEXT)
    opener.feed(sealer.seal(data))
    out = memoryview(bytearray(2 * records.MAX_PLAINTEXT + 100))
    got = bytearray()
    while n := opener.read_into(out):
        assert n <= len(out)
        got += out[:n]
    assert bytes(got) == data


def test_a_corrupted_record_is_refused_and_its_plaintext_never_returned():
    sealer, opener = pair()
    good = bytes(sealer.seal(b"good"))
    bad = bytearray(sealer.seal(b"secret-ish"))
    bad[8] ^= 1
    opener.feed(good + bytes(bad))
    out = memoryview(bytearray(1 << 16))
    with pytest.raises(RecordError) as err:
        opener.read_into(out)
    assert err.value.alert == records.BAD_RECORD_MAC
    # Nothing was returned, and the record before it can be had: it authenticated.
    assert opener.start == len(good)


def test_a_replayed_record_does_not_authenticate():
    sealer, opener = pair()
    record = bytes(sealer.seal(b"once"))
    assert open_all(opener, record) == b"once"
    with pytest.raises(RecordError):
        open_all(opener, record)


def test_close_notify_ends_the_stream_and_later_bytes_are_ignored():
    sealer, opener = pair()
    wire = bytes(sealer.seal(b"last words")) + sealer.close_notify()
    assert sealer.closed
    assert open_all(opener, wire) == b"last words"
    assert opener.closed
    opener.feed(b"\x17\x03\x03\x00\x20" + bytes(32))
    assert opener.read_into(memoryview(bytearray(1 << 16))) == 0


def test_a_fatal_alert_from_the_peer_is_an_error():
    sealer, opener = pair()
    assert bytes(sealer.seal(b"")) == b""  # no data, no record
    wire = sealer.seal_raw(records.ALERT, bytes((2, 40)))
    with pytest.raises(RecordError) as err:
        open_all(opener, wire)
    assert err.value.alert == 40


def test_new_session_tickets_are_ignored():
    sealer, opener = pair()
    ticket = bytes((records.NEW_SESSION_TICKET,)) + (200).to_bytes(3, "big") + os.urandom(200)
    wire = sealer.seal_raw(records.HANDSHAKE, ticket) + bytes(sealer.seal(b"after the ticket"))
    assert open_all(opener, wire) == b"after the ticket"


def test_a_ticket_split_over_two_records_is_ignored():
    sealer, opener = pair()
    ticket = bytes((records.NEW_SESSION_TICKET,)) + (300).to_bytes(3, "big") + os.urandom(300)
    wire = sealer.seal_raw(records.HANDSHAKE, ticket[:100]) + sealer.seal_raw(records.HANDSHAKE, ticket[100:])
    wire += bytes(sealer.seal(b"data"))
    assert open_all(opener, wire) == b"data"


def test_key_update_from_the_peer_rekeys_and_a_request_is_noted():
    sealer, opener = pair()
    # The peer asks for an update (update_requested = 1), then moves to its next keys.
    wire = sealer.seal_raw(records.HANDSHAKE, bytes((records.KEY_UPDATE, 0, 0, 1, 1)))
    sealer.keys.next_generation()
    wire += bytes(sealer.seal(b"under new keys"))
    assert open_all(opener, wire) == b"under new keys"
    assert opener.update_requested
    assert opener.keys.seq == 1


def test_our_key_update_answer_is_understood_by_the_peer():
    ours, theirs = pair()
    answer = ours.key_update()
    wire = answer + bytes(ours.seal(b"next generation"))
    assert open_all(theirs, wire) == b"next generation"
    assert not theirs.update_requested  # update_not_requested: no ping-pong


def test_sending_side_rekeys_before_the_record_limit():
    sealer, opener = pair()
    # Jump both to just below the limit (as if 2^23 records had passed).
    sealer.keys.seq = opener.keys.seq = records.REKEY_AFTER - 2
    data = os.urandom(4 * records.MAX_PLAINTEXT)
    assert open_all(opener, bytes(sealer.seal(data))) == data
    assert sealer.keys.seq < 10 and opener.keys.seq == sealer.keys.seq  # both moved to new keys


def test_an_unprotected_record_after_the_handshake_is_refused():
    _, opener = pair()
    with pytest.raises(RecordError) as err:
        open_all(opener, b"\x16\x03\x03\x00\x04abcd")
    assert err.value.alert == records.UNEXPECTED_MESSAGE


def test_an_oversized_record_is_refused_before_it_is_read():
    _, opener = pair()
    with pytest.raises(RecordError) as err:
        open_all(opener, b"\x17\x03\x03" + (records.MAX_CIPHERTEXT + 1).to_bytes(2, "big"))
    assert err.value.alert == records.RECORD_OVERFLOW


def test_an_unknown_inner_content_type_is_refused():
    sealer, opener = pair()
    wire = sealer.seal_raw(99, b"x")
    with pytest.raises(RecordError):
        open_all(opener, wire)


def test_padding_is_stripped():
    sealer, opener = pair()
    # Inner plaintext "pad" + type 23 + 50 zero bytes (RFC 8446 5.4): seal it as a raw chunk.
    wire = sealer.seal_raw(0, b"pad\x17" + bytes(49))  # the final 0 byte is our "type"
    assert open_all(opener, wire) == b"pad"


def test_sealing_never_writes_into_the_callers_buffer():
    sealer, _ = pair()
    data = bytearray(os.urandom(40000))
    before = bytes(data)
    sealer.seal(memoryview(data))
    assert data == before


def test_a_secret_of_the_wrong_length_or_an_unknown_suite_is_refused(twin):
    with pytest.raises(ValueError):
        twin.Sealer("TLS_AES_256_GCM_SHA384", bytes(32))
    with pytest.raises(ValueError):
        twin.Opener("TLS_AES_128_CCM_SHA256", bytes(32))


@pytest.mark.parametrize("suite", sorted(records.SUITES))
def test_the_twins_read_each_others_records(suite):
    native = _compiled()
    assert native is not None, "proxy._native.records is not built"
    secret = os.urandom(48 if suite.endswith("SHA384") else 32)
    data = os.urandom(70_000)
    for make_sealer, make_opener in ((native.Sealer, records.Opener), (records.Sealer, native.Opener)):
        sealer, opener = make_sealer(suite, secret), make_opener(suite, secret)
        wire = bytes(sealer.seal(data)) + sealer.key_update() + bytes(sealer.seal(data[:999])) + sealer.close_notify()
        assert open_all(opener, wire) == data + data[:999]
        assert opener.closed


def test_the_input_buffer_starts_small_and_grows_only_for_bulk_reads():
    sealer, opener = pair()
    first = len(opener.space())
    assert first == records.MIN_INPUT
    # Small messages: reads never fill the buffer, it stays as it is.
    for _ in range(50):
        wire = bytes(sealer.seal(b"small message"))
        opener.space()[:len(wire)] = wire
        opener.received(len(wire))
        assert opener.read_into(memoryview(bytearray(1 << 16))) == len(b"small message")
    assert len(opener.space()) == first
    # A read that fills what was offered: the next offer is larger, up to INPUT_SIZE.
    data = os.urandom(3 << 20)
    wire = bytes(sealer.seal(data))
    sizes, got, pos = [], bytearray(), 0
    out = memoryview(bytearray(records.INPUT_SIZE))
    while pos < len(wire):
        space = opener.space()
        sizes.append(len(space))
        n = min(len(space), len(wire) - pos)
        space[:n] = wire[pos:pos + n]
        opener.received(n)
        pos += n
        while k := opener.read_into(out):
            got += out[:k]
    assert bytes(got) == data
    assert sizes[1] > first  # the first full read made it grow
    assert 4 * first < max(sizes) <= records.INPUT_SIZE
