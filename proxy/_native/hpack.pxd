# Augments proxy/core/hpack.py when it is compiled as proxy._native.hpack
# (Cython finds this file by the module's name). It declares how the two
# table classes store their attributes, nothing else: C integers for sizes and
# counters, C booleans for flags, objects otherwise. No local is typed and no
# directive is changed, so the code keeps Python's semantics; assigning a value
# of the wrong kind raises TypeError here where the pure module would accept it.

cdef class Decoder:
    cdef public object entries
    cdef public long used
    cdef public object pending
    cdef public long pending_size
    cdef public long max_table_size
    cdef public long max_allowed_table_size
    cdef public long max_header_list_size
    cdef public long generation
    cdef public bint read_table
    cdef public object inserted

cdef class Encoder:
    cdef public object entries
    cdef public object fields
    cdef public object names
    cdef public long inserted
    cdef public long size
    cdef public long max_size
    cdef public object pending_sizes
    cdef public object blocks
    cdef public long generation
