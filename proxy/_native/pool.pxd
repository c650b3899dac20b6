# C declarations for proxy/http/pool.py compiled as proxy._native.pool (Cython's augmenting
# .pxd): IdlePool becomes a C type (Python subclasses such as http.h1.H1Pool still work and
# override ``parked``), so acquire and release touch struct fields. Every field stays a
# Python object. Keep in step with the .py: an attribute assigned there must be declared here.
cdef class IdlePool:
    cdef public object target, connect_timeout, idle_timeout, max_idle, identity, local, metrics, dst_labels
    cdef public object closed, loop, _sweep
    cdef public list idle
