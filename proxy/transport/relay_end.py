"""One socket of an opaque relay: the per-chunk hot path (pure-Python twin).

``native/relay.pyx`` is the compiled twin of this module, with the same class
and the same behaviour; ``proxy.native`` picks one. Keep the two in step: the
relay tests run against both.

Bytes received on one end are written straight to the other end's transport,
no copy and no task. Backpressure: when an end's transport reports its write
buffer above the high-water mark (``pause_writing``), the *other* end stops
reading until it drains (``resume_writing``); memory per connection is then
bounded by the transports' write buffers. Until the peer end exists (the
upstream is still connecting) received bytes are held, and reading pauses
once ``HOLD_LIMIT`` bytes are held.

Reads are buffered (``get_buffer``/``buffer_updated``; the transports pick
that path for any protocol with ``get_buffer``): the socket is read straight
into one buffer shared by every end of the worker, and a view of it is
written to the peer, so a chunk is never turned into a bytes object. The
transport's ``write`` sends what it can at once and keeps a reference to the
rest; when anything stays buffered after a write, the shared buffer is lent
to that transport and a fresh one takes its place.
"""

from __future__ import annotations

from typing import Any

HOLD_LIMIT = 256 * 1024  # bytes held while the upstream connects; one socket read's worth
READ_SIZE = 256 * 1024  # bytes per socket read: uvloop's own read size, and 16 TLS records

_read_view = memoryview(bytearray(READ_SIZE))  # the shared read buffer (one event loop per worker)


class RelayEnd:
    __slots__ = ("relay", "transport", "peer", "held", "held_size", "eof", "rx", "flushed_rx", "lost")

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.transport: Any = None
        self.peer: RelayEnd | None = None
        self.held: list[bytes] | None = None
        self.held_size = 0
        self.eof = False
        self.rx = 0  # bytes received on this socket
        self.flushed_rx = 0  # part of rx already added to the metrics
        self.lost = False

    # -- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.rx += len(data)
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)
            return
        if self.held is None:
            self.held = []
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size >= HOLD_LIMIT:
            self.transport.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _read_view

    def buffer_updated(self, nbytes: int) -> None:
        global _read_view
        view = _read_view
        peer = self.peer
        if peer is not None:
            self.rx += nbytes
            transport = peer.transport
            transport.write(view[:nbytes])
            if transport.get_write_buffer_size():
                # The transport holds a view of what it could not send yet: lend it the buffer.
                _read_view = memoryview(bytearray(READ_SIZE))
            return
        self.data_received(bytes(view[:nbytes]))

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None:
            self.peer.shutdown_write()
        self.relay.end_eof(self)
        return True  # keep our write side open: this is a half-close, not a close

    def pause_writing(self) -> None:
        if self.peer is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.relay.end_lost(self, exc)

    # -- used by the relay
    def link(self, peer: RelayEnd) -> None:
        """Start relaying to ``peer``: pass on what was held, and an EOF already seen."""
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

    def shutdown_write(self) -> None:
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
