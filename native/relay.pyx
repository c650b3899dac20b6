# cython: language_level=3
"""Compiled twin of proxy/transport/relay_end.py (same class, same behaviour).

Typed attributes turn the byte counting and the peer lookups of the per-chunk
path into C; the write itself is still the transport's. Keep in step with the
pure module: the relay tests run against both.
"""

HOLD_LIMIT = 256 * 1024
READ_SIZE = 256 * 1024

cdef object _read_view = memoryview(bytearray(READ_SIZE))  # shared by every end (one loop per worker)


cdef class RelayEnd:
    cdef public object relay
    cdef public object transport
    cdef public RelayEnd peer
    cdef public list held
    cdef public Py_ssize_t held_size
    cdef public bint eof
    cdef public long long rx
    cdef public long long flushed_rx
    cdef public bint lost

    def __init__(self, relay):
        self.relay = relay
        self.transport = None
        self.peer = None
        self.held = None
        self.held_size = 0
        self.eof = False
        self.rx = 0
        self.flushed_rx = 0
        self.lost = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, bytes data):
        cdef Py_ssize_t n = len(data)
        self.rx += n
        cdef RelayEnd peer = self.peer
        if peer is not None:
            peer.transport.write(data)
            return
        if self.held is None:
            self.held = []
        self.held.append(data)
        self.held_size += n
        if self.held_size >= HOLD_LIMIT:
            self.transport.pause_reading()

    def get_buffer(self, sizehint):
        return _read_view

    def buffer_updated(self, Py_ssize_t nbytes):
        global _read_view
        view = _read_view
        cdef RelayEnd peer = self.peer
        if peer is not None:
            self.rx += nbytes
            transport = peer.transport
            transport.write(view[:nbytes])
            if transport.get_write_buffer_size():
                # The transport holds a view of what it could not send yet: lend it the buffer.
                _read_view = memoryview(bytearray(READ_SIZE))
            return
        self.data_received(bytes(view[:nbytes]))

    def eof_received(self):
        self.eof = True
        if self.peer is not None:
            self.peer.shutdown_write()
        self.relay.end_eof(self)
        return True

    def pause_writing(self):
        if self.peer is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self):
        if self.peer is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc):
        self.lost = True
        self.relay.end_lost(self, exc)

    def link(self, RelayEnd peer):
        self.peer = peer
        if self.held is not None:
            held_paused = self.held_size >= HOLD_LIMIT
            chunks = self.held
            self.held = None
            self.held_size = 0
            if held_paused and not self.lost:
                # Resume before replaying: if the replay fills the peer's buffer, its
                # pause_writing pauses us again and that pause must stand.
                self.transport.resume_reading()
            for chunk in chunks:
                peer.transport.write(chunk)
        if self.eof:
            peer.shutdown_write()

    def shutdown_write(self):
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            # A TLS transport cannot shut one direction: close it (after what it still has to
            # send) rather than leave the peer waiting for an end that never comes. Marked as
            # ended, so its loss reads as a clean close, not as a peer that vanished.
            self.eof = True
            transport.close()
