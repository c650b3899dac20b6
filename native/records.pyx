# cython: language_level=3
"""Compiled twin of proxy/tls/records.py: the same Sealer and Opener, same behaviour.

The per-record work goes straight to libcrypto's EVP interface with one cipher
context per direction, kept across records (only the nonce changes), so a
record costs one AEAD pass and no Python object; the pure twin pays a Python
call into ``cryptography`` and a few objects per record. What is rare (the key
schedule, post-handshake messages, alerts) is the pure module's own code,
called from here, so the two cannot drift there. Keep the rest in step with
records.py: the record tests run against both.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING
from libc.string cimport memcpy, memmove

from proxy.tls import records as _py
from proxy.tls.records import RecordError

cdef extern from "openssl/evp.h":
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct ENGINE:
        pass
    EVP_CIPHER_CTX* EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX* ctx)
    const EVP_CIPHER* EVP_aes_128_gcm()
    const EVP_CIPHER* EVP_aes_256_gcm()
    const EVP_CIPHER* EVP_chacha20_poly1305()
    int EVP_CipherInit_ex(EVP_CIPHER_CTX* ctx, const EVP_CIPHER* cipher, ENGINE* impl, const unsigned char* key, const unsigned char* iv, int enc) nogil
    int EVP_CipherUpdate(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl, const unsigned char* inp, int inl) nogil
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX* ctx, unsigned char* out, int* outl) nogil
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX* ctx, int type, int arg, void* ptr) nogil
    int EVP_CTRL_AEAD_GET_TAG
    int EVP_CTRL_AEAD_SET_TAG

cdef enum:
    # The values of records.py (RFC 8446 5.1-5.2).
    TAG = 16
    HEADER = 5
    MAX_PLAINTEXT = 16384
    MAX_CIPHERTEXT = 16384 + 256
    SEAL_OVERHEAD = 5 + 1 + 16
    APPLICATION_DATA = 23
    HANDSHAKE = 22
    ALERT = 21

REKEY_AFTER = _py.REKEY_AFTER
cdef unsigned long long _REKEY_AFTER = _py.REKEY_AFTER


cdef const EVP_CIPHER* _cipher(str suite) except NULL:
    if suite == "TLS_AES_128_GCM_SHA256":
        return EVP_aes_128_gcm()
    if suite == "TLS_AES_256_GCM_SHA384":
        return EVP_aes_256_gcm()
    if suite == "TLS_CHACHA20_POLY1305_SHA256":
        return EVP_chacha20_poly1305()
    raise ValueError(f"unsupported TLS 1.3 suite {suite!r}")


cdef class _Keys:
    """The traffic keys of one direction: an EVP context keyed once, the IV, the sequence."""

    cdef public str suite
    cdef public bytes secret
    cdef public unsigned long long seq
    cdef unsigned char iv[12]
    cdef unsigned char nonce[12]
    cdef EVP_CIPHER_CTX* ctx
    cdef int enc

    def __cinit__(self, *args, **kwargs):
        self.ctx = EVP_CIPHER_CTX_new()
        if self.ctx is NULL:
            raise MemoryError()

    def __dealloc__(self):
        if self.ctx is not NULL:
            EVP_CIPHER_CTX_free(self.ctx)

    def __init__(self, str suite, bytes secret, bint enc):
        _py.check_suite(suite, secret)
        self.suite = suite
        self.enc = enc
        self.install(secret)

    def install(self, bytes secret):
        cdef bytes key, iv
        key, iv = _py.traffic_keys(self.suite, secret)
        if EVP_CipherInit_ex(self.ctx, _cipher(self.suite), NULL, key, NULL, self.enc) != 1:
            raise RuntimeError("EVP_CipherInit_ex failed")
        memcpy(self.iv, <const unsigned char*>iv, 12)
        self.secret = secret
        self.seq = 0

    def next_generation(self):
        """The next generation of keys (after a KeyUpdate), and a sequence back at 0."""
        self.install(_py.next_secret(self.suite, self.secret))

    cdef inline void _next_nonce(self) noexcept:
        # The per-record nonce: the static IV XOR the 64-bit sequence number (RFC 8446 5.3).
        cdef int i
        cdef unsigned long long seq = self.seq
        memcpy(self.nonce, self.iv, 12)
        for i in range(8):
            self.nonce[11 - i] ^= <unsigned char>(seq >> (8 * i))
        self.seq += 1

    cdef int seal(self, unsigned char* out, const unsigned char* data, Py_ssize_t n, unsigned char content_type) except -1:
        """One record at ``out``: header, then data + content type sealed, then the tag."""
        cdef int outl = 0
        cdef Py_ssize_t length = n + 1 + TAG
        out[0] = APPLICATION_DATA
        out[1] = 3
        out[2] = 3
        out[3] = <unsigned char>(length >> 8)
        out[4] = <unsigned char>(length & 0xFF)
        self._next_nonce()
        if (EVP_CipherInit_ex(self.ctx, NULL, NULL, NULL, self.nonce, 1) != 1
                or EVP_CipherUpdate(self.ctx, NULL, &outl, out, HEADER) != 1
                or (n and EVP_CipherUpdate(self.ctx, out + HEADER, &outl, data, <int>n) != 1)
                or EVP_CipherUpdate(self.ctx, out + HEADER + n, &outl, &content_type, 1) != 1
                or EVP_CipherFinal_ex(self.ctx, out + HEADER + n + 1, &outl) != 1
                or EVP_CIPHER_CTX_ctrl(self.ctx, EVP_CTRL_AEAD_GET_TAG, TAG, out + HEADER + n + 1) != 1):
            raise RuntimeError("sealing a record failed")
        return 0

    cdef bint open(self, const unsigned char* record, Py_ssize_t length, unsigned char* out) except -1:
        """Authenticate and decrypt one record body (``length`` bytes after the header at
        ``record``) into ``out``; False when it does not authenticate."""
        cdef int outl = 0
        cdef Py_ssize_t inner = length - TAG
        self._next_nonce()
        if (EVP_CipherInit_ex(self.ctx, NULL, NULL, NULL, self.nonce, 0) != 1
                or EVP_CipherUpdate(self.ctx, NULL, &outl, record, HEADER) != 1
                or EVP_CipherUpdate(self.ctx, out, &outl, record + HEADER, <int>inner) != 1
                or EVP_CIPHER_CTX_ctrl(self.ctx, EVP_CTRL_AEAD_SET_TAG, TAG, <void*>(record + HEADER + inner)) != 1):
            raise RuntimeError("opening a record failed")
        if EVP_CipherFinal_ex(self.ctx, out + inner, &outl) != 1:
            self.seq -= 1  # as the pure twin: a record that fails does not count
            return False
        return True


cdef class Sealer:
    """Protects what we send: plaintext in, records out."""

    cdef public _Keys keys
    cdef bytearray _out
    cdef public bint closed

    def __init__(self, str suite, bytes secret):
        self.keys = _Keys(suite, secret, True)
        self._out = bytearray()
        self.closed = False

    def seal(self, data):
        """Records holding ``data`` (application data), as a view of a buffer that is reused
        by the next call, unless ``lend()`` was called since."""
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        cdef Py_ssize_t size = view.shape[0]
        cdef Py_ssize_t count = (size + MAX_PLAINTEXT - 1) // MAX_PLAINTEXT
        cdef Py_ssize_t pos = 0, start = 0, n
        self._reserve(size + count * SEAL_OVERHEAD + 2 * SEAL_OVERHEAD)
        cdef unsigned char* out = <unsigned char*>PyByteArray_AS_STRING(self._out)
        while start < size:
            if self.keys.seq >= _REKEY_AFTER:
                pos = self._key_update(out, pos)
            n = min(MAX_PLAINTEXT, size - start)
            self.keys.seal(out + pos, &view[start], n, APPLICATION_DATA)
            pos += HEADER + n + 1 + TAG
            start += n
        return memoryview(self._out)[:pos]

    def lend(self):
        """The last output is still referenced: the next call writes to a new buffer."""
        self._out = bytearray()

    cdef _reserve(self, Py_ssize_t need):
        if len(self._out) < need:
            self._out = bytearray(max(need, 2 * len(self._out)))

    cdef Py_ssize_t _key_update(self, unsigned char* out, Py_ssize_t pos) except -1:
        # KeyUpdate, update_not_requested (4.6.3): sent under the current keys, then ours move on.
        cdef unsigned char message[5]
        message[:] = [24, 0, 0, 1, 0]
        self.keys.seal(out + pos, message, 5, HANDSHAKE)
        self.keys.next_generation()
        return pos + HEADER + 5 + 1 + TAG

    def key_update(self):
        """A KeyUpdate record answering the peer's request; our sending keys move on."""
        self._reserve(2 * SEAL_OVERHEAD)
        cdef Py_ssize_t end = self._key_update(<unsigned char*>PyByteArray_AS_STRING(self._out), 0)
        return bytes(self._out[:end])

    def close_notify(self):
        """The close_notify alert record (6.1); nothing may be sealed after it."""
        record = self.seal_raw(ALERT, bytes((1, 0)))
        self.closed = True
        return record

    def seal_raw(self, int content_type, bytes data):
        """One record of ``content_type`` holding ``data`` (at most 2^14 bytes) as it is."""
        cdef Py_ssize_t n = len(data)
        if n > MAX_PLAINTEXT:
            raise ValueError("a record holds at most 2^14 bytes")
        self._reserve(n + 2 * SEAL_OVERHEAD)
        self.keys.seal(<unsigned char*>PyByteArray_AS_STRING(self._out), <const unsigned char*>data, n, <unsigned char>content_type)
        return bytes(self._out[:HEADER + n + 1 + TAG])


cdef class Opener:
    """Authenticates and decrypts what the peer sends: ciphertext in, plaintext out."""

    cdef public _Keys keys
    cdef bytearray _in
    cdef Py_ssize_t _max
    cdef Py_ssize_t _offered
    cdef bint _filled
    cdef public Py_ssize_t start
    cdef public Py_ssize_t end
    cdef public bint closed
    cdef public bint update_requested
    cdef public bytearray _handshake
    cdef public object pending_output

    def __init__(self, str suite, bytes secret, Py_ssize_t size=_py.INPUT_SIZE):
        self.keys = _Keys(suite, secret, False)
        self._in = bytearray(_py.MIN_INPUT)
        self._max = max(size, _py.MIN_INPUT)
        self._offered = 0
        self._filled = False
        self.start = 0
        self.end = 0
        self.closed = False
        self.update_requested = False
        self._handshake = bytearray()
        self.pending_output = b""

    def space(self):
        """Where the next bytes from the socket go (call ``received(n)`` after writing n)."""
        cdef Py_ssize_t pending, size = len(self._in)
        cdef bytearray grown
        if (self._filled or self.end == size) and size < self._max:
            size = min(2 * size, self._max)
        self._filled = False
        if size != len(self._in) or (self.start and len(self._in) - self.end < MAX_CIPHERTEXT + HEADER):
            # Move the partial record to the front (of a larger buffer when growing), so a
            # whole record always fits after it.
            pending = self.end - self.start
            if size != len(self._in):
                grown = bytearray(size)
                memcpy(PyByteArray_AS_STRING(grown), PyByteArray_AS_STRING(self._in) + self.start, pending)
                self._in = grown
            else:
                memmove(PyByteArray_AS_STRING(self._in), PyByteArray_AS_STRING(self._in) + self.start, pending)
            self.start, self.end = 0, pending
        self._offered = len(self._in) - self.end
        return memoryview(self._in)[self.end:]

    def received(self, Py_ssize_t nbytes):
        self.end += nbytes
        if nbytes >= self._offered:
            self._filled = True

    def feed(self, data):
        """Copy ``data`` in (for a caller that got it as bytes)."""
        view = memoryview(data).cast("B")
        while len(view):
            space = self.space()
            n = min(len(space), len(view))
            if n == 0:
                raise RecordError(_py.RECORD_OVERFLOW, "input buffer full")
            space[:n] = view[:n]
            self.received(n)
            view = view[n:]

    @property
    def pending(self):
        """Bytes received and not yet opened."""
        return self.end - self.start

    def has_record(self):
        """A whole record is waiting."""
        cdef Py_ssize_t avail = self.end - self.start
        cdef const unsigned char* buf = <const unsigned char*>PyByteArray_AS_STRING(self._in)
        if avail < HEADER:
            return False
        return avail >= HEADER + ((buf[self.start + 3] << 8) | buf[self.start + 4])

    def read_into(self, out):
        """Open every whole record that fits in ``out``; returns the plaintext bytes written
        (0 when no whole record waits, or after close_notify). Raises RecordError."""
        if self.closed:
            return 0
        cdef unsigned char[::1] dst = out
        cdef const unsigned char* buf = <const unsigned char*>PyByteArray_AS_STRING(self._in)
        cdef Py_ssize_t start = self.start, end = self.end
        cdef Py_ssize_t written = 0, room = dst.shape[0], length, inner, last
        cdef unsigned char content_type
        try:
            while end - start >= HEADER:
                if buf[start] != APPLICATION_DATA:
                    # After the handshake every record is protected: the outer type is 23 (5.2).
                    raise RecordError(_py.UNEXPECTED_MESSAGE, f"unprotected record of type {buf[start]} after the handshake")
                length = (buf[start + 3] << 8) | buf[start + 4]
                if length > MAX_CIPHERTEXT or length < TAG + 1:
                    raise RecordError(_py.RECORD_OVERFLOW if length > MAX_CIPHERTEXT else _py.DECODE_ERROR, f"record length {length}")
                if end - start < HEADER + length:
                    break
                inner = length - TAG
                if inner > room - written:
                    if written:
                        break  # the caller reads again with a fresh buffer
                    raise ValueError(f"read_into needs room for {inner} bytes")
                if not self.keys.open(buf + start, length, &dst[written]):
                    raise RecordError(_py.BAD_RECORD_MAC, "a record did not authenticate")
                start += HEADER + length
                # Strip the zero padding; the last non-zero byte is the content type (5.4).
                last = written + inner - 1
                while last >= written and dst[last] == 0:
                    last -= 1
                if last < written:
                    raise RecordError(_py.UNEXPECTED_MESSAGE, "a record with no content type")
                content_type = dst[last]
                if content_type == APPLICATION_DATA:
                    written = last  # the next record's plaintext overwrites the type byte
                elif content_type == HANDSHAKE:
                    _py.post_handshake(self, bytes(dst[written:last]))
                elif content_type == ALERT:
                    _py.alert(self, bytes(dst[written:last]))
                    break
                else:
                    raise RecordError(_py.UNEXPECTED_MESSAGE, f"record with content type {content_type}")
        finally:
            self.start = start
            if start == end:
                self.start = self.end = 0
        return written
