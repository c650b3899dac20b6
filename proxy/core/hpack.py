"""HPACK (RFC 7541): the header compression of HTTP/2, bytes in and out, no I/O.

Theory of operation
-------------------
A header block is a sequence of representations that refer to two tables:
the static table (61 fixed fields, Appendix A) and a dynamic table that both
ends build from the fields the encoder chose to index. ``Decoder`` and
``Encoder`` each hold one side's dynamic table, so one connection has one of
each per direction, and every header block of that direction must go through
it in order (even a block whose stream is already gone), or the tables drift.

Fields are ``(name, value)`` tuples of bytes; names are not lowercased or
checked here (that is the HTTP/2 layer's job). A field received as "never
indexed" (RFC 7541 6.2.3) comes out as ``NeverIndexed``, a tuple subclass, and
``Encoder`` sends it the same way, as 7.1.3 asks of an intermediary.

The encoder writes no Huffman code: in Python, Huffman-coding a string costs
more CPU than the bytes it saves, and a field that repeats is sent as a table
index anyway. The decoder reads it (clients use it): a table-driven state
machine that eats four bits per step, with a small cache in front because the
same coded strings (dates, user agents) arrive again and again.

Malformed input raises ``HPACKError``: the connection must then end with
COMPRESSION_ERROR (RFC 9113 4.3), since the tables can no longer be trusted.
This module is compiled as a Cython twin (setup.py COMPILED_TWINS, ``hpack``).
"""

from __future__ import annotations

from collections import deque
from typing import Any

# RFC 7541 4.2 / RFC 9113 6.5.2: SETTINGS_HEADER_TABLE_SIZE starts at 4,096 octets.
DEFAULT_TABLE_SIZE = 4096
# RFC 7541 4.1: every entry costs its name and value plus 32 octets of overhead.
ENTRY_OVERHEAD = 32
# An integer longer than this many continuation octets is an attack, not a
# length: 2**35 is far past any table size or string a peer may send.
_MAX_INT_OCTETS = 5
# Decoded Huffman strings kept for reuse: enough for the dates, user agents and
# hosts a busy connection repeats; cleared whole when full, so memory stays bounded.
_HUFFMAN_CACHE_SIZE = 1024
# Longer coded strings are decoded each time: they rarely repeat, and a cache
# keyed by large strings would hold more memory than it saves CPU.
_HUFFMAN_CACHE_MAX_LEN = 64
# Replayed insertions wait (see Decoder) until they would fill this many
# tables: settling keeps one table's worth whatever the wait, so a longer wait
# settles less often; the wait holds references to shared fields, not copies.
_PENDING_TABLES = 8
# Header lists whose whole block an encoder keeps (see Encoder): a proxy sends
# the same few lists again and again (one client's requests, one server's
# responses); cleared whole when full.
_BLOCK_CACHE_SIZE = 32


class HPACKError(Exception):
    """A header block that cannot be decoded: a COMPRESSION_ERROR (RFC 9113 4.3)."""


class HeaderListTooLarge(HPACKError):
    """The decoded fields exceed SETTINGS_MAX_HEADER_LIST_SIZE."""


class NeverIndexed(tuple):
    """A field that must never enter a dynamic table, here or further on (RFC 7541 7.1.3).

    It is not equal to the plain field of the same name and value, so a header
    list holding it is never mistaken for one that does not (``Encoder``'s cache)."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is NeverIndexed and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((NeverIndexed, tuple(self)))


# RFC 7541 Appendix A: the static table, index 1 to 61 (index 0 does not exist).
STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = (
    (b"", b""),
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
)
_STATIC_LAST = len(STATIC_TABLE) - 1  # 61
# Encoder lookups: a full field to its index, a name to its first index.
# Entries with an empty value are names only: a field with an empty value is
# still sent by name index plus an (empty) literal, which costs one octet more.
_STATIC_FIELDS = {field: i for i, field in reversed(list(enumerate(STATIC_TABLE))) if i and field[1]}
_STATIC_NAMES = {field[0]: i for i, field in reversed(list(enumerate(STATIC_TABLE))) if i}


# ---------------------------------------------------------------- integers and strings


def encode_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 5.1: ``value`` in a ``prefix_bits`` prefix; ``first`` holds the octet's other bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_integer(data: bytes, pos: int, limit: int) -> tuple[int, int]:
    """RFC 7541 5.1: (value, next position) of the integer at ``pos``; ``limit`` = 2**prefix - 1."""
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    end = len(data)
    shift = 0
    while True:
        if pos >= end:
            raise HPACKError("header block ends inside an integer")
        octet = data[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if not octet & 0x80:
            return value, pos
        shift += 7
        if shift >= 7 * _MAX_INT_OCTETS:
            raise HPACKError("integer too long")


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    """RFC 7541 5.2: a string literal at ``pos`` (Huffman-coded or not)."""
    if pos >= len(data):
        raise HPACKError("header block ends before a string")
    coded = data[pos] & 0x80
    length, pos = decode_integer(data, pos, 0x7F)
    end = pos + length
    if end > len(data):
        raise HPACKError("string longer than the header block")
    raw = data[pos:end]
    if coded:
        return huffman_decode(raw), end
    return raw, end


# ---------------------------------------------------------------- Huffman code (RFC 7541 Appendix B)

# The code is canonical: sorted by (length, symbol), each code is the previous
# one plus one, shifted left by the growth in length. So the lengths alone
# define it; symbol 256 is EOS. Rows of 16 symbols.
HUFFMAN_LENGTHS: tuple[int, ...] = (
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
)
EOS = 256


def huffman_codes() -> list[tuple[int, int]]:
    """(code, length in bits) of every symbol 0..256, rebuilt from the lengths."""
    order = sorted(range(len(HUFFMAN_LENGTHS)), key=lambda sym: (HUFFMAN_LENGTHS[sym], sym))
    codes = [(0, 0)] * len(HUFFMAN_LENGTHS)
    code = 0
    length = HUFFMAN_LENGTHS[order[0]]
    for n, sym in enumerate(order):
        if n:
            code = (code + 1) << (HUFFMAN_LENGTHS[sym] - length)
            length = HUFFMAN_LENGTHS[sym]
        codes[sym] = (code, length)
    return codes


def huffman_encode(data: bytes) -> bytes:
    """Huffman-code ``data`` (tests and peers of tests; the encoder sends literals raw)."""
    codes = _CODES
    acc = 0
    bits = 0
    for octet in data:
        code, length = codes[octet]
        acc = (acc << length) | code
        bits += length
    pad = -bits % 8
    acc = (acc << pad) | ((1 << pad) - 1)  # padded with the most significant bits of EOS (all ones)
    return acc.to_bytes((bits + pad) // 8, "big")


# The decoder's state machine. A state is an inner node of the code tree (0 is
# the root); each step reads four bits. Codes are at least five bits long, so a
# step completes at most one symbol. _STEPS[state * 16 + nibble] packs
#   next state << 10 | _EMIT (a symbol ended, in the low 8 bits) | _FAIL (EOS seen).
_EMIT = 0x100
_FAIL = 0x200


def _build_decoder() -> tuple[list[int], list[bool]]:
    # The tree: node -> [child for bit 0, child for bit 1]; a child >= 0 is a
    # node, a child < 0 is the leaf of symbol -child - 1.
    nodes: list[list[int]] = [[0, 0]]
    filled: list[list[bool]] = [[False, False]]
    for sym, (code, length) in enumerate(_CODES):
        node = 0
        for shift in range(length - 1, -1, -1):
            bit = (code >> shift) & 1
            if shift == 0:
                nodes[node][bit] = -sym - 1
                filled[node][bit] = True
            else:
                if not filled[node][bit]:
                    nodes.append([0, 0])
                    filled.append([False, False])
                    nodes[node][bit] = len(nodes) - 1
                    filled[node][bit] = True
                node = nodes[node][bit]
    # A string may end only at the root, or inside the all-ones path of at most
    # seven bits (RFC 7541 5.2: padding is a prefix of EOS, shorter than an octet).
    accept = [False] * len(nodes)
    accept[0] = True
    node = 0
    for _ in range(7):
        node = nodes[node][1]
        accept[node] = True
    steps = [0] * (len(nodes) * 16)
    for state in range(len(nodes)):
        for nibble in range(16):
            node = state
            entry = 0
            for shift in (3, 2, 1, 0):
                child = nodes[node][(nibble >> shift) & 1]
                if child < 0:
                    sym = -child - 1
                    if sym == EOS:
                        entry = _FAIL
                        node = 0
                        break
                    entry = _EMIT | sym
                    node = 0
                else:
                    node = child
            steps[state * 16 + nibble] = (node << 10) | entry
    return steps, accept


_CODES = huffman_codes()
_STEPS, _ACCEPT = _build_decoder()
_huffman_cache: dict[bytes, bytes] = {}


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string; ``HPACKError`` on EOS or bad padding (RFC 7541 5.2)."""
    cacheable = len(data) <= _HUFFMAN_CACHE_MAX_LEN
    if cacheable:
        found = _huffman_cache.get(data)
        if found is not None:
            return found
    steps = _STEPS
    out = bytearray()
    state = 0
    for octet in data:
        entry = steps[(state << 4) | (octet >> 4)]
        if entry & 0x300:
            if entry & _FAIL:
                raise HPACKError("EOS inside a Huffman-coded string")
            out.append(entry & 0xFF)
        state = entry >> 10
        entry = steps[(state << 4) | (octet & 0x0F)]
        if entry & 0x300:
            if entry & _FAIL:
                raise HPACKError("EOS inside a Huffman-coded string")
            out.append(entry & 0xFF)
        state = entry >> 10
    if not _ACCEPT[state]:
        raise HPACKError("Huffman-coded string badly padded")
    result = bytes(out)
    if cacheable:
        if len(_huffman_cache) >= _HUFFMAN_CACHE_SIZE:
            _huffman_cache.clear()
        _huffman_cache[data] = result
    return result


# ---------------------------------------------------------------- decoder


class Decoder:
    """The receiving side of one direction of a connection.

    Entries added by ``replay`` wait in a list until something reads the table
    (the next block decoded, or ``table``): a peer that indexes every field and
    never refers to the table (nginx does) then costs an append per block, not
    the evictions of each insertion. Settling them is exact: after any run of
    insertions the table holds the newest entries that fit together, stopping
    at one too large for the table (RFC 7541 4.4)."""

    __slots__ = ("entries", "used", "pending", "pending_size", "max_table_size", "max_allowed_table_size",
                 "max_header_list_size", "generation", "read_table", "inserted")

    def __init__(self, max_header_list_size: int = 0) -> None:
        self.entries: deque[tuple[bytes, bytes]] = deque()  # newest first: index 62 is entries[0]
        self.used = 0  # octets the entries count for (RFC 7541 4.1)
        self.pending: list[tuple[bytes, bytes]] = []  # replayed insertions, oldest first, not settled yet
        self.pending_size = 0
        self.max_table_size = DEFAULT_TABLE_SIZE  # the size the encoder last chose
        # What our SETTINGS_HEADER_TABLE_SIZE allows the encoder to choose.
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self.max_header_list_size = max_header_list_size  # 0: no limit
        # What the last block did, for callers that cache blocks: ``generation``
        # changes whenever the table does; ``read_table`` says the block used the
        # dynamic table (or resized it), and ``inserted`` lists the fields it
        # added. A block that read no table always decodes to the same fields and
        # adds the same entries (``replay`` adds them again); one that did decodes
        # the same only while the generation is unchanged.
        self.generation = 0
        self.read_table = False
        self.inserted: list[tuple[bytes, bytes]] = []

    @property
    def table(self) -> deque[tuple[bytes, bytes]]:
        """The dynamic table, newest entry first."""
        if self.pending:
            self._settle()
        return self.entries

    @property
    def table_size(self) -> int:
        if self.pending:
            self._settle()
        return self.used

    def replay(self, fields: list[tuple[bytes, bytes]], size: int) -> None:
        """Add ``fields`` (``size`` octets of entries) as the literals with
        incremental indexing of a block that read no table would: a repeated
        block, not decoded again."""
        self.generation += 1
        self.pending += fields
        self.pending_size += size
        if self.pending_size > _PENDING_TABLES * self.max_table_size:
            self._settle()  # bounds what waits

    def _settle(self) -> None:
        pending = self.pending
        limit = self.max_table_size
        kept: list[tuple[bytes, bytes]] = []  # newest first
        size = 0
        cut = False
        for field in reversed(pending):
            entry = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if size + entry > limit:
                cut = True  # it and everything older are gone
                break
            kept.append(field)
            size += entry
        entries = self.entries
        if cut:
            entries.clear()
            self.used = 0
        else:
            while entries and self.used + size > limit:
                old = entries.pop()
                self.used -= len(old[0]) + len(old[1]) + ENTRY_OVERHEAD
        kept.reverse()
        entries.extendleft(kept)  # oldest first in, so the newest ends up at the front
        self.used += size
        self.pending = []
        self.pending_size = 0

    def _add(self, field: tuple[bytes, bytes]) -> None:
        self.generation += 1
        size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        entries = self.entries
        limit = self.max_table_size
        # RFC 7541 4.4: an entry larger than the table empties it and is not added.
        while entries and self.used + size > limit:
            old = entries.pop()
            self.used -= len(old[0]) + len(old[1]) + ENTRY_OVERHEAD
        if size <= limit:
            entries.appendleft(field)
            self.used += size

    def _resize(self, size: int) -> None:
        if size > self.max_allowed_table_size:
            raise HPACKError(f"table size update to {size} is over the {self.max_allowed_table_size} allowed")
        self.generation += 1
        self.max_table_size = size
        entries = self.entries
        while entries and self.used > size:
            old = entries.pop()
            self.used -= len(old[0]) + len(old[1]) + ENTRY_OVERHEAD

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if index <= _STATIC_LAST:
            if index == 0:
                raise HPACKError("index 0")
            return STATIC_TABLE[index]
        self.read_table = True
        index -= _STATIC_LAST + 1
        if index >= len(self.entries):
            raise HPACKError(f"index {index + _STATIC_LAST + 1} is past the dynamic table")
        return self.entries[index]

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The fields of one complete header block, in order."""
        headers: list[tuple[bytes, bytes]] = []
        list_size = 0
        pos = 0
        end = len(data)
        static = STATIC_TABLE
        if self.pending:
            self._settle()
        table = self.entries
        self.read_table = False
        inserted = self.inserted = []
        while pos < end:
            octet = data[pos]
            if octet & 0x80:  # 6.1 indexed field
                index = octet & 0x7F
                if index == 0x7F:
                    index, pos = decode_integer(data, pos, 0x7F)
                else:
                    pos += 1
                if 0 < index <= _STATIC_LAST:
                    field = static[index]
                elif _STATIC_LAST < index <= _STATIC_LAST + len(table):
                    field = table[index - _STATIC_LAST - 1]
                    self.read_table = True
                else:
                    field = self._field(index)  # raises the right error
            elif octet & 0x40:  # 6.2.1 literal, added to the table
                index, pos = decode_integer(data, pos, 0x3F)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = _string(data, pos)
                value, pos = _string(data, pos)
                field = (name, value)
                self._add(field)
                inserted.append(field)
            elif octet & 0x20:  # 6.3 table size update: only before the first field (4.2)
                if headers:
                    raise HPACKError("table size update after a field")
                size, pos = decode_integer(data, pos, 0x1F)
                self._resize(size)
                self.read_table = True  # not a block to replay
                continue
            else:  # 6.2.2 literal not indexed, 6.2.3 never indexed
                index, pos = decode_integer(data, pos, 0x0F)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = _string(data, pos)
                value, pos = _string(data, pos)
                field = NeverIndexed((name, value)) if octet & 0x10 else (name, value)
            headers.append(field)
            list_size += len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        limit = self.max_header_list_size
        if limit and list_size > limit:
            raise HeaderListTooLarge(f"header list of {list_size} octets is over the {limit} allowed")
        return headers


# ---------------------------------------------------------------- encoder


class Encoder:
    """The sending side of one direction of a connection.

    Every field that is not in a table yet is added to the dynamic table
    (incremental indexing), except never-indexed ones and fields too large to be
    worth an entry; a field seen before goes out as one index.

    A block made only of indexes (it changed no table) stays right for the same
    header list until the table changes, so it is kept and sent again: the
    common case of a proxy relaying one client's or one server's repeated
    header lists costs one dictionary lookup.
    """

    __slots__ = ("entries", "fields", "names", "inserted", "size", "max_size", "pending_sizes", "blocks",
                 "generation")

    def __init__(self) -> None:
        # Entries newest first, each (field, insertion number). An entry's index is
        # 62 + (inserted - 1 - its number), so indexes need no renumbering.
        self.entries: deque[tuple[tuple[bytes, bytes], int]] = deque()
        self.fields: dict[tuple[bytes, bytes], int] = {}  # field -> insertion number
        self.names: dict[bytes, int] = {}  # name -> insertion number of its newest entry
        self.inserted = 0
        self.size = 0
        self.max_size = DEFAULT_TABLE_SIZE
        self.pending_sizes: list[int] = []  # table size updates owed at the start of the next block
        self.blocks: dict[tuple[Any, ...], tuple[int, bytes]] = {}  # header list -> (generation, its block)
        self.generation = 0  # changes whenever the table does

    @property
    def header_table_size(self) -> int:
        return self.max_size

    @header_table_size.setter
    def header_table_size(self, size: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: shrink now, and say so in the next block."""
        if size == self.max_size and not self.pending_sizes:
            return
        self.max_size = size
        self.generation += 1
        self._evict(size)
        pending = self.pending_sizes
        # RFC 7541 4.2: the smallest size since the last block, then the final one.
        if not pending:
            pending.append(size)
        elif size < min(pending):
            pending[:] = [size]
        else:
            pending[1:] = [size]

    def _evict(self, limit: int) -> None:
        entries = self.entries
        while entries and self.size > limit:
            field, number = entries.pop()
            self.size -= len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            if self.fields.get(field) == number:
                del self.fields[field]
            if self.names.get(field[0]) == number:
                del self.names[field[0]]

    def encode(self, headers: Any) -> bytes:
        """One header block for ``headers``, an iterable of (name, value) pairs of bytes."""
        key = headers if type(headers) is tuple else tuple(headers)
        generation = self.generation
        cached = self.blocks.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1]
        out = bytearray()
        if self.pending_sizes:
            for size in self.pending_sizes:
                out += encode_integer(size, 5, 0x20)
            self.pending_sizes = []
            generation = -1  # this block is not one to repeat
        fields = self.fields
        names = self.names
        for header in key:
            name = header[0]
            value = header[1]
            never = type(header) is NeverIndexed
            field = header if type(header) is tuple else (name, value)
            if not never:
                index = _STATIC_FIELDS.get(field)
                if index is not None:
                    out += encode_integer(index, 7, 0x80)
                    continue
                number = fields.get(field)
                if number is not None:
                    out += encode_integer(_STATIC_LAST + self.inserted - number, 7, 0x80)
                    continue
            name_index = _STATIC_NAMES.get(name)
            if name_index is None:
                number = names.get(name)
                if number is not None:
                    name_index = _STATIC_LAST + self.inserted - number
            size = len(name) + len(value) + ENTRY_OVERHEAD
            if never:
                prefix, bits = 0x10, 4
            elif size * 4 > self.max_size * 3:
                # Would push most of the table out for one field: sent as a plain literal.
                prefix, bits = 0x00, 4
            else:
                prefix, bits = 0x40, 6
            if name_index is not None:
                out += encode_integer(name_index, bits, prefix)
            else:
                out.append(prefix)
                out += encode_integer(len(name), 7)
                out += name
            out += encode_integer(len(value), 7)
            out += value
            if prefix == 0x40:
                self.generation += 1
                self._evict(self.max_size - size)
                number = self.inserted
                self.inserted += 1
                self.entries.appendleft((field, number))
                self.size += size
                fields[field] = number
                names[name] = number
        block = bytes(out)
        if generation == self.generation:
            blocks = self.blocks
            if len(blocks) >= _BLOCK_CACHE_SIZE:
                blocks.clear()
            blocks[key] = (generation, block)
        return block
