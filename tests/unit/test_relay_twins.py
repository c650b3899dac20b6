"""The opaque relay (proxy.transport.relay) over both RelayEnd twins, the pure
``proxy.transport.relay_end`` and the compiled ``proxy._native.relay``.

No event loop and no sockets: each end gets a FakeTransport that records what
the relay asks of it. ``Relay`` builds its ends from the module-level
``RelayEnd`` picked at import, so each test patches that name to the twin under
test. Time is passed to ``RelayTracker.sweep(now)``.
"""

from __future__ import annotations

import errno
import importlib
import sys
from typing import Any

import pytest

from proxy.transport import relay as relay_mod
from proxy.transport import relay_end
from proxy.transport.relay import Relay, RelayTracker


def _compiled() -> Any:
    try:
        return importlib.import_module("proxy._native.relay").RelayEnd
    except ImportError:
        return None


@pytest.fixture(params=["cython", "python"])
def end_cls(request, monkeypatch):
    """The RelayEnd twin under test, installed where Relay looks it up."""
    if request.param == "cython":
        cls = _compiled()
        if cls is None:
            pytest.fail("proxy._native.relay is not built; run `python setup.py build_ext --inplace`")
    else:
        cls = relay_end.RelayEnd
    monkeypatch.setattr(relay_mod, "RelayEnd", cls)
    return cls


def hold_limit(cls: Any) -> int:
    return sys.modules[cls.__module__].HOLD_LIMIT


class FakeTransport:
    """Records the calls an asyncio transport would get. With ``high_water`` set,
    a write that leaves more than that many bytes buffered calls the protocol's
    ``pause_writing`` once, as asyncio and uvloop do."""

    def __init__(self, high_water: int | None = None) -> None:
        self.protocol: Any = None
        self.chunks: list[bytes] = []
        self.calls: list[str] = []
        self.reading = True
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.high_water = high_water
        self.protocol_paused = False
        self.buffered = 0  # what get_write_buffer_size reports: > 0 = "I kept part of your data"
        self.views: list[Any] = []  # the objects written, as given (views of the caller's buffer)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, data: bytes) -> None:
        self.calls.append("write")
        self.views.append(data)
        self.chunks.append(bytes(data))
        if self.high_water is not None and not self.protocol_paused and len(self.data) > self.high_water:
            self.protocol_paused = True
            self.protocol.pause_writing()

    def write_eof(self) -> None:
        self.calls.append("write_eof")
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")
        self.reading = False

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")
        self.reading = True

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return None if name == "socket" else default

    def get_write_buffer_size(self) -> int:
        return self.buffered


class FakeCounter:
    def __init__(self) -> None:
        self.value = 0


class FakeTcpSeries:
    """What Relay uses of TcpSeries: ``read``/``write`` series and ``closed(errno)``."""

    def __init__(self) -> None:
        self.read = FakeCounter()
        self.write = FakeCounter()
        self.closed_with: list[str] = []

    def closed(self, errno: str) -> None:
        self.closed_with.append(errno)


class World:
    """A Relay with its client accepted and, after ``connect()``, its upstream up."""

    def __init__(self, idle_timeout: float = 3600.0, half_closed_timeout: float = 60.0, upstream_high_water: int | None = None):
        self.tracker = RelayTracker(idle_timeout, half_closed_timeout)
        self.src = FakeTcpSeries()
        self.dst = FakeTcpSeries()
        self.relay = Relay(self.tracker, self.src)
        self.client = self.relay.client
        self.client_t = FakeTransport()
        self.client_t.protocol = self.client
        self.client.connection_made(self.client_t)
        self.upstream: Any = None
        self.upstream_t = FakeTransport(upstream_high_water)

    def connect(self) -> World:
        self.upstream = self.relay.new_upstream()
        self.upstream_t.protocol = self.upstream
        self.upstream.connection_made(self.upstream_t)
        self.relay.connected(self.dst)
        return self


def connected() -> World:
    return World().connect()


# ------------------------------------------------------------------ the twins agree


def test_both_twins_hold_the_same_amount(end_cls):
    assert hold_limit(end_cls) == relay_end.HOLD_LIMIT == 256 * 1024


def test_relay_builds_its_ends_from_the_twin_under_test(end_cls):
    w = connected()
    assert type(w.client) is end_cls
    assert type(w.upstream) is end_cls


# ------------------------------------------------------------------ before the upstream is up


def test_bytes_before_link_are_replayed_in_order(end_cls):
    w = World()
    for chunk in (b"one ", b"two ", b"three"):
        w.client.data_received(chunk)
    assert w.upstream_t.chunks == []
    w.connect()
    assert w.upstream_t.chunks == [b"one ", b"two ", b"three"]


def test_reading_pauses_at_hold_limit_and_resumes_on_link(end_cls):
    limit = hold_limit(end_cls)
    w = World()
    w.client.data_received(b"a" * (limit - 1))
    assert w.client_t.reading is True
    w.client.data_received(b"b")
    assert w.client_t.reading is False
    w.connect()
    assert w.client_t.reading is True
    assert len(w.upstream_t.data) == limit


def test_eof_before_link_is_passed_on_at_link(end_cls):
    w = World()
    w.client.data_received(b"req")
    assert w.client.eof_received() is True
    assert w.upstream_t.eof_written is False
    w.connect()
    assert w.upstream_t.data == b"req"
    assert w.upstream_t.calls == ["write", "write_eof"]  # the held bytes, then the FIN


def test_client_lost_before_connect_finishes_relay(end_cls):
    w = World()
    w.client.connection_lost(None)
    assert w.relay.done is True
    assert w.tracker.live == set()
    assert w.src.closed_with == [""]


def test_connected_after_client_left_closes_the_upstream(end_cls):
    w = World()
    w.client.connection_lost(None)
    w.connect()
    assert w.upstream_t.closed is True


def test_backpressure_raised_by_the_replay_is_kept(end_cls):
    w = World(upstream_high_water=1024)
    w.client.data_received(b"x" * 4096)
    w.connect()
    assert w.upstream_t.protocol_paused is True  # the upstream's buffer is over the high-water mark
    assert w.client_t.reading is False  # ... so the client must stay paused until resume_writing


# ------------------------------------------------------------------ relaying


def test_data_after_link_goes_straight_to_the_peer(end_cls):
    w = connected()
    w.client.data_received(b"ping")
    w.upstream.data_received(b"pong")
    assert w.upstream_t.chunks == [b"ping"]
    assert w.client_t.chunks == [b"pong"]


def test_rx_counts_bytes_received_on_each_end(end_cls):
    w = World()
    w.client.data_received(b"12345")
    w.connect()
    w.client.data_received(b"678")
    w.upstream.data_received(b"ab")
    assert w.client.rx == 8
    assert w.upstream.rx == 2


def test_eof_returns_true_and_half_closes_the_peer(end_cls):
    w = connected()
    assert w.client.eof_received() is True
    assert w.upstream_t.eof_written is True
    assert w.upstream_t.closed is False
    assert w.client_t.closed is False
    w.upstream.data_received(b"still flowing")
    assert w.client_t.data == b"still flowing"


def test_pause_writing_on_one_end_pauses_reading_on_the_other(end_cls):
    w = connected()
    w.upstream.pause_writing()
    assert w.client_t.reading is False
    assert w.upstream_t.reading is True
    w.upstream.resume_writing()
    assert w.client_t.reading is True


def test_pause_writing_on_client_pauses_upstream_reading(end_cls):
    w = connected()
    w.client.pause_writing()
    assert w.upstream_t.reading is False
    w.client.resume_writing()
    assert w.upstream_t.reading is True


def test_both_eofs_close_both_ends(end_cls):
    w = connected()
    w.client.eof_received()
    assert not w.client_t.closed and not w.upstream_t.closed
    w.upstream.eof_received()
    assert w.client_t.closed is True
    assert w.upstream_t.closed is True
    assert not w.client_t.aborted and not w.upstream_t.aborted


def test_lost_with_error_resets_the_other_end(end_cls):
    w = connected()
    w.upstream.connection_lost(ConnectionResetError(errno.ECONNRESET, "reset by peer"))
    assert w.client_t.aborted is True
    assert w.relay.errno == "ECONNRESET"


def test_lost_without_eof_resets_the_other_end(end_cls):
    w = connected()
    w.client.connection_lost(None)
    assert w.upstream_t.aborted is True


def test_lost_after_eof_closes_the_other_end_cleanly(end_cls):
    w = connected()
    w.client.eof_received()
    w.client.connection_lost(None)
    assert w.upstream_t.closed is True
    assert w.upstream_t.aborted is False


def test_both_ends_lost_finishes_once_with_the_errno(end_cls):
    w = connected()
    w.upstream.connection_lost(ConnectionResetError(errno.ECONNRESET, "reset"))
    w.client.connection_lost(None)
    assert w.relay.done is True
    assert w.tracker.live == set()
    assert w.src.closed_with == ["ECONNRESET"]
    assert w.dst.closed_with == ["ECONNRESET"]


def test_fail_resets_the_client(end_cls):
    w = World()
    w.relay.fail("ECONNREFUSED")
    assert w.client_t.aborted is True
    assert w.relay.errno == "ECONNREFUSED"


# ------------------------------------------------------------------ counts


def test_flush_counts_adds_deltas_to_both_sides(end_cls):
    w = connected()
    w.client.data_received(b"x" * 10)
    w.upstream.data_received(b"y" * 4)
    w.relay.flush_counts()
    assert (w.src.read.value, w.src.write.value) == (10, 4)
    assert (w.dst.read.value, w.dst.write.value) == (4, 10)
    w.client.data_received(b"x" * 5)
    w.relay.flush_counts()
    w.relay.flush_counts()
    assert (w.src.read.value, w.src.write.value) == (15, 4)
    assert (w.dst.read.value, w.dst.write.value) == (4, 15)


def test_flush_counts_before_connect_counts_the_client_only(end_cls):
    w = World()
    w.client.data_received(b"abc")
    w.relay.flush_counts()
    assert (w.src.read.value, w.src.write.value) == (3, 0)
    assert w.dst.read.value == 0


def test_tracker_flush_counts_covers_every_live_relay(end_cls):
    a = connected()
    second_src = FakeTcpSeries()
    second = Relay(a.tracker, second_src)
    second.client.connection_made(FakeTransport())
    assert a.tracker.live == {a.relay, second}
    a.client.data_received(b"12")
    second.client.data_received(b"345")
    a.tracker.flush_counts()
    assert a.src.read.value == 2
    assert second_src.read.value == 3


def test_finish_flushes_the_last_counts(end_cls):
    w = connected()
    w.client.data_received(b"abcd")
    w.client.connection_lost(None)
    w.upstream.connection_lost(None)
    assert w.src.read.value == 4
    assert w.dst.write.value == 4


# ------------------------------------------------------------------ sweeping


def test_sweep_closes_a_relay_idle_for_idle_timeout(end_cls):
    w = World(idle_timeout=100, half_closed_timeout=10).connect()
    t0 = w.relay.last_change
    w.tracker.sweep(t0 + 99)
    assert not w.client_t.closed
    w.tracker.sweep(t0 + 100)
    assert w.client_t.closed and w.upstream_t.closed
    assert w.relay.errno == "timeout"


def test_sweep_closes_a_half_closed_relay_after_half_closed_timeout(end_cls):
    w = World(idle_timeout=100, half_closed_timeout=10).connect()
    t0 = w.relay.last_change
    w.client.eof_received()
    w.tracker.sweep(t0 + 9)
    assert not w.client_t.closed
    w.tracker.sweep(t0 + 10)
    assert w.client_t.closed and w.upstream_t.closed


def test_sweep_leaves_an_active_relay_open(end_cls):
    w = World(idle_timeout=100, half_closed_timeout=10).connect()
    t0 = w.relay.last_change
    for step in range(1, 6):
        w.client.data_received(b"tick")
        w.tracker.sweep(t0 + 60 * step)
    assert not w.client_t.closed and not w.upstream_t.closed
    assert w.relay.errno == ""


def test_sweep_leaves_an_active_half_closed_relay_open(end_cls):
    w = World(idle_timeout=100, half_closed_timeout=10).connect()
    t0 = w.relay.last_change
    w.client.eof_received()
    for step in range(1, 6):
        w.upstream.data_received(b"response part")
        w.tracker.sweep(t0 + 9 * step)
    assert not w.client_t.closed


def test_sweep_measures_idleness_from_the_last_bytes_seen(end_cls):
    w = World(idle_timeout=100, half_closed_timeout=10).connect()
    t0 = w.relay.last_change
    w.client.data_received(b"x")
    w.tracker.sweep(t0 + 50)  # sees the byte: the relay was active at t0+50
    w.tracker.sweep(t0 + 149)
    assert not w.client_t.closed
    w.tracker.sweep(t0 + 150)
    assert w.client_t.closed


# ------------------------------------------------------------------ buffered reads


def receive(end: Any, data: bytes) -> None:
    """What uvloop does for a protocol with get_buffer: read into its buffer, then tell it."""
    buf = end.get_buffer(-1)
    assert len(buf) >= len(data)
    buf[:len(data)] = data
    end.buffer_updated(len(data))


def test_buffered_reads_are_written_to_the_peer_and_counted(end_cls):
    w = connected()
    receive(w.client, b"ping")
    receive(w.upstream, b"ok")
    assert w.upstream_t.chunks == [b"ping"]
    assert w.client_t.chunks == [b"ok"]
    assert (w.client.rx, w.upstream.rx) == (4, 2)


def test_a_buffer_the_peer_keeps_is_lent_and_never_overwritten(end_cls):
    w = connected()
    w.upstream_t.buffered = 3  # the transport could not send everything: it keeps our view
    receive(w.client, b"first")
    kept = w.upstream_t.views[0]
    receive(w.client, b"XXXXXXXX")
    assert bytes(kept) == b"first"  # the next read went to another buffer
    assert w.client.get_buffer(-1) is not None


def test_a_buffer_sent_at_once_is_reused(end_cls):
    w = connected()
    first = w.client.get_buffer(-1)
    receive(w.client, b"sent")
    assert w.client.get_buffer(-1) is first


def test_buffered_reads_before_link_are_held_as_copies(end_cls):
    w = World()
    receive(w.client, b"early ")
    receive(w.client, b"bytes")
    w.connect()
    assert w.upstream_t.chunks == [b"early ", b"bytes"]
    assert w.client.rx == 11
