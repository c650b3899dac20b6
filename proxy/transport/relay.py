"""Opaque TCP relay: two sockets joined byte for byte, with half-close.

Theory of operation: a ``Relay`` owns two ``RelayEnd`` protocols (the accepted
client socket and the upstream socket). The per-chunk work is in RelayEnd (see
relay_end.py and its compiled twin); the Relay only sees rare events:

* EOF on one end is passed on as ``shutdown(SHUT_WR)`` on the other, whose
  other direction keeps flowing. Once both ends have sent EOF, both sockets
  are closed (each after flushing what it still has to write).
* An end lost with an error (reset, broken pipe) resets the other end, so a
  dropped peer is visible as a reset rather than a clean, truncated stream.
* A ``RelayTracker`` per worker holds the live relays. It flushes their byte
  counts into the metrics before each scrape, closes relays that were idle for
  the idle timeout or half-closed and idle for the half-closed timeout, and
  tells the drain when the last relay is gone.
"""

from __future__ import annotations

import asyncio
import errno as errno_names
import socket
import struct
import time
from typing import Any

from proxy.native import load

_twin, IMPLEMENTATION = load("relay", "proxy.transport.relay_end")
RelayEnd: Any = _twin.RelayEnd

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def reset(transport: Any) -> None:
    """Close with a TCP reset, discarding unsent bytes."""
    if transport is None or transport.is_closing():
        if transport is not None:
            transport.abort()
        return
    sock = transport.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    transport.abort()


class _TcpSeriesSet:
    """The four series of one label set, looked up once and shared by its connections."""

    __slots__ = ("open_total", "open_now", "read", "write", "clean_close")

    def __init__(self, metrics: Any, labels: tuple[Any, ...]) -> None:
        self.open_total = metrics.tcp_open_total.labels(*labels)
        self.open_now = metrics.tcp_open_connections.labels(*labels)
        self.read = metrics.tcp_read_bytes_total.labels(*labels)
        self.write = metrics.tcp_write_bytes_total.labels(*labels)
        self.clean_close = metrics.tcp_close_total.labels(*labels, "")


_SERIES_CACHE: dict[tuple[int, tuple[Any, ...]], _TcpSeriesSet] = {}
_SERIES_CACHE_MAX = 4096  # bounded: label values come from addresses, which churn


class TcpSeries:
    """The metric series of one side of a connection (server side or client side)."""

    __slots__ = ("open_total", "open_now", "read", "write", "close_family", "labels", "clean_close")

    def __init__(self, metrics: Any, labels: tuple[Any, ...]) -> None:
        key = (id(metrics), labels)
        found = _SERIES_CACHE.get(key)
        if found is None or found.open_total is not metrics.tcp_open_total.series.get(labels):
            if len(_SERIES_CACHE) >= _SERIES_CACHE_MAX:
                _SERIES_CACHE.clear()
            found = _SERIES_CACHE[key] = _TcpSeriesSet(metrics, labels)
        self.labels = labels
        self.open_total = found.open_total
        self.open_now = found.open_now
        self.read = found.read
        self.write = found.write
        self.clean_close = found.clean_close
        self.close_family = metrics.tcp_close_total
        self.open_total.value += 1
        self.open_now.value += 1

    def closed(self, errno: str) -> None:
        self.open_now.value -= 1
        if not errno:
            self.clean_close.value += 1
        else:
            self.close_family.labels(*self.labels, errno).value += 1


class Relay:
    __slots__ = ("client", "upstream", "tracker", "src", "dst", "errno", "done", "connect_task", "last_total", "last_change", "balance")

    def __init__(self, tracker: RelayTracker, src: TcpSeries) -> None:
        self.client = RelayEnd(self)
        self.upstream: Any = None
        self.tracker = tracker
        self.src = src
        self.dst: TcpSeries | None = None
        self.errno = ""
        self.done = False
        self.connect_task: asyncio.Task[Any] | None = None
        self.last_total = 0
        self.last_change = time.monotonic()
        self.balance: tuple[Any, float, float] | None = None  # (endpoint, load handle, RTT sample) when balanced
        tracker.live.add(self)

    def new_upstream(self) -> Any:
        self.upstream = RelayEnd(self)
        return self.upstream

    def connected(self, dst: TcpSeries) -> None:
        """The upstream socket is up: start relaying both ways."""
        self.dst = dst
        if self.client.lost:
            self.upstream.transport.close()
            return
        self.upstream.link(self.client)
        self.client.link(self.upstream)

    def fail(self, reason: str) -> None:
        """The upstream could not be reached: reset the client."""
        self.errno = reason
        if not self.client.lost:
            reset(self.client.transport)
        else:
            self.finish()

    # -- events from the ends
    def end_eof(self, end: Any) -> None:
        upstream = self.upstream
        if self.client.eof and upstream is not None and upstream.eof:
            self.close()

    def end_lost(self, end: Any, exc: BaseException | None) -> None:
        other = self.upstream if end is self.client else self.client
        if exc is not None and not self.errno:
            code = getattr(exc, "errno", None)
            self.errno = errno_names.errorcode.get(code, "") if code else ""
        if other is not None and not other.lost:
            if exc is not None or not end.eof:
                reset(other.transport)  # the peer vanished mid-stream: say so with a reset
            else:
                other.transport.close()
        if end is self.client and self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
        if self.client.lost and (self.upstream is None or self.upstream.lost or self.upstream.transport is None):
            self.finish()

    def close(self) -> None:
        for end in (self.client, self.upstream):
            if end is not None and end.transport is not None and not end.lost:
                end.transport.close()

    def flush_counts(self) -> None:
        client, upstream = self.client, self.upstream
        delta_in = client.rx - client.flushed_rx
        client.flushed_rx = client.rx
        self.src.read.value += delta_in
        delta_out = 0
        if upstream is not None:
            delta_out = upstream.rx - upstream.flushed_rx
            upstream.flushed_rx = upstream.rx
            self.src.write.value += delta_out
        if self.dst is not None:
            self.dst.read.value += delta_out
            self.dst.write.value += delta_in

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if self.balance is not None:
            ep, handle, rtt = self.balance
            self.balance = None
            ep.load.complete(handle, time.monotonic(), rtt=rtt if rtt > 0 else None)  # loop.time() is monotonic too
        self.flush_counts()
        self.src.closed(self.errno)
        if self.dst is not None:
            self.dst.closed(self.errno)
        self.tracker.removed(self)


def join(tracker: RelayTracker, src: TcpSeries, client: Any, upstream: Any, to_upstream: bytes, to_client: bytes) -> Relay:
    """Relay two transports that are already connected (after an HTTP upgrade or CONNECT)."""
    relay = Relay(tracker, src)
    relay.new_upstream()
    for end, transport in ((relay.client, client), (relay.upstream, upstream)):
        transport.set_protocol(end)
        end.connection_made(transport)
    relay.upstream.link(relay.client)
    relay.client.link(relay.upstream)
    # Resume first, write second: a write that fills a buffer pauses the other side again.
    client.resume_reading()
    upstream.resume_reading()
    if to_upstream:
        upstream.write(to_upstream)
    if to_client:
        client.write(to_client)
    return relay


class RelayTracker:
    """The live relays of one worker."""

    def __init__(self, idle_timeout: float, half_closed_timeout: float) -> None:
        self.live: set[Relay] = set()
        self.idle_timeout = idle_timeout
        self.half_closed_timeout = half_closed_timeout
        self._empty: asyncio.Event | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def removed(self, relay: Relay) -> None:
        self.live.discard(relay)
        if not self.live and self._empty is not None:
            self._empty.set()

    def flush_counts(self) -> None:
        for relay in self.live:
            relay.flush_counts()

    async def wait_empty(self) -> None:
        if not self.live:
            return
        self._empty = asyncio.Event()
        await self._empty.wait()

    async def _sweep_forever(self) -> None:
        # The timeouts are checked by one sweep, not by a timer per chunk:
        # the hot path then pays nothing for them.
        interval = max(0.2, min(5.0, min(self.idle_timeout, self.half_closed_timeout) / 10))
        while True:
            await asyncio.sleep(interval)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        for relay in list(self.live):
            upstream = relay.upstream
            total = relay.client.rx + (upstream.rx if upstream is not None else 0)
            if total != relay.last_total:
                relay.last_total = total
                relay.last_change = now
                continue
            idle = now - relay.last_change
            half_closed = relay.client.eof or (upstream is not None and upstream.eof)
            if idle >= self.idle_timeout or (half_closed and idle >= self.half_closed_timeout):
                relay.errno = "timeout" if not relay.errno else relay.errno
                relay.close()

