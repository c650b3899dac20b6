# C declarations for proxy/http/exchange.py compiled as proxy._native.exchange (Cython's
# augmenting .pxd): one Exchange is made per request, so its fields are struct fields and
# its methods C calls. Every field stays a Python object (Python semantics are kept).
# Keep in step with the .py: an attribute assigned there must be declared here.
cimport cython


@cython.final
cdef class StatusSeries:
    cdef public object latency, plain


@cython.final
cdef class RouteSeries:
    cdef public object metrics, labels, requests, latency, responses, checked
    cdef public dict by_status

    cpdef StatusSeries status_series(self, status)
    cpdef latency_for(self, status)
    cpdef response_for(self, key)


cpdef RouteSeries route_series(metrics, labels)


@cython.final
cdef class Exchange:
    cdef public object metrics, route, started, status, grpc, ended
    cdef public RouteSeries series
    cdef public StatusSeries by_status

    cpdef response_head(self, status)
    cpdef end(self, grpc_status=*, error=*)
