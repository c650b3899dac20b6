"""HPACK (proxy.core.hpack) over both twins, the pure module and proxy._native.hpack.

The RFC 7541 Appendix C examples are checked byte for byte; the python-hyper
``hpack`` package (installed with h2) serves as an independent oracle for
round trips in both directions.
"""

from __future__ import annotations

import importlib
import random

import pytest

from proxy.core import hpack as pure_hpack


@pytest.fixture(params=["cython", "python"])
def hp(request):
    """The hpack twin under test."""
    if request.param == "python":
        return pure_hpack
    try:
        return importlib.import_module("proxy._native.hpack")
    except ImportError:
        pytest.fail("proxy._native.hpack is not built; run `python setup.py build_ext --inplace`")


def block(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# ---------------------------------------------------------------- RFC 7541 Appendix C


def test_c2_single_representations(hp):
    d = hp.Decoder()
    assert d.decode(block("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")) == [
        (b"custom-key", b"custom-header")]
    assert d.table_size == 55 and list(d.table) == [(b"custom-key", b"custom-header")]
    d = hp.Decoder()
    assert d.decode(block("040c 2f73 616d 706c 652f 7061 7468")) == [(b":path", b"/sample/path")]
    assert d.table_size == 0
    d = hp.Decoder()
    fields = d.decode(block("1008 7061 7373 776f 7264 0673 6563 7265 74"))
    assert [tuple(f) for f in fields] == [(b"password", b"secret")] and isinstance(fields[0], hp.NeverIndexed)
    assert d.table_size == 0
    assert hp.Decoder().decode(block("82")) == [(b":method", b"GET")]


REQUESTS = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com"),
     (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"), (b":authority", b"www.example.com"),
     (b"custom-key", b"custom-value")],
]


def test_c3_requests_without_huffman(hp):
    d = hp.Decoder()
    blocks = [
        "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        "8286 84be 5808 6e6f 2d63 6163 6865",
        "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
    ]
    for text, fields, size in zip(blocks, REQUESTS, (57, 110, 164), strict=True):
        assert d.decode(block(text)) == fields
        assert d.table_size == size
    # The encoder makes the same blocks: same indexing choices as the RFC's.
    e = hp.Encoder()
    for text, fields in zip(blocks, REQUESTS, strict=True):
        assert e.encode(fields) == block(text)
    assert e.size == 164


def test_c4_requests_with_huffman(hp):
    d = hp.Decoder()
    blocks = [
        "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
        "8286 84be 5886 a8eb 1064 9cbf",
        "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
    ]
    for text, fields, size in zip(blocks, REQUESTS, (57, 110, 164), strict=True):
        assert d.decode(block(text)) == fields
        assert d.table_size == size


def test_c5_responses_with_eviction(hp):
    d = hp.Decoder()
    d.max_allowed_table_size = d.max_table_size = 256  # SETTINGS_HEADER_TABLE_SIZE of the example
    date1, date2 = b"Mon, 21 Oct 2013 20:13:21 GMT", b"Mon, 21 Oct 2013 20:13:22 GMT"
    location = (b"location", b"https://www.example.com")
    first = d.decode(block(
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120"
        "474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"))
    assert first == [(b":status", b"302"), (b"cache-control", b"private"), (b"date", date1), location]
    assert d.table_size == 222
    second = d.decode(block("4803 3330 37c1 c0bf"))
    assert second == [(b":status", b"307"), (b"cache-control", b"private"), (b"date", date1), location]
    assert d.table_size == 222 and d.table[0] == (b":status", b"307") and (b":status", b"302") not in d.table
    third = d.decode(block(
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738"
        "666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33"
        "3630 303b 2076 6572 7369 6f6e 3d31"))
    assert third == [(b":status", b"200"), (b"cache-control", b"private"), (b"date", date2), location,
                     (b"content-encoding", b"gzip"),
                     (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")]
    assert d.table_size == 215 and len(d.table) == 3


# ---------------------------------------------------------------- Huffman


def test_huffman_code_is_the_rfcs():
    constants = pytest.importorskip("hpack.huffman_constants")
    codes = pure_hpack.huffman_codes()
    assert [code for code, _ in codes] == list(constants.REQUEST_CODES)
    assert [length for _, length in codes] == list(constants.REQUEST_CODES_LENGTH)


def test_huffman_round_trip_every_octet(hp):
    every = bytes(range(256))
    assert hp.huffman_decode(hp.huffman_encode(every)) == every
    rnd = random.Random(7)
    for _ in range(300):
        data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 90)))
        assert hp.huffman_decode(hp.huffman_encode(data)) == data
    assert hp.huffman_encode(b"www.example.com") == block("f1e3 c2e5 f23a 6ba0 ab90 f4ff")


@pytest.mark.parametrize("coded, why", [
    (b"\xff\xff\xff\xff", "EOS"),  # 30 ones: the EOS symbol itself
    (b"\x18", "padded"),  # 'a' (00011) then 000: padding must be ones
    (b"\x1f\xff", "padded"),  # 'a' then 11 ones: padding longer than 7 bits
])
def test_huffman_malformed(hp, coded, why):
    with pytest.raises(hp.HPACKError, match=why):
        hp.huffman_decode(coded)


# ---------------------------------------------------------------- round trips


def random_headers(rnd: random.Random) -> list[tuple[bytes, bytes]]:
    names = [b":path", b"user-agent", b"x-a", b"x-b", b"cookie", b"content-type", b"x-" + b"long" * 20]
    fields = []
    for _ in range(rnd.randrange(1, 12)):
        name = rnd.choice(names)
        value = bytes(rnd.randrange(256) for _ in range(rnd.choice((0, 1, 5, 30, 200, 1500))))
        fields.append((name, value))
    return fields


def test_round_trip_through_small_and_changing_tables(hp):
    rnd = random.Random(3)
    e, d = hp.Encoder(), hp.Decoder()
    for i in range(400):
        if i % 50 == 25:
            size = rnd.choice((0, 100, 256, 4096))
            d.max_allowed_table_size = 4096
            e.header_table_size = size  # the block below carries the size update
        fields = random_headers(rnd)
        assert d.decode(e.encode(fields)) == fields
        assert d.table_size == e.size <= e.max_size


def test_round_trip_with_the_hpack_package(hp):
    oracle = pytest.importorskip("hpack")
    rnd = random.Random(5)
    their_e, our_d = oracle.Encoder(), hp.Decoder()
    our_e, their_d = hp.Encoder(), oracle.Decoder()
    for _ in range(300):
        fields = random_headers(rnd)
        assert our_d.decode(their_e.encode(fields, huffman=rnd.random() < 0.5)) == fields
        assert [tuple(f) for f in their_d.decode(our_e.encode(fields), raw=True)] == fields


def test_table_size_updates_smallest_then_final(hp):
    e = hp.Encoder()
    e.encode([(b"x-a", b"1")])
    e.header_table_size = 0
    e.header_table_size = 1000
    first = e.encode([(b"x-b", b"2")])
    assert first.startswith(hp.encode_integer(0, 5, 0x20) + hp.encode_integer(1000, 5, 0x20))
    d = hp.Decoder()
    d.decode(block("40 03 782d61 01 31"))  # the first block, as the decoder saw it
    assert d.decode(first) == [(b"x-b", b"2")]
    assert d.max_table_size == 1000 and list(d.table) == [(b"x-b", b"2")]
    assert e.encode([(b"x-b", b"2")]) == bytes((0x80 | 62,))  # no update owed any more


def test_never_indexed_is_forwarded_never_indexed(hp):
    e, d = hp.Encoder(), hp.Decoder()
    secret = hp.NeverIndexed((b"authorization", b"token"))
    fields = d.decode(e.encode([secret, (b"x-a", b"1")]))
    assert [tuple(f) for f in fields] == [(b"authorization", b"token"), (b"x-a", b"1")]
    assert fields[0] != (b"authorization", b"token") and fields[0] == secret  # never mistaken for the plain field
    assert isinstance(fields[0], hp.NeverIndexed) and not isinstance(fields[1], hp.NeverIndexed)
    assert (b"authorization", b"token") not in d.table


# ---------------------------------------------------------------- malformed blocks


@pytest.mark.parametrize("text, why", [
    ("80", "index 0"),
    ("be", "past the dynamic table"),  # index 62, empty table
    ("ff", "inside an integer"),  # an integer that never ends
    ("ff ff ff ff ff ff 0f", "too long"),
    ("40 05 6162", "longer than the header block"),
    ("41", "before a string"),
    ("3f e2 1f", "over the"),  # a table size update to 4097, over the 4096 allowed
    ("82 20", "after a field"),
    ("41 81 ff", "EOS|padded"),
])
def test_malformed_blocks(hp, text, why):
    with pytest.raises(hp.HPACKError, match=why):
        hp.Decoder().decode(block(text))


def test_header_list_over_the_limit(hp):
    d = hp.Decoder(max_header_list_size=100)
    with pytest.raises(hp.HeaderListTooLarge):
        d.decode(hp.Encoder().encode([(b"x-a", b"v" * 80)]))
    assert d.decode(hp.Encoder().encode([(b"x-a", b"v" * 10)])) == [(b"x-a", b"v" * 10)]


def test_repeated_lists_stay_right_as_the_table_changes(hp):
    # The encoder sends a repeated list's block again only while its table is unchanged.
    e, d = hp.Encoder(), hp.Decoder()
    same = [(b":status", b"200"), (b"server", b"x"), (b"x-a", b"1")]
    first = e.encode(same)
    assert d.decode(first) == same
    again = e.encode(same)
    assert again != first and d.decode(again) == same  # now all indexes
    assert e.encode(list(same)) is again  # unchanged table: the same block
    d.decode(e.encode([(b"x-b", b"2")]))  # two inserts shift the indexes
    d.decode(e.encode([(b"x-c", b"3")]))
    assert d.decode(e.encode(same)) == same
    e.header_table_size = 60  # evicts all but room for one entry; an update is owed
    d.max_allowed_table_size = 4096
    block = e.encode(same)
    assert block[0] & 0xE0 == 0x20 and d.decode(block) == same
    assert d.decode(e.encode(same)) == same
    secret = [hp.NeverIndexed((b"x-a", b"1"))]
    assert e.encode(secret)[0] & 0xF0 == 0x10  # never indexed, though the plain field is cached


def test_decoder_generation_moves_with_the_table(hp):
    d = hp.Decoder()
    d.decode(block("82"))
    assert d.generation == 0
    d.decode(block("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572"))
    assert d.generation == 1
    d.decode(block("20"))  # size update to 0
    assert d.generation == 2 and d.table_size == 0


def test_replayed_insertions_settle_as_decoding_them_would(hp):
    # ``replay`` defers its insertions; once settled, the table must be what
    # decoding literal-with-indexing blocks for the same fields would give,
    # including fields too large for the table and table size changes.
    rnd = random.Random(11)
    lazy, reference = hp.Decoder(), hp.Decoder()
    for step in range(600):
        if step % 97 == 50:
            size = rnd.choice((0, 60, 300, 4096))
            update = hp.encode_integer(size, 5, 0x20)
            lazy.decode(update)
            reference.decode(update)
        fields = [(b"x-%d" % rnd.randrange(5), b"v" * rnd.choice((0, 3, 40, 200, 300, 5000))) for _ in range(rnd.randrange(1, 5))]
        block = b"".join(bytes((0x40,)) + hp.encode_integer(len(n), 7) + n + hp.encode_integer(len(v), 7) + v
                         for n, v in fields)
        assert reference.decode(block) == fields
        lazy.replay(fields, sum(len(n) + len(v) + 32 for n, v in fields))
        if step % 7 == 0:
            assert list(lazy.table) == list(reference.table) and lazy.table_size == reference.table_size
        if step % 11 == 0 and reference.table:  # a block that reads the newest entry
            assert lazy.decode(bytes((0x80 | 62,))) == reference.decode(bytes((0x80 | 62,)))
    assert list(lazy.table) == list(reference.table)


def test_replayed_insertions_at_the_exact_table_size(hp):
    d = hp.Decoder()
    d.decode(hp.encode_integer(100, 5, 0x20))  # the table holds 100 octets
    fifty, fifty_one = (b"a", b"x" * 17), (b"b", b"x" * 18)  # entries of 50 and 51 octets
    d.replay([fifty, fifty], 100)
    assert list(d.table) == [fifty, fifty] and d.table_size == 100
    d.replay([fifty_one], 51)
    assert list(d.table) == [fifty_one] and d.table_size == 51
    d.replay([(b"c", b"x" * 68)], 101)  # larger than the table: empties it
    assert list(d.table) == [] and d.table_size == 0
