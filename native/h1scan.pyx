# cython: language_level=3
"""Compiled twin of proxy/core/h1scan.py (same functions, same results).

One pass over the bytes with C character tables: no bytes object per line,
no lower-cased copy per header name. Keep in step with the pure module:
tests/unit/test_h1_scan.py runs both against each other and against llhttp.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_New
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.string cimport memcmp, memcpy

cdef extern from "string.h":
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen) nogil


cdef inline Py_ssize_t _head_end(const unsigned char* p, Py_ssize_t n) noexcept:
    """Offset of the first CRLF CRLF, or -1 (bytes.find without a Python call)."""
    cdef const unsigned char* at = <const unsigned char*>memmem(p, n, b"\r\n\r\n", 4)
    return -1 if at == NULL else at - p

from proxy.core.h1scan import FAST_METHODS, HOP_BY_HOP, TARGET_CHARS, TCHAR, VALUE_CHARS
from proxy.core import h1scan as _pure

# Character classes, filled from the pure module's definitions so the two cannot differ.
cdef unsigned char _tchar[256]
cdef unsigned char _vchar[256]
cdef unsigned char _uchar[256]

cdef void _fill(unsigned char* table, bytes chars):
    cdef Py_ssize_t i
    for i in range(256):
        table[i] = 0
    for i in range(len(chars)):
        table[<unsigned char>chars[i]] = 1

_fill(_tchar, TCHAR)
_fill(_vchar, VALUE_CHARS)
_fill(_uchar, TARGET_CHARS)

# Header kinds the passes care about (bit flags).
cdef enum:
    K_OTHER = 0
    K_CONTENT_LENGTH = 1
    K_TRANSFER_ENCODING = 2
    K_CONNECTION = 4
    K_UPGRADE = 8
    K_EXPECT = 16
    K_HOP = 32  # keep-alive, proxy-connection, te, trailer (the other hop-by-hop names)

cdef inline bint _ieq(const unsigned char* p, const char* lower, Py_ssize_t n) noexcept:
    """p[0:n] equals the lower-case token ``lower``, ignoring ASCII case (p is a token)."""
    cdef Py_ssize_t i
    for i in range(n):
        if (p[i] | 0x20) != <unsigned char>lower[i]:
            return False
    return True

cdef inline int _kind(const unsigned char* p, Py_ssize_t n) noexcept:
    if n == 14:
        return K_CONTENT_LENGTH if _ieq(p, b"content-length", 14) else K_OTHER
    if n == 10:
        if _ieq(p, b"connection", 10):
            return K_CONNECTION
        return K_HOP if _ieq(p, b"keep-alive", 10) else K_OTHER
    if n == 17:
        return K_TRANSFER_ENCODING if _ieq(p, b"transfer-encoding", 17) else K_OTHER
    if n == 7:
        if _ieq(p, b"upgrade", 7):
            return K_UPGRADE
        return K_HOP if _ieq(p, b"trailer", 7) else K_OTHER
    if n == 6:
        return K_EXPECT if _ieq(p, b"expect", 6) else K_OTHER
    if n == 16:
        return K_HOP if _ieq(p, b"proxy-connection", 16) else K_OTHER
    if n == 2:
        return K_HOP if _ieq(p, b"te", 2) else K_OTHER
    return K_OTHER


cdef class _Lines:
    """The result of scanning header lines."""
    cdef list headers
    cdef long long length  # -1: no Content-Length
    cdef bytes connection
    cdef int kinds  # every kind seen, OR-ed


cdef Py_ssize_t _request_line(bytes data, const unsigned char* p, Py_ssize_t n, Py_ssize_t max_head, Py_ssize_t* t0):
    """A whole bodiless head "METHOD /target HTTP/1.1" ... CRLF CRLF that is all of ``data``:
    the offset of the space before "HTTP/1.1" (the target starts at t0[0]), or -1."""
    cdef Py_ssize_t i
    if n < 18 or n > max_head or memcmp(p + n - 4, b"\r\n\r\n", 4) != 0:
        return -1
    # Every byte up to the end is checked against a character class after this, so a bare CR
    # or LF anywhere in the head fails the scan without a pass of its own.
    if _head_end(p, n) + 4 != n:
        return -1
    i = 0
    while c'A' <= p[i] <= c'Z':
        i += 1
    if p[i] != c' ' or data[:i] not in FAST_METHODS:
        return -1
    i += 1
    t0[0] = i
    if p[i] != c'/':
        return -1
    while _uchar[p[i]]:
        i += 1
    if i + 11 > n or memcmp(p + i, b" HTTP/1.1\r\n", 11) != 0:
        return -1
    return i


cdef Py_ssize_t _status_line(const unsigned char* p, Py_ssize_t n, Py_ssize_t max_head, int* status, Py_ssize_t* end):
    """An "HTTP/1.x NNN reason" line (status 200-599, not 204/304) whose head ends within
    max_head: the offset of its CR (end[0]: the CRLF CRLF offset), or -1."""
    cdef Py_ssize_t i
    if n < 17 or memcmp(p, b"HTTP/1.", 7) != 0 or (p[7] != c'0' and p[7] != c'1') or p[8] != c' ':
        return -1
    end[0] = _head_end(p, n)
    if end[0] < 0 or end[0] + 4 > max_head:
        return -1
    for i in range(9, 12):
        if p[i] < c'0' or p[i] > c'9':
            return -1
    if p[12] != c' ':
        return -1
    status[0] = (p[9] - c'0') * 100 + (p[10] - c'0') * 10 + (p[11] - c'0')
    if status[0] < 200 or status[0] > 599 or status[0] == 204 or status[0] == 304:
        return -1
    i = 13
    while _vchar[p[i]]:
        i += 1
    if p[i] != c'\r' or p[i + 1] != c'\n':
        return -1
    return i


cdef inline long long _content_length(const unsigned char* p, Py_ssize_t start, Py_ssize_t stop) noexcept:
    """The plain decimal value p[start:stop] (1-15 digits), or -1."""
    cdef long long length = 0
    cdef Py_ssize_t i
    if stop == start or stop - start > 15:
        return -1
    for i in range(start, stop):
        if p[i] < c'0' or p[i] > c'9':
            return -1
        length = length * 10 + (p[i] - c'0')
    return length


cdef _Lines _scan_lines(bytes data, const unsigned char* p, Py_ssize_t pos, Py_ssize_t end):
    """Header lines from p[pos] up to the empty line at ``end`` (the CRLF CRLF offset + 2).
    None when a line is outside the strict subset. ``data`` ends with CRLF CRLF, so every
    scan below stops at a CR before running off the end."""
    cdef _Lines out = _Lines.__new__(_Lines)
    cdef Py_ssize_t start, colon, vstart, i
    cdef int kind
    cdef long long length = -1
    cdef bytes value
    out.headers = []
    out.connection = b""
    out.kinds = 0
    while pos < end:
        start = pos
        while _tchar[p[pos]]:
            pos += 1
        if pos == start or p[pos] != c':':
            return None
        colon = pos
        pos += 1
        while p[pos] == c' ' or p[pos] == c'\t':
            pos += 1
        vstart = pos
        while _vchar[p[pos]]:
            pos += 1
        if p[pos] != c'\r' or p[pos + 1] != c'\n':
            return None
        kind = _kind(p + start, colon - start)
        value = PyBytes_FromStringAndSize(<const char*>p + vstart, pos - vstart)
        if kind == K_CONTENT_LENGTH:
            if length >= 0:
                return None
            length = _content_length(p, vstart, pos)
            if length < 0:
                return None
        elif kind == K_CONNECTION:
            out.connection += b"," + value.lower()
        out.kinds |= kind
        out.headers.append((PyBytes_FromStringAndSize(<const char*>p + start, colon - start), value))
        pos += 2
    out.length = length
    return out


def scan_request(bytes data, Py_ssize_t max_head):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t t0 = 0
    cdef Py_ssize_t i = _request_line(data, p, n, max_head, &t0)
    cdef _Lines lines
    if i < 0:
        return None
    lines = _scan_lines(data, p, i + 11, n - 2)
    method, target = data[:t0 - 1], data[t0:i]
    if lines is None or lines.length > 0 or lines.kinds & (K_TRANSFER_ENCODING | K_UPGRADE | K_EXPECT):
        return None
    return method, target, lines.headers, 0 if lines.length == 0 else None, lines.connection


def scan_request_head(bytes data, Py_ssize_t max_head):
    """``scan_request`` for a request that can be sent on as it was read: every line written
    "Name: value", no hop-by-hop header, no l5d-* header (the proxy would take or set those).
    (method, target, content-length (0 or None)), or None."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t t0 = 0
    cdef Py_ssize_t i = _request_line(data, p, n, max_head, &t0)
    cdef Py_ssize_t pos, start, colon, vstart
    cdef int kind, kinds = 0
    cdef long long length = -1
    if i < 0:
        return None
    pos = i + 11
    while pos < n - 2:
        start = pos
        while _tchar[p[pos]]:
            pos += 1
        if pos == start or p[pos] != c':':
            return None
        colon = pos
        if colon - start >= 4 and _ieq(p + start, b"l5d-", 4):
            return None
        pos += 1
        while p[pos] == c' ' or p[pos] == c'\t':
            pos += 1
        vstart = pos
        if vstart != colon + 2 or p[colon + 1] != c' ':
            return None
        while _vchar[p[pos]]:
            pos += 1
        if p[pos] != c'\r' or p[pos + 1] != c'\n':
            return None
        kind = _kind(p + start, colon - start)
        if kind == K_CONTENT_LENGTH:
            if length >= 0:
                return None
            length = _content_length(p, vstart, pos)
            if length < 0:
                return None
        kinds |= kind
        pos += 2
    if length > 0 or kinds & (K_TRANSFER_ENCODING | K_UPGRADE | K_EXPECT | K_CONNECTION | K_HOP):
        return None
    return data[:t0 - 1], data[t0:i], 0 if length == 0 else None


def scan_response(bytes data, Py_ssize_t max_head):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t end = 0
    cdef int status = 0
    cdef Py_ssize_t i = _status_line(p, n, max_head, &status, &end)
    cdef _Lines lines
    if i < 0:
        return None
    reason = data[13:i]
    lines = _scan_lines(data, p, i + 2, end + 2)
    if lines is None or lines.length < 0 or lines.kinds & (K_TRANSFER_ENCODING | K_UPGRADE) or end + 4 + lines.length != n:
        return None
    return status, reason, data[5:8], lines.headers, lines.length, lines.connection, end + 4


def framing(headers):
    if type(headers) is not list:
        return _pure.framing(headers)
    cdef bint chunked = False
    cdef object length = None
    cdef bytes connection = b""
    cdef bint upgrade = False
    cdef int kind
    cdef object item, name, value
    for item in headers:
        name, value = item
        if type(name) is not bytes:
            return _pure.framing(headers)
        kind = _kind(<const unsigned char*>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        if kind == K_OTHER:
            continue
        if kind == K_CONTENT_LENGTH:
            length = int(value)
        elif kind == K_TRANSFER_ENCODING:
            chunked = value.lower().rstrip().endswith(b"chunked")
        elif kind == K_CONNECTION:
            connection += b"," + value.lower()
        elif kind == K_UPGRADE:
            upgrade = True
    return chunked, length, connection, upgrade and b"upgrade" in connection


cdef inline bint _space(unsigned char c) noexcept:
    return c == c' ' or c == c'\t' or c == c'\n' or c == c'\r' or c == 0x0b or c == 0x0c  # bytes.strip()'s set


cdef list _named(bytes value, list named):
    """Add the tokens of one Connection value that name an end-to-end header (lower-cased)
    to ``named``: the hop-by-hop names among them are dropped anyway."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value)
    cdef Py_ssize_t i = 0, a, b
    while i <= n:
        a = i
        while i < n and p[i] != c',':
            i += 1
        b = i
        i += 1
        while a < b and _space(p[a]):
            a += 1
        while b > a and _space(p[b - 1]):
            b -= 1
        if b > a and not _kind(p + a, b - a) & (K_CONNECTION | K_UPGRADE | K_HOP):
            if named is None:
                named = []
            named.append(value[a:b].lower())
    return named


cdef bint _is_named(bytes name, list named):
    cdef bytes token
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    for token in named:
        if PyBytes_GET_SIZE(token) == n and _ieq(<const unsigned char*>PyBytes_AS_STRING(name), PyBytes_AS_STRING(token), n):
            return True
    return False


cdef enum:
    MAX_FORWARD_LINES = 64  # more header lines than this: the general writer


cdef inline bint _only_keep_alive_or_close(bytes connection) noexcept:
    """Connection tokens (``framing``'s ",a,b" form) name only hop-by-hop headers."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(connection)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(connection)
    cdef Py_ssize_t i = 0, a, b
    while i < n:
        i += 1  # the comma before each value
        a = i
        while i < n and p[i] != c',':
            i += 1
        b = i
        while a < b and _space(p[a]):
            a += 1
        while b > a and _space(p[b - 1]):
            b -= 1
        if b > a and not _kind(p + a, b - a) & (K_CONNECTION | K_HOP):
            return False  # "close" too: it would drop a header named Close
    return True


def scan_response_head(bytes data, Py_ssize_t max_head):
    """``scan_response`` without the header list, plus the head to forward as it is (the
    status line as HTTP/1.1, the lines minus hop-by-hop ones): (status, reason, version,
    content-length, Connection tokens, body offset, head). None when ``scan_response``
    declines, the reason is empty, a kept line is not written "Name: value", or Connection
    names another header."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t end = 0
    cdef int status = 0
    cdef Py_ssize_t reason_end = _status_line(p, n, max_head, &status, &end)
    cdef Py_ssize_t pos, start, colon, vstart, total, count = 0, k
    cdef Py_ssize_t spans[2 * MAX_FORWARD_LINES]
    cdef int kind, kinds = 0
    cdef long long length = -1
    cdef bytes connection = b""
    cdef bytes out
    cdef char* w
    if reason_end <= 13:  # declined, or an empty reason (the writer would supply one)
        return None
    pos = reason_end + 2
    total = 9 + (reason_end - 9) + 2 + 2  # "HTTP/1.1 " status and reason, CRLF; the empty line
    while pos < end + 2:
        start = pos
        while _tchar[p[pos]]:
            pos += 1
        if pos == start or p[pos] != c':':
            return None
        colon = pos
        pos += 1
        while p[pos] == c' ' or p[pos] == c'\t':
            pos += 1
        vstart = pos
        if vstart != colon + 2 or p[colon + 1] != c' ':
            return None  # not written as "Name: value": leave the head to the general writer
        while _vchar[p[pos]]:
            pos += 1
        if p[pos] != c'\r' or p[pos + 1] != c'\n':
            return None
        kind = _kind(p + start, colon - start)
        if kind == K_CONTENT_LENGTH:
            if length >= 0:
                return None
            length = _content_length(p, vstart, pos)
            if length < 0:
                return None
        elif kind == K_CONNECTION:
            connection += b"," + data[vstart:pos].lower()
        kinds |= kind
        pos += 2
        if not kind & (K_CONNECTION | K_UPGRADE | K_HOP):
            if count == MAX_FORWARD_LINES:
                return None
            spans[2 * count] = start
            spans[2 * count + 1] = pos
            count += 1
            total += pos - start
    if length < 0 or kinds & (K_TRANSFER_ENCODING | K_UPGRADE) or end + 4 + length != n:
        return None
    if kinds & K_CONNECTION and not _only_keep_alive_or_close(connection):
        return None
    out = PyBytes_FromStringAndSize(NULL, total)
    w = PyBytes_AS_STRING(out)
    memcpy(w, b"HTTP/1.1 ", 9)
    memcpy(w + 9, p + 9, reason_end - 9)
    w += reason_end
    w[0] = c'\r'
    w[1] = c'\n'
    w += 2
    for k in range(count):
        memcpy(w, p + spans[2 * k], spans[2 * k + 1] - spans[2 * k])
        w += spans[2 * k + 1] - spans[2 * k]
    w[0] = c'\r'
    w[1] = c'\n'
    return status, data[13:reason_end], data[5:8], length, connection, end + 4, out


def forwardable(headers, upgrade=False):
    if upgrade:
        return headers
    if type(headers) is not list:
        return _pure.forwardable(headers, upgrade)
    cdef list out = []
    cdef list named = None
    cdef int kind
    cdef object item, name, value
    for item in headers:
        if type(item) is tuple and PyTuple_GET_SIZE(item) == 2:
            name = <object>PyTuple_GET_ITEM(item, 0)
            value = <object>PyTuple_GET_ITEM(item, 1)
        else:
            name, value = item
            item = (name, value)
        if type(name) is not bytes or type(value) is not bytes:
            return _pure.forwardable(headers, upgrade)
        kind = _kind(<const unsigned char*>PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        if kind & (K_CONNECTION | K_UPGRADE | K_HOP):
            if kind == K_CONNECTION:
                named = _named(value, named)
            continue
        out.append(item)  # the same (name, value) tuple: immutable, so sharing it is safe
    if named is not None:
        out = [item for item in out if not _is_named(item[0], named)]
    return out


def take_header(headers, bytes name):
    if type(headers) is not list:
        return _pure.take_header(headers, name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    cdef const char* lower = PyBytes_AS_STRING(name)
    cdef object found = None
    cdef list kept = None
    cdef Py_ssize_t i
    cdef object item, key, value
    for i in range(len(headers)):
        item = headers[i]
        key, value = item
        if type(key) is not bytes:
            return _pure.take_header(headers, name)
        if PyBytes_GET_SIZE(key) == n and _ieq(<const unsigned char*>PyBytes_AS_STRING(key), lower, n):
            if found is None:
                found = value
                kept = [(k, v) for k, v in headers[:i]]
        elif kept is not None:
            kept.append((key, value))
    return (found, kept) if found is not None else (None, headers)


def encode_response_head(status, reason, headers):
    if type(status) is not int or not 100 <= status <= 999 or type(reason) is not bytes:
        return _pure.encode_response_head(status, reason, headers)
    cdef int code = status
    cdef Py_ssize_t k = PyBytes_GET_SIZE(reason)
    cdef bytes line = PyBytes_FromStringAndSize(NULL, 13 + k)
    cdef char* w = PyBytes_AS_STRING(line)
    memcpy(w, b"HTTP/1.1 ", 9)
    w[9] = c'0' + code // 100
    w[10] = c'0' + code // 10 % 10
    w[11] = c'0' + code % 10
    w[12] = c' '
    memcpy(w + 13, PyBytes_AS_STRING(reason), k)
    return encode_head(line, headers)


def encode_head(first_line, headers):
    if type(first_line) is not bytes or type(headers) is not list:
        return _pure.encode_head(first_line, headers)
    cdef Py_ssize_t total = PyBytes_GET_SIZE(first_line) + 4
    cdef object item, name, value
    for item in headers:
        name, value = item
        if type(name) is not bytes or type(value) is not bytes:
            return _pure.encode_head(first_line, headers)
        total += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* w = PyBytes_AS_STRING(out)
    cdef Py_ssize_t k = PyBytes_GET_SIZE(first_line)
    memcpy(w, PyBytes_AS_STRING(first_line), k)
    w += k
    w[0] = c'\r'
    w[1] = c'\n'
    w += 2
    for item in headers:
        name, value = item
        k = PyBytes_GET_SIZE(name)
        memcpy(w, PyBytes_AS_STRING(name), k)
        w += k
        w[0] = c':'
        w[1] = c' '
        w += 2
        k = PyBytes_GET_SIZE(value)
        memcpy(w, PyBytes_AS_STRING(value), k)
        w += k
        w[0] = c'\r'
        w[1] = c'\n'
        w += 2
    w[0] = c'\r'
    w[1] = c'\n'
    return out
