"""TLS 1.3 record protection after the handshake (RFC 8446 sections 5.1-5.5, 7.1-7.3), sans-IO.

Theory of operation: OpenSSL runs the handshake; this module only protects
application records afterwards, so a relay pays one AEAD call per 16 KiB
record and no Python object per record. One ``Sealer`` per sending direction
turns plaintext into records in one output buffer; one ``Opener`` per
receiving direction takes ciphertext into its own input buffer (a transport
can read the socket straight into ``Opener.space()``) and writes plaintext
into a buffer the caller gives. Both keep the exact record sequence number the
nonce is made from (RFC 8446 5.3); a number is used once, and the keys change
(KeyUpdate) long before a sequence could wrap or the AEAD's record limit
(RFC 8446 5.5) is reached.

Post-handshake messages from the peer: NewSessionTicket is ignored (we never
resume), KeyUpdate re-keys the receiving side and, when the peer asks for it,
the sending side too (``Opener.update_requested``, answered by
``Sealer.key_update``). A close_notify alert is the end of the stream
(``Opener.closed``); any other alert, an unknown content type, a record too
large, or a record that does not authenticate raises ``RecordError`` with the
alert the connection should be closed with. Plaintext that did not
authenticate is never handed out: ``read_into`` returns only what came from
records that did.

``native/records.pyx`` is the compiled twin of Sealer and Opener (libcrypto's
EVP, one cipher context per direction); ``proxy.tls.transport`` picks one. The
rare paths (key schedule, post-handshake messages, alerts) are the functions
here, shared by both.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

# Content types (RFC 8446 5.1, B.1).
ALERT, HANDSHAKE, APPLICATION_DATA = 21, 22, 23
# Handshake message types seen after the handshake (RFC 8446 4.6, B.3).
NEW_SESSION_TICKET, KEY_UPDATE = 4, 24
# Alert descriptions (RFC 8446 6).
CLOSE_NOTIFY, UNEXPECTED_MESSAGE, BAD_RECORD_MAC, RECORD_OVERFLOW, DECODE_ERROR = 0, 10, 20, 22, 50

MAX_PLAINTEXT = 1 << 14  # 2^14: the largest inner plaintext of a record (RFC 8446 5.1)
TAG = 16  # every TLS 1.3 AEAD has a 16-byte tag
HEADER = 5  # content type, legacy version, length
SEAL_OVERHEAD = HEADER + 1 + TAG  # header, inner content type, tag
# The largest record a peer may send: 2^14 + 256 bytes of ciphertext (RFC 8446 5.2).
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256
# Records per key before we re-key: AES-GCM is good for 2^24.5 full records per key
# (RFC 8446 5.5); 2^23 stays far below that, and is 128 GiB of traffic per key.
REKEY_AFTER = 1 << 23
# What a peer may send before we refuse to go on: a KeyUpdate or a ticket is small.
MAX_HANDSHAKE_MESSAGE = 1 << 16
INPUT_SIZE = 256 * 1024 + MAX_CIPHERTEXT + HEADER  # one socket read plus a partial record
# Where an input buffer starts: room for two whole records. A connection that only ever
# carries small messages keeps it; one whose reads fill it grows it up to INPUT_SIZE.
MIN_INPUT = 2 * (MAX_CIPHERTEXT + HEADER)

_APPDATA_HEADER_PREFIX = bytes((APPLICATION_DATA, 3, 3))  # outer type and legacy_record_version 0x0303

# suite name (as ssl.SSLObject.cipher() gives it) -> (AEAD class, key length, hash name)
SUITES: dict[str, tuple[type, int, str]] = {
    "TLS_AES_128_GCM_SHA256": (AESGCM, 16, "sha256"),
    "TLS_AES_256_GCM_SHA384": (AESGCM, 32, "sha384"),
    "TLS_CHACHA20_POLY1305_SHA256": (ChaCha20Poly1305, 32, "sha256"),
}


class RecordError(Exception):
    """The connection must end: ``alert`` is the TLS alert description that says why."""

    def __init__(self, alert: int, message: str) -> None:
        super().__init__(message)
        self.alert = alert


def hkdf_expand_label(secret: bytes, label: bytes, context: bytes, length: int, hash_name: str) -> bytes:
    """HKDF-Expand-Label (RFC 8446 7.1) over HKDF-Expand (RFC 5869 2.3)."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes((len(full),)) + full + bytes((len(context),)) + context
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes((counter,)), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def check_suite(suite: str, secret: bytes) -> None:
    """ValueError unless ``suite`` is one we protect records for and ``secret`` fits its hash."""
    if suite not in SUITES:
        raise ValueError(f"unsupported TLS 1.3 suite {suite!r}")
    if len(secret) != hashlib.new(SUITES[suite][2]).digest_size:
        raise ValueError("the traffic secret does not match the suite's hash")


def traffic_keys(suite: str, secret: bytes) -> tuple[bytes, bytes]:
    """(key, iv) of a traffic secret (RFC 8446 7.3)."""
    _cls, key_len, hash_name = SUITES[suite]
    return hkdf_expand_label(secret, b"key", b"", key_len, hash_name), hkdf_expand_label(secret, b"iv", b"", 12, hash_name)


def next_secret(suite: str, secret: bytes) -> bytes:
    """application_traffic_secret_N+1 (RFC 8446 7.2)."""
    return hkdf_expand_label(secret, b"traffic upd", b"", len(secret), SUITES[suite][2])


class _Keys:
    """The traffic keys of one direction: the AEAD, the static IV and the sequence number."""

    __slots__ = ("suite", "secret", "aead", "iv", "seq")

    def __init__(self, suite: str, secret: bytes) -> None:
        check_suite(suite, secret)
        self.suite = suite
        self.install(secret)

    def install(self, secret: bytes) -> None:
        key, iv = traffic_keys(self.suite, secret)
        self.secret = secret
        self.aead = SUITES[self.suite][0](key)
        self.iv = int.from_bytes(iv, "big")
        self.seq = 0

    def next_generation(self) -> None:
        """The next generation of keys (after a KeyUpdate), and a sequence back at 0."""
        self.install(next_secret(self.suite, self.secret))


class Sealer:
    """Protects what we send: plaintext in, records out."""

    __slots__ = ("keys", "_scratch", "_out", "closed")

    def __init__(self, suite: str, secret: bytes) -> None:
        self.keys = _Keys(suite, secret)
        # The AEAD's input is the plaintext followed by its content type: one record's worth
        # is staged here, so the caller's buffer is only read.
        self._scratch = memoryview(bytearray(MAX_PLAINTEXT + 1))
        self._out = memoryview(bytearray())
        self.closed = False

    def seal(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Records holding ``data`` (application data), as a view of a buffer that is reused
        by the next call, unless ``lend()`` was called since."""
        view = memoryview(data).cast("B")
        size = len(view)
        count = (size + MAX_PLAINTEXT - 1) // MAX_PLAINTEXT
        self._reserve(size + count * SEAL_OVERHEAD + 2 * SEAL_OVERHEAD)  # + room for a KeyUpdate
        pos = 0
        for start in range(0, size, MAX_PLAINTEXT):
            if self.keys.seq >= REKEY_AFTER:
                pos = self._key_update(pos)
            pos = self._seal_one(view[start:start + MAX_PLAINTEXT], APPLICATION_DATA, pos)
        return self._out[:pos]

    def lend(self) -> None:
        """The last output is still referenced (a transport could not send it all at once):
        the next call writes to a new buffer."""
        self._out = memoryview(bytearray())

    def _reserve(self, need: int) -> None:
        if len(self._out) < need:
            self._out = memoryview(bytearray(max(need, 2 * len(self._out))))

    def _seal_one(self, chunk: memoryview | bytes, content_type: int, pos: int) -> int:
        keys = self.keys
        n = len(chunk)
        scratch = self._scratch
        scratch[:n] = chunk
        scratch[n] = content_type
        length = n + 1 + TAG
        header = _APPDATA_HEADER_PREFIX + length.to_bytes(2, "big")
        out = self._out
        out[pos:pos + HEADER] = header
        # The per-record nonce: the static IV XOR the 64-bit sequence number (5.3).
        nonce = (keys.iv ^ keys.seq).to_bytes(12, "big")
        keys.seq += 1
        keys.aead.encrypt_into(nonce, scratch[:n + 1], header, out[pos + HEADER:pos + HEADER + length])
        return pos + HEADER + length

    def _key_update(self, pos: int) -> int:
        # KeyUpdate, update_not_requested (4.6.3): sent under the current keys, then ours move on.
        pos = self._seal_one(bytes((KEY_UPDATE, 0, 0, 1, 0)), HANDSHAKE, pos)
        self.keys.next_generation()
        return pos

    def key_update(self) -> bytes:
        """A KeyUpdate record answering the peer's request; our sending keys move on."""
        self._reserve(2 * SEAL_OVERHEAD)
        return bytes(self._out[:self._key_update(0)])

    def close_notify(self) -> bytes:
        """The close_notify alert record (6.1); nothing may be sealed after it."""
        record = self.seal_raw(ALERT, bytes((1, CLOSE_NOTIFY)))
        self.closed = True
        return record

    def seal_raw(self, content_type: int, data: bytes) -> bytes:
        """One record of ``content_type`` holding ``data`` (at most 2^14 bytes) as it is:
        post-handshake messages and alerts (and tests, which craft what peers send)."""
        self._reserve(len(data) + 2 * SEAL_OVERHEAD)
        return bytes(self._out[:self._seal_one(data, content_type, 0)])


class Opener:
    """Authenticates and decrypts what the peer sends: ciphertext in, plaintext out."""

    __slots__ = ("keys", "_in", "_in_view", "_max", "_offered", "_filled", "start", "end", "closed", "update_requested",
                 "_handshake", "pending_output")

    def __init__(self, suite: str, secret: bytes, size: int = INPUT_SIZE) -> None:
        self.keys = _Keys(suite, secret)
        self._in = bytearray(MIN_INPUT)
        self._in_view = memoryview(self._in)
        self._max = max(size, MIN_INPUT)
        self._offered = 0  # the size of the last space() given
        self._filled = False  # the last read filled it: bulk traffic, grow
        self.start = 0  # first byte not yet opened
        self.end = 0  # end of what was received
        self.closed = False  # close_notify received: the peer sends no more
        self.update_requested = False  # the peer asked us to update our sending keys
        self._handshake = bytearray()  # post-handshake messages not complete yet
        self.pending_output = b""  # (always empty here: the OpenSSL backend's answers to send)

    # -- input
    def space(self) -> memoryview:
        """Where the next bytes from the socket go (call ``received(n)`` after writing n)."""
        size = len(self._in)
        if (self._filled or self.end == size) and size < self._max:
            size = min(2 * size, self._max)
        self._filled = False
        if size != len(self._in) or (self.start and len(self._in) - self.end < MAX_CIPHERTEXT + HEADER):
            # Move the partial record to the front (of a larger buffer when growing), so a
            # whole record always fits after it.
            pending = bytes(self._in_view[self.start:self.end])
            if size != len(self._in):
                self._in = bytearray(size)
                self._in_view = memoryview(self._in)
            self._in[:len(pending)] = pending
            self.start, self.end = 0, len(pending)
        self._offered = len(self._in) - self.end
        return self._in_view[self.end:]

    def received(self, nbytes: int) -> None:
        self.end += nbytes
        if nbytes >= self._offered:
            self._filled = True

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in (for a caller that got it as bytes)."""
        view = memoryview(data).cast("B")
        while len(view):
            space = self.space()
            n = min(len(space), len(view))
            if n == 0:
                raise RecordError(RECORD_OVERFLOW, "input buffer full")
            space[:n] = view[:n]
            self.received(n)
            view = view[n:]

    @property
    def pending(self) -> int:
        """Bytes received and not yet opened."""
        return self.end - self.start

    def has_record(self) -> bool:
        """A whole record is waiting."""
        avail = self.end - self.start
        if avail < HEADER:
            return False
        buf = self._in
        return avail >= HEADER + ((buf[self.start + 3] << 8) | buf[self.start + 4])

    # -- output
    def read_into(self, out: memoryview) -> int:
        """Open every whole record that fits in ``out``; returns the plaintext bytes written
        (0 when no whole record waits, or after close_notify). Raises RecordError."""
        if self.closed:
            return 0
        buf, view = self._in, self._in_view
        start, end = self.start, self.end
        written, room = 0, len(out)
        keys = self.keys
        try:
            while end - start >= HEADER:
                if buf[start] != APPLICATION_DATA:
                    # After the handshake every record is protected: the outer type is 23 (5.2).
                    raise RecordError(UNEXPECTED_MESSAGE, f"unprotected record of type {buf[start]} after the handshake")
                length = (buf[start + 3] << 8) | buf[start + 4]
                if length > MAX_CIPHERTEXT or length < TAG + 1:
                    raise RecordError(RECORD_OVERFLOW if length > MAX_CIPHERTEXT else DECODE_ERROR, f"record length {length}")
                if end - start < HEADER + length:
                    break
                inner = length - TAG
                if inner > room - written:
                    if written:
                        break  # the caller reads again with a fresh buffer
                    raise ValueError(f"read_into needs room for {inner} bytes")
                nonce = (keys.iv ^ keys.seq).to_bytes(12, "big")
                try:
                    keys.aead.decrypt_into(nonce, view[start + HEADER:start + HEADER + length], view[start:start + HEADER], out[written:written + inner])
                except InvalidTag:
                    raise RecordError(BAD_RECORD_MAC, "a record did not authenticate") from None
                keys.seq += 1
                start += HEADER + length
                # Strip the zero padding; the last non-zero byte is the content type (5.4).
                last = written + inner - 1
                if out[last] == 0:
                    last = written + len(bytes(out[written:last]).rstrip(b"\0")) - 1
                    if last < written:
                        raise RecordError(UNEXPECTED_MESSAGE, "a record with no content type")
                content_type = out[last]
                if content_type == APPLICATION_DATA:
                    written = last  # the next record's plaintext overwrites the type byte
                elif content_type == HANDSHAKE:
                    post_handshake(self, bytes(out[written:last]))
                elif content_type == ALERT:
                    alert(self, bytes(out[written:last]))
                    break
                else:
                    raise RecordError(UNEXPECTED_MESSAGE, f"record with content type {content_type}")
        finally:
            self.start = start
            if start == end:
                self.start = self.end = 0
        return written


def alert(opener: Any, body: bytes) -> None:
    """An alert from the peer (both twins): close_notify ends the stream, others are errors."""
    if len(body) != 2:
        raise RecordError(DECODE_ERROR, "malformed alert")
    if body[1] == CLOSE_NOTIFY:
        opener.closed = True
        return
    raise RecordError(body[1], f"the peer sent alert {body[1]}")


def post_handshake(opener: Any, data: bytes) -> None:
    """Handshake bytes from the peer after the handshake (both twins): tickets are dropped,
    KeyUpdate moves the opener's keys on and notes a request for ours."""
    hs = opener._handshake
    hs += data
    while len(hs) >= 4:
        size = int.from_bytes(hs[1:4], "big")
        if size > MAX_HANDSHAKE_MESSAGE:
            raise RecordError(UNEXPECTED_MESSAGE, f"post-handshake message of {size} bytes")
        if len(hs) < 4 + size:
            return
        kind, body = hs[0], bytes(hs[4:4 + size])
        del hs[:4 + size]
        if kind == NEW_SESSION_TICKET:
            continue  # we never resume a session: a ticket is of no use
        if kind == KEY_UPDATE:
            if len(body) != 1 or body[0] not in (0, 1):
                raise RecordError(DECODE_ERROR, "malformed KeyUpdate")
            if hs:
                # A KeyUpdate must end its record: what follows is under the new keys (5.1).
                raise RecordError(UNEXPECTED_MESSAGE, "data after a KeyUpdate in the same record")
            opener.keys.next_generation()
            if body[0] == 1:
                opener.update_requested = True
            continue
        raise RecordError(UNEXPECTED_MESSAGE, f"post-handshake message of type {kind}")
