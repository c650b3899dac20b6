"""The HTTP/2 core (proxy.http.h2core) over both twins, without sockets.

A client and a server ``Connection`` are paired in memory (bytes out of one go
into the other), and each is also paired with the python-hyper ``h2`` library
as an independent peer.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from proxy.http import h2core as pure_h2core

h2_config = pytest.importorskip("h2.config")
h2_connection = pytest.importorskip("h2.connection")
h2_events = pytest.importorskip("h2.events")


@pytest.fixture(params=["cython", "python"])
def core(request):
    if request.param == "python":
        return pure_h2core
    try:
        return importlib.import_module("proxy._native.h2core")
    except ImportError:
        pytest.fail("proxy._native.h2core is not built; run `python setup.py build_ext --inplace`")


REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"), (b":authority", b"example")]


def move(src: Any, dst: Any) -> list[Any]:
    """Everything ``src`` queued, received by ``dst``: its events."""
    return dst.receive_data(src.data_to_send())


def pair(core: Any, **server_settings: int) -> tuple[Any, Any]:
    client = core.Connection(client_side=True)
    server = core.Connection(client_side=False, validate_requests=True)
    client.initiate_connection()
    server.initiate_connection(server_settings or None)
    move(client, server)
    move(server, client)
    move(client, server)  # the SETTINGS ACKs
    return client, server


def kinds(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


# ---------------------------------------------------------------- exchanges


def test_request_response_with_body_and_trailers(core):
    client, server = pair(core)
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, REQUEST + [(b"te", b"trailers")])
    client.send_data(sid, b"hello", end_stream=True)
    events = move(client, server)
    assert kinds(events) == ["RequestReceived", "DataReceived"]
    assert list(events[0].headers) == REQUEST + [(b"te", b"trailers")] and not events[0].stream_ended
    assert events[1].data == b"hello" and events[1].stream_ended and events[1].flow_controlled_length == 5
    server.send_headers(sid, [(b":status", b"103")])
    server.send_headers(sid, [(b":status", b"200")])
    server.send_data(sid, b"world")
    server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    events = move(server, client)
    assert kinds(events) == ["InformationalResponseReceived", "ResponseReceived", "DataReceived", "TrailersReceived"]
    assert list(events[1].headers) == [(b":status", b"200")] and not events[1].stream_ended
    assert list(events[3].headers) == [(b"grpc-status", b"0")]
    assert not client.streams and not server.streams
    assert client.get_next_available_stream_id() == sid + 2


def test_headers_only_response_and_stream_ids(core):
    client, server = pair(core)
    for sid in (1, 3, 5):
        assert client.get_next_available_stream_id() == sid
        client.send_headers(sid, REQUEST, end_stream=True)
        (req,) = move(client, server)
        assert req.stream_id == sid and req.stream_ended
        server.send_headers(sid, [(b":status", b"204")], end_stream=True)
        (resp,) = move(server, client)
        assert resp.stream_ended and type(resp).__name__ == "ResponseReceived"
    assert server.highest_inbound_stream_id == 5
    with pytest.raises(core.StreamClosedError):
        server.send_data(5, b"late")


def test_large_header_block_uses_continuation(core):
    client, server = pair(core)
    big = [(b"x-big", b"v" * 40000)]
    client.send_headers(1, REQUEST + big, end_stream=True)
    wire = client.data_to_send()
    assert wire[3] == core.HEADERS and wire.count(bytes((core.CONTINUATION,))) >= 2
    (req,) = server.receive_data(wire)
    assert list(req.headers) == REQUEST + big


def test_frames_split_across_reads(core):
    client, server = pair(core)
    client.send_headers(1, REQUEST)
    client.send_data(1, b"abc" * 1000, end_stream=True)
    wire = client.data_to_send()
    events = []
    for i in range(0, len(wire), 7):
        events += server.receive_data(wire[i:i + 7])
    assert kinds(events)[0] == "RequestReceived"
    assert b"".join(e.data for e in events[1:]) == b"abc" * 1000 and events[-1].stream_ended


# ---------------------------------------------------------------- flow control and settings


def test_windows_and_acknowledgements(core):
    client, server = pair(core)
    client.send_headers(1, REQUEST)
    move(client, server)
    assert client.local_flow_control_window(1) == core.DEFAULT_WINDOW
    for _ in range(3):
        client.send_data(1, b"x" * 16384)
    client.send_data(1, b"x" * (core.DEFAULT_WINDOW - 3 * 16384))
    assert client.local_flow_control_window(1) == 0
    with pytest.raises(core.FlowControlError):
        client.send_data(1, b"x")
    events = move(client, server)
    assert sum(e.flow_controlled_length for e in events) == core.DEFAULT_WINDOW
    assert server.inbound_flow_control_window == 0
    # A small acknowledgement is held back; half a window sends one WINDOW_UPDATE.
    server.acknowledge_received_data(1000, 1)
    assert server.data_to_send() == b""
    server.acknowledge_received_data(40000, 1)
    server.increment_flow_control_window(core.DEFAULT_WINDOW)
    events = move(server, client)
    assert sorted((e.stream_id, e.delta) for e in events) == [(0, core.DEFAULT_WINDOW), (1, 41000)]
    assert client.local_flow_control_window(1) == 41000


def test_data_past_the_window_is_a_stream_error(core):
    client, server = pair(core)
    client.send_headers(1, REQUEST)
    move(client, server)
    client.streams[1].send_window += 10  # a client that ignores our window
    client.outbound_flow_control_window += 10
    client.send_data(1, b"x" * 16384)
    client.send_data(1, b"x" * 16384)
    client.send_data(1, b"x" * 16384)
    client.send_data(1, b"x" * 16384)
    client.send_data(1, b"x" * (core.DEFAULT_WINDOW - 4 * 16384 + 10))
    with pytest.raises(core.ProtocolError, match="FLOW_CONTROL_ERROR"):
        move(client, server)  # the connection window is exceeded first


def test_settings_change_windows_frame_size_and_stream_limit(core):
    client = core.Connection(client_side=True)
    server = core.Connection(client_side=False)
    client.initiate_connection()
    server.initiate_connection({core.MAX_CONCURRENT_STREAMS: 1, core.INITIAL_WINDOW_SIZE: 1 << 20,
                                core.MAX_FRAME_SIZE: 32768})
    move(client, server)
    events = move(server, client)
    changed = [e for e in events if type(e).__name__ == "RemoteSettingsChanged"][0].changed_settings
    assert changed[core.MAX_CONCURRENT_STREAMS] == 1 and client.max_outbound_frame_size == 32768
    move(client, server)
    assert server.local_initial_window == 1 << 20 and server.local_max_frame_size == 32768
    client.send_headers(1, REQUEST)
    assert client.local_flow_control_window(1) == core.DEFAULT_WINDOW  # the connection window still binds
    assert client.streams[1].send_window == 1 << 20
    with pytest.raises(core.TooManyStreamsError):
        client.send_headers(3, REQUEST)


def test_over_the_stream_limit_is_refused(core):
    client, server = pair(core)
    server.update_settings({core.MAX_CONCURRENT_STREAMS: 1})
    move(server, client)
    move(client, server)  # ACK: the limit applies
    client.remote_max_concurrent_streams = 10  # a client that ignores it
    client.send_headers(1, REQUEST)
    client.send_headers(3, REQUEST)
    events = move(client, server)
    assert [e.stream_id for e in events] == [1]
    (reset,) = move(server, client)
    assert (reset.stream_id, reset.error_code) == (3, core.REFUSED_STREAM)


# ---------------------------------------------------------------- resets, pings, GOAWAY


def test_resets_both_ways(core):
    client, server = pair(core)
    client.send_headers(1, REQUEST)
    client.send_headers(3, REQUEST)
    move(client, server)
    client.reset_stream(1, core.CANCEL)
    (event,) = move(client, server)
    assert (event.stream_id, event.error_code, event.remote_reset) == (1, core.CANCEL, True)
    server.reset_stream(3, core.REFUSED_STREAM)
    (event,) = move(server, client)
    assert (event.stream_id, event.error_code) == (3, core.REFUSED_STREAM)
    assert not client.streams and not server.streams
    with pytest.raises(core.StreamClosedError):
        server.reset_stream(3, core.CANCEL)
    # Frames that cross a reset are ignored, not errors.
    client.send_headers(5, REQUEST)
    move(client, server)
    server.reset_stream(5, core.CANCEL)
    client.send_data(5, b"late", end_stream=True)
    assert move(client, server) == []
    assert server.inbound_flow_control_window == core.DEFAULT_WINDOW - 4  # still counted


def test_ping_and_goaway_keep_the_connection(core):
    client, server = pair(core)
    client.send_headers(1, REQUEST, end_stream=True)
    move(client, server)
    server.ping(b"12345678")
    move(server, client)  # the client answers
    (ack,) = move(client, server)
    assert ack.ping_data == b"12345678"
    server.close_connection()
    (goaway,) = move(server, client)
    assert (goaway.error_code, goaway.last_stream_id, goaway.additional_data) == (core.NO_ERROR, 1, None)
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    (resp,) = move(server, client)  # stream 1 still finishes
    assert resp.stream_ended


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize("fields", [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],  # no :path
    REQUEST + [(b"X-Upper", b"1")],
    REQUEST + [(b"connection", b"close")],
    REQUEST + [(b"te", b"gzip")],
    REQUEST + [(b"x-a", b"1\r\nx-b: 2")],
    REQUEST + [(b"x-a", b" padded")],
    [(b":method", b"GET"), (b"x-a", b"1"), (b":scheme", b"http"), (b":path", b"/")],  # pseudo after regular
    REQUEST + [(b":path", b"/again")],
    REQUEST + [(b":status", b"200")],
    REQUEST + [(b"host", b"other")],
    REQUEST + [(b"content-length", b"x")],
])
def test_malformed_request_resets_the_stream_only(core, fields):
    client, server = pair(core)
    client.send_headers(1, fields, end_stream=True)
    assert move(client, server) == []
    (reset,) = move(server, client)
    assert (reset.stream_id, reset.error_code) == (1, core.PROTOCOL_ERROR)
    client.send_headers(3, REQUEST, end_stream=True)
    (req,) = move(client, server)  # the connection goes on
    assert req.stream_id == 3


def test_body_must_match_content_length(core):
    client, server = pair(core)
    client.send_headers(1, REQUEST + [(b"content-length", b"3")])
    client.send_data(1, b"abcd", end_stream=True)
    events = move(client, server)
    assert kinds(events) == ["RequestReceived", "StreamReset"] and events[1].error_code == core.PROTOCOL_ERROR
    client.send_headers(3, REQUEST + [(b"content-length", b"3")])
    client.send_data(3, b"ab", end_stream=True)
    assert kinds(move(client, server)) == ["RequestReceived", "StreamReset"]
    client.send_headers(5, REQUEST + [(b"content-length", b"3")])
    client.send_data(5, b"abc", end_stream=True)
    assert kinds(move(client, server)) == ["RequestReceived", "DataReceived"]


@pytest.mark.parametrize("wire, code", [
    (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, "PROTOCOL_ERROR"),  # not a preface
    (pure_h2core.PREFACE + pure_h2core.frame(pure_h2core.DATA, 0, 0, b"x"), "PROTOCOL_ERROR"),
    (pure_h2core.PREFACE + pure_h2core.frame(pure_h2core.PING, 0, 0, b"short"), "FRAME_SIZE_ERROR"),
    (pure_h2core.PREFACE + b"\x00\x40\x01" + b"\x00" * 6, "FRAME_SIZE_ERROR"),  # 16 KiB + 1 frame
    (pure_h2core.PREFACE + pure_h2core.frame(pure_h2core.HEADERS, 5, 1, b"\x80"), "COMPRESSION_ERROR"),
    (pure_h2core.PREFACE + pure_h2core.frame(pure_h2core.HEADERS, 5, 2, b"\x82"), "PROTOCOL_ERROR"),  # even id
    (pure_h2core.PREFACE + pure_h2core.frame(pure_h2core.HEADERS, 1, 1, b"\x82")
     + pure_h2core.frame(pure_h2core.PING, 0, 0, b"12345678"), "PROTOCOL_ERROR"),  # interrupted block
    (pure_h2core.PREFACE + pure_h2core.frame(pure_h2core.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"), "PROTOCOL_ERROR"),
    (pure_h2core.PREFACE + pure_h2core.frame(pure_h2core.SETTINGS, 0, 0, b"\x00\x05\x00\x00\x00\x01"),
     "PROTOCOL_ERROR"),  # MAX_FRAME_SIZE 1
])
def test_connection_errors_queue_goaway(core, wire, code):
    server = core.Connection(client_side=False, validate_requests=True)
    server.initiate_connection()
    server.data_to_send()
    with pytest.raises(core.ProtocolError, match=code):
        server.receive_data(wire)
    out = server.data_to_send()
    assert out[3] == core.GOAWAY
    assert int.from_bytes(out[13:17], "big") == getattr(core, code)


# ---------------------------------------------------------------- against the h2 library


def h2_peer(client_side: bool) -> Any:
    conn = h2_connection.H2Connection(h2_config.H2Configuration(client_side=client_side, header_encoding=None))
    conn.initiate_connection()
    return conn


def test_our_server_with_the_h2_client(core):
    them = h2_peer(True)
    us = core.Connection(client_side=False, validate_requests=True)
    us.initiate_connection()
    us.receive_data(them.data_to_send())
    them.receive_data(us.data_to_send())
    us.receive_data(them.data_to_send())
    them.send_headers(1, REQUEST + [(b"user-agent", b"h2")])
    them.send_data(1, b"padded body", pad_length=20, end_stream=True)
    events = us.receive_data(them.data_to_send())
    assert kinds(events) == ["RequestReceived", "DataReceived"]
    assert events[1].data == b"padded body" and events[1].flow_controlled_length == len(b"padded body") + 21
    us.send_headers(1, [(b":status", b"200"), (b"x-a", b"1")])
    us.send_data(1, b"ok")
    us.send_headers(1, [(b"x-trailer", b"yes")], end_stream=True)
    got = them.receive_data(us.data_to_send())
    names = [type(e).__name__ for e in got]
    assert names == ["ResponseReceived", "DataReceived", "TrailersReceived", "StreamEnded"]
    assert [tuple(h) for h in got[0].headers] == [(b":status", b"200"), (b"x-a", b"1")]


def test_our_client_with_the_h2_server(core):
    them = h2_peer(False)
    us = core.Connection(client_side=True)
    us.initiate_connection({core.INITIAL_WINDOW_SIZE: 200000})
    them.receive_data(us.data_to_send())
    us.receive_data(them.data_to_send())
    them.receive_data(us.data_to_send())
    us.send_headers(1, REQUEST, end_stream=True)
    (req, ended) = them.receive_data(us.data_to_send())
    assert isinstance(req, h2_events.RequestReceived) and isinstance(ended, h2_events.StreamEnded)
    them.send_headers(1, [(b":status", b"200")])
    for _ in range(3):
        them.send_data(1, b"x" * 16000)
    them.send_data(1, b"x" * 10000, end_stream=True)
    events = us.receive_data(them.data_to_send())
    assert kinds(events)[0] == "ResponseReceived"
    assert sum(len(e.data) for e in events[1:]) == 58000 and events[-1].stream_ended


def test_repeated_blocks_decode_right_as_the_table_changes(core):
    # The server remembers blocks that changed no table; the client here indexes
    # every new field, so repeats of one request are index-only blocks.
    client, server = pair(core)
    heads = [REQUEST + [(b"x-n", b"1")], REQUEST + [(b"x-n", b"1")], REQUEST + [(b"x-n", b"1")],
             REQUEST + [(b"x-n", b"2")], REQUEST + [(b"x-n", b"1")], REQUEST + [(b"x-n", b"1")]]
    for n, head in enumerate(heads):
        sid = 2 * n + 1
        client.send_headers(sid, head, end_stream=True)
        (req,) = move(client, server)
        assert list(req.headers) == head
        assert isinstance(req.headers, tuple)  # shared with the block cache: nobody may change it
    bad = REQUEST + [(b"connection", b"close")]
    for sid in (13, 15):  # a malformed head repeated is refused each time
        client.send_headers(sid, bad, end_stream=True)
        assert move(client, server) == []
        (reset,) = move(server, client)
        assert reset.error_code == core.PROTOCOL_ERROR


def test_repeated_blocks_that_index_every_field_replay_their_insertions(core):
    # nginx's way: every response field sent as a literal to index, never
    # referred to afterwards. The client remembers the block; a repeat must
    # still grow the table exactly as decoding it would.
    client = core.Connection(client_side=True)
    client.initiate_connection()
    reference = pure_h2core.hpack.Decoder()
    block = bytes((0x88, 0x40 | 54, 5)) + b"nginx" + bytes((0x40 | 33, 3)) + b"now"  # :status 200, server, date
    for sid in (1, 3, 5):
        client.send_headers(sid, REQUEST, end_stream=True)
        (resp,) = client.receive_data(core.frame(core.HEADERS, core.END_HEADERS | core.END_STREAM, sid, block))
        assert list(resp.headers) == reference.decode(block) == [(b":status", b"200"), (b"server", b"nginx"), (b"date", b"now")]
        assert list(client.decoder.table) == list(reference.table)
    client.send_headers(7, REQUEST, end_stream=True)
    indexed = bytes((0x88, 0x80 | 62, 0x80 | 63))  # the newest entry (date) then server
    (resp,) = client.receive_data(core.frame(core.HEADERS, core.END_HEADERS | core.END_STREAM, 7, indexed))
    assert list(resp.headers) == [(b":status", b"200"), (b"date", b"now"), (b"server", b"nginx")]
    assert client.decoder.table_size == reference.table_size == 3 * (len(b"servernginx") + len(b"datenow") + 64)
