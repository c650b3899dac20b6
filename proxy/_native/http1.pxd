# C declarations for proxy/http/h1.py compiled as proxy._native.http1 (Cython's augmenting .pxd).
#
# The source stays plain Python and the pure twin; these lines make its three per-connection
# classes C types, so an attribute is a struct field instead of a slot or dict lookup, and
# the hot methods cpdef, so calls between them are C calls. Every field stays a Python object
# and every method stays callable from Python, so Python semantics are kept.
# Keep in step with the .py: an attribute assigned there must be declared here (the compiled
# twin raises AttributeError otherwise; the HTTP/1 suites run on both twins). A method listed
# here must keep its argument names, and must not hold a closure (lambda, nested def).
cimport cython
# C types of the heads and the metrics, under other names: the .py binds the plain names.
from proxy._native.exchange cimport Exchange as ExchangeC
from proxy._native.h1parse cimport RequestHead as RequestHeadC, ResponseHead as ResponseHeadC

cdef class Http1Server
cdef class H1Exchange


@cython.final
cdef class UpstreamConnection:
    cdef public object pool, transport, parser, reused, got_bytes, lost, idle_since, series
    cdef public H1Exchange exchange

    cpdef close(self)


@cython.final
cdef class H1Exchange:
    cdef public Http1Server server
    cdef public RequestHeadC head
    cdef public ResponseHeadC response_head
    cdef public ExchangeC metrics
    cdef public object upstream, held, held_size, request_done, response_done
    cdef public object client_keep_alive, response_chunked, connect_task, timer, early, retried, close_after
    cdef public object required_id, endpoint, load_handle, backend, retry_body, retry_size, retries, discarding
    cdef public object started, route_labels, route_started, in_flight, upgraded

    cpdef start(self)
    cpdef upgradable(self, identity, protocol)
    cpdef identity_allowed(self, identity)
    cpdef dispatch(self, pool, identity)
    cpdef load_done(self, rtt)
    cpdef take_header(self, name)
    cpdef attach(self, UpstreamConnection conn)
    cpdef request_body(self, chunk)
    cpdef request_end(self)
    cpdef on_head(self, ResponseHeadC head)
    cpdef on_body(self, chunk)
    cpdef on_end(self)
    cpdef release_in_flight(self)


@cython.final
cdef class Http1Server:
    cdef public object local, in_flight_limit, access_log, client_addr, route, src, metrics, clients, pure, max_head
    cdef public object pool_idle, max_idle, live, relay_factory, loop, parser, transport, switched, paused, lost
    cdef public object draining, pending_error, corked, h2_upgrade, route_pool, response_timeout
    cdef public bint outbound
    cdef public list queue

    cpdef on_head(self, RequestHeadC head)
    cpdef on_body(self, chunk)
    cpdef on_end(self)
    cpdef write(self, data)
    cpdef cork(self)
    cpdef flush(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cpdef exchange_done(self, H1Exchange ex)
    cpdef pool(self)
