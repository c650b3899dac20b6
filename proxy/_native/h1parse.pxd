# C declarations for proxy/core/h1.py compiled as proxy._native.h1parse (Cython's augmenting .pxd).
#
# The source stays plain Python and the pure twin; these lines make the heads and parsers
# C types: one of each is made per message, and their fields are struct fields instead of
# slot lookups. Every field stays a Python object, so Python semantics are kept.
# Keep in step with the .py: an attribute assigned there must be declared here (the compiled
# twin raises AttributeError otherwise; tests/unit/test_h1_scan.py and the HTTP/1 suites run it).
cimport cython


cpdef bint _keep_alive(version, connection)


@cython.final
cdef class RequestHead:
    cdef public object method, target, version, parsed_headers, keep_alive, chunked, content_length, upgrade, forward


@cython.final
cdef class ResponseHead:
    cdef public object status, reason, version, parsed_headers, keep_alive, chunked, content_length, raw, forward


@cython.final
cdef class _HttptoolsRequestParser:
    cdef public object handler, parser, url, headers, head_size, max_head, head, idle


@cython.final
cdef class _HttptoolsResponseParser:
    cdef public object handler, parser, method, reason, headers, head_size, max_head, manual, done_head, in_body, forward_heads

    cpdef _feed_manual(self, data)


cdef class _H11RequestParser:
    cdef public object handler, max_head, conn


cdef class _H11ResponseParser:
    cdef public object handler, method, conn
