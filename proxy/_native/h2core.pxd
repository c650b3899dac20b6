# Augments proxy/http/h2core.py when it is compiled as proxy._native.h2core
# (Cython finds this file by the module's name). It declares how the hot
# classes store their attributes, nothing else: C integers for stream ids,
# windows, sizes and counters (all below 2**32 by the protocol), C booleans for
# flags, objects otherwise. Inside the methods, ``self.x`` is then a field read
# instead of a dictionary-backed lookup. No local is typed and no directive is
# changed, so the code keeps Python's semantics; assigning a value of the wrong
# kind raises TypeError here where the pure module would accept it.

cdef class RequestReceived:
    cdef public long stream_id
    cdef public object headers
    cdef public bint stream_ended

cdef class ResponseReceived:
    cdef public long stream_id
    cdef public object headers
    cdef public bint stream_ended

cdef class InformationalResponseReceived:
    cdef public long stream_id
    cdef public object headers

cdef class TrailersReceived:
    cdef public long stream_id
    cdef public object headers

cdef class DataReceived:
    cdef public long stream_id
    cdef public object data
    cdef public long flow_controlled_length
    cdef public bint stream_ended

cdef class StreamReset:
    cdef public long stream_id
    cdef public long error_code
    cdef public bint remote_reset

cdef class WindowUpdated:
    cdef public long stream_id
    cdef public long delta

cdef class _Stream:
    cdef public long send_window
    cdef public long recv_window
    cdef public long unacked
    cdef public bint local_closed
    cdef public bint remote_closed
    cdef public bint got_head
    cdef public bint inbound
    cdef public long expected

cdef class Connection:
    cdef public bint client_side
    cdef public bint validate_requests
    cdef public object encoder
    cdef public object decoder
    cdef public object out
    cdef public object buf
    cdef public bint preface_due
    cdef public object streams
    cdef public long open_inbound
    cdef public long open_outbound
    cdef public long next_stream_id
    cdef public long highest_inbound_stream_id
    cdef public long local_initial_window
    cdef public long local_max_frame_size
    cdef public long local_max_concurrent_streams
    cdef public object unacked_settings
    cdef public long remote_initial_window
    cdef public long max_outbound_frame_size
    cdef public long remote_max_concurrent_streams
    cdef public long outbound_flow_control_window
    cdef public long inbound_flow_control_window
    cdef public object continued
    cdef public object blocks
