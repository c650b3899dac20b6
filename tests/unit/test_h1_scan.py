"""The head scanner (proxy.core.h1scan and its compiled twin native/h1scan.pyx) against
each other and against llhttp, and the parsers of proxy.core.h1 with and without it.

No sockets: bytes in, results or parser events out. The scanner may decline anything
(the caller then uses llhttp), but what it accepts must be exactly what llhttp reports.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

import httptools
import pytest

from proxy.core import h1, h1scan

MAX = 64 * 1024

REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"GET /a/b?c=d&e=%20f HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nhost: x\r\nConnection: keep-alive\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:   spaced  \r\nX-Empty:\r\nX-Tab:\tv\t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nKeep-Alive: 5\r\nTE: trailers\r\nConnection: TE, Keep-Alive, X-Foo\r\nX-Foo: 1\r\n\r\n",
    b"OPTIONS /o HTTP/1.1\r\nHost: x\r\nl5d-dst-override: svc.ns:80\r\nl5d-require-id: a.b\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    # Declined: the full parser decides.
    b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
    b"PUT / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
    b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /#frag HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r",
    b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
]

RESPONSES = [
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc",
    b"HTTP/1.1 503 \r\nContent-Length: 1\r\nX-A:  v \r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close, X-Gone\r\nX-Gone: 1\r\n\r\nok",
    # Declined.
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\no",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1 \r\n\r\nx",
    b"HTTP/1.1 20x OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 O\x01K\r\nContent-Length: 0\r\n\r\n",
]


def _compiled() -> Any:
    try:
        return importlib.import_module("proxy._native.h1scan")
    except ImportError:
        pytest.fail("proxy._native.h1scan is not built; run `python setup.py build_ext --inplace`")


@pytest.fixture(params=["cython", "python"])
def scan(request: Any) -> Any:
    return _compiled() if request.param == "cython" else h1scan


class Recorder:
    """What llhttp reports through httptools, or the error it raises."""

    def __init__(self) -> None:
        self.url = b""
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def _llhttp_request(data: bytes) -> tuple[Recorder, Any]:
    rec = Recorder()
    parser = httptools.HttpRequestParser(rec)
    parser.feed_data(data)
    return rec, parser


def _llhttp_response(data: bytes) -> tuple[Recorder, Any]:
    rec = Recorder()
    parser = httptools.HttpResponseParser(rec)
    parser.feed_data(data)
    return rec, parser


def _check_request(scan: Any, data: bytes) -> Any:
    got = scan.scan_request(data, MAX)
    assert got == h1scan.scan_request(data, MAX), data  # the twins agree
    if got is not None:
        method, target, headers, length, connection = got
        rec, parser = _llhttp_request(data)
        assert rec.complete == 1 and not rec.body
        assert (parser.get_method(), rec.url, parser.get_http_version(), rec.headers) == (method, target, "1.1", headers)
        assert h1scan.framing(headers) == (False, length, connection, False)
    return got


def _check_response(scan: Any, data: bytes) -> Any:
    got = scan.scan_response(data, MAX)
    assert got == h1scan.scan_response(data, MAX), data
    if got is not None:
        status, reason, version, headers, length, connection, body = got
        rec, parser = _llhttp_response(data)
        assert rec.complete == 1
        assert (parser.get_status_code(), rec.reason, parser.get_http_version().encode(), rec.headers) == (status, reason, version, headers)
        assert rec.body == data[body:] and len(rec.body) == length
        assert h1scan.framing(headers) == (False, length, connection, False)
    return got


def test_requests_accepted_are_what_llhttp_reports(scan: Any) -> None:
    accepted = [data for data in REQUESTS if _check_request(scan, data) is not None]
    assert accepted == REQUESTS[:8]


def test_responses_accepted_are_what_llhttp_reports(scan: Any) -> None:
    accepted = [data for data in RESPONSES if _check_response(scan, data) is not None]
    assert accepted == RESPONSES[:5]


def test_heads_over_the_limit_are_left_to_the_parser(scan: Any) -> None:
    assert scan.scan_request(REQUESTS[0], len(REQUESTS[0]) - 1) is None
    assert scan.scan_response(RESPONSES[1], len(RESPONSES[1]) - 1) is None


def _mutations(corpus: list[bytes], rounds: int) -> list[bytes]:
    """Seeded byte flips, insertions and cuts of the accepted messages."""
    rng = random.Random(1234)
    alphabet = b"\r\n :\t\x00\x7f\x80aZ09-/,;\"()"
    out = []
    for _ in range(rounds):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[i] = rng.choice(alphabet)
            elif op == 1:
                data.insert(i, rng.choice(alphabet))
            else:
                del data[i]
        out.append(bytes(data))
    return out


def test_mutated_requests_never_differ_from_llhttp(scan: Any) -> None:
    for data in _mutations(REQUESTS[:8], 3000):
        try:
            _check_request(scan, data)
        except httptools.HttpParserError:
            pytest.fail(f"scanner accepted what llhttp rejects: {data!r}")


def test_mutated_responses_never_differ_from_llhttp(scan: Any) -> None:
    for data in _mutations(RESPONSES[:5], 3000):
        try:
            _check_response(scan, data)
        except httptools.HttpParserError:
            pytest.fail(f"scanner accepted what llhttp rejects: {data!r}")


HEADER_LISTS = [
    [],
    [(b"Host", b"x"), (b"Content-Length", b"12"), (b"X-A", b"b")],
    [(b"Transfer-Encoding", b"gzip, Chunked "), (b"Connection", b"Upgrade, Keep-Alive"), (b"Upgrade", b"websocket")],
    [(b"connection", b" Foo ,close, , X-Bar\t"), (b"foo", b"1"), (b"X-BAR", b"2"), (b"Keep-Alive", b"5"), (b"x-baz", b"3"),
     (b"TE", b"x"), (b"Upgrade", b"y"), (b"Proxy-Connection", b"z"), (b"Trailer", b"t"), (b"close", b"c")],
    [[b"Host", b"list items"], (b"CONNECTION", b"x-y"), (b"X-Y", b"1")],
]


def test_header_passes_agree_with_the_pure_twin(scan: Any) -> None:
    for headers in HEADER_LISTS:
        assert scan.framing(list(headers)) == h1scan.framing(list(headers))
        assert [tuple(h) for h in scan.forwardable(list(headers))] == [tuple(h) for h in h1scan.forwardable(list(headers))]
        assert scan.forwardable(headers, upgrade=True) is headers
        assert scan.encode_head(b"GET / HTTP/1.1", list(headers)) == h1scan.encode_head(b"GET / HTTP/1.1", list(headers))
    assert scan.forwardable(HEADER_LISTS[3]) == [(b"x-baz", b"3")]
    assert scan.encode_head(b"HTTP/1.1 200 OK", [(b"A", b"1")]) == b"HTTP/1.1 200 OK\r\nA: 1\r\n\r\n"
    with pytest.raises(ValueError):
        scan.framing([(b"Content-Length", b"x")])


# ---------------------------------------------------------------- the parsers with the scanner in front


class Events:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def on_head(self, head: Any) -> None:
        fields = [getattr(head, k) for k in ("method", "target", "status", "reason") if hasattr(head, k)]
        self.events.append(("head", *fields, head.version, head.headers, head.chunked, head.content_length, head.keep_alive))

    def on_body(self, chunk: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + chunk)
        else:
            self.events.append(("body", chunk))

    def on_end(self) -> None:
        self.events.append(("end",))


def _request_events(chunks: list[bytes]) -> list[Any]:
    ev = Events()
    parser = h1.request_parser(ev, pure=False)
    for chunk in chunks:
        parser.feed(chunk)
    return ev.events


def _response_events(data: bytes, split: bool) -> list[Any]:
    ev = Events()
    parser = h1.response_parser(ev, b"GET", pure=False, forward_heads=True)  # whole: headers parsed on demand
    for chunk in ([data[i:i + 1] for i in range(len(data))] if split else [data]):
        parser.feed(chunk)
    return ev.events


@pytest.mark.parametrize("data", REQUESTS[:8])
def test_request_parser_reports_the_same_whole_or_byte_by_byte(data: bytes) -> None:
    whole = _request_events([data])
    assert whole == _request_events([data[i:i + 1] for i in range(len(data))])
    assert whole[-1] == ("end",)


def test_request_parser_scans_again_after_a_message_llhttp_parsed() -> None:
    post = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    events = _request_events([REQUESTS[0], post[:10], post[10:], REQUESTS[1], REQUESTS[0] + REQUESTS[0]])
    assert [e[0] for e in events] == ["head", "end", "head", "body", "end", "head", "end", "head", "end", "head", "end"]
    assert events[2][1:3] == (b"POST", b"/p") and events[3] == ("body", b"hi")


def test_request_head_framing_matches_the_slow_path() -> None:
    fast = _request_events([REQUESTS[3]])[0]
    slow = _request_events([REQUESTS[3][:5], REQUESTS[3][5:]])[0]
    assert fast == slow and fast[-1] is False  # Connection: close


@pytest.mark.parametrize("data", RESPONSES[:12])
def test_response_parser_reports_the_same_whole_or_byte_by_byte(data: bytes) -> None:
    assert _response_events(data, split=False) == _response_events(data, split=True)


def test_take_header_removes_every_one_and_returns_the_first(scan: Any) -> None:
    headers = [(b"Host", b"x"), (b"L5d-Require-Id", b"a"), (b"X", b"1"), [b"l5d-require-id", b"b"]]
    for name in (b"l5d-require-id", b"host", b"absent"):
        assert scan.take_header(list(headers), name) == h1scan.take_header(list(headers), name)
    assert scan.take_header(headers, b"l5d-require-id") == (b"a", [(b"Host", b"x"), (b"X", b"1")])
    same = [(b"Host", b"x")]
    assert scan.take_header(same, b"absent")[1] is same


def test_response_heads_are_encoded_alike(scan: Any) -> None:
    headers = [(b"Content-Length", b"2"), (b"X", b"y")]
    for status, reason in ((200, b"OK"), (404, b""), (599, b"Odd Reason"), (1000, b"x")):
        assert scan.encode_response_head(status, reason, list(headers)) == h1scan.encode_response_head(status, reason, list(headers))
    assert scan.encode_response_head(204, b"No Content", []) == b"HTTP/1.1 204 No Content\r\n\r\n"


# Heads forwarded as scanned: what the proxy writes to its client without a header list.
FORWARD_CASES = [
    b"HTTP/1.1 200 OK\r\nA:b\r\nContent-Length: 0\r\n\r\n",  # not "Name: value": declined
    b"HTTP/1.1 200 OK\r\nA:  b\r\nContent-Length: 0\r\n\r\n",  # declined
    b"HTTP/1.1 200 OK\r\nA: \r\nContent-Length: 0\r\n\r\n",  # an empty value written canonically
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: 1\r\nContent-Length: 0\r\n\r\n",  # names a header: declined
    b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, TE\r\nTE: x\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx",  # written back as HTTP/1.1
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 64 + b"Content-Length: 0\r\n\r\n",  # 65 lines to keep: declined
]


def _check_forward(scan: Any, data: bytes) -> Any:
    got = scan.scan_response_head(data, MAX)
    assert got == h1scan.scan_response_head(data, MAX), data  # the twins agree
    full = h1scan.scan_response(data, MAX)
    if got is not None:
        assert full is not None, data  # never accepts what scan_response declines
        status, reason, version, headers, length, connection, body = full
        assert got == (status, reason, version, length, connection, body,
                       h1scan.encode_response_head(status, reason, h1scan.forwardable(headers)))
    return got


def test_forwardable_heads_are_the_bytes_the_writer_would_make(scan: Any) -> None:
    accepted = [data for data in RESPONSES + FORWARD_CASES if _check_forward(scan, data) is not None]
    assert accepted == [RESPONSES[0], RESPONSES[1], RESPONSES[2], FORWARD_CASES[2], FORWARD_CASES[4], FORWARD_CASES[5]]
    assert scan.scan_response_head(RESPONSES[0], MAX)[6] == (
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n")


def test_mutated_forwardable_heads_agree(scan: Any) -> None:
    for data in _mutations(RESPONSES[:5] + FORWARD_CASES, 3000):
        _check_forward(scan, data)


def test_a_scanned_head_parses_its_headers_only_when_asked() -> None:
    class Keep(Events):
        def on_head(self, head: Any) -> None:
            self.head = head

    ev = Keep()
    h1.response_parser(ev, b"GET", pure=False).feed(RESPONSES[0])
    assert ev.head.forward is None and ev.head.parsed_headers is not None  # not asked for: the list, as before
    parser = h1.response_parser(ev, b"GET", pure=False, forward_heads=True)
    parser.feed(RESPONSES[0])
    head = ev.head
    assert head.forward is not None and head.parsed_headers is None
    assert head.headers == h1scan.scan_response(RESPONSES[0], MAX)[3]
    head.headers = [(b"X", b"1")]
    assert head.headers == [(b"X", b"1")]


FORWARD_REQUESTS = [
    b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nL5d-Require-Id: a\r\n\r\n",  # the proxy takes l5d-*: declined
    b"GET / HTTP/1.1\r\nHost: x\r\nl5d-dst-override: a\r\n\r\n",  # declined
    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",  # hop-by-hop: declined
    b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",  # declined
    b"GET / HTTP/1.1\r\nHost:x\r\n\r\n",  # not "Name: value": declined
    b"DELETE /r HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
]


def _check_request_forward(scan: Any, data: bytes) -> Any:
    got = scan.scan_request_head(data, MAX)
    assert got == h1scan.scan_request_head(data, MAX), data  # the twins agree
    if got is not None:
        full = h1scan.scan_request(data, MAX)
        assert full is not None, data
        method, target, headers, length, _connection = full
        assert got == (method, target, length)
        # Sent as read: exactly what the general writer makes of its head.
        assert data == h1scan.encode_head(method + b" " + target + b" HTTP/1.1", h1scan.forwardable(headers))
    return got


def test_requests_forwarded_as_read_are_the_bytes_the_writer_would_make(scan: Any) -> None:
    accepted = [data for data in REQUESTS + FORWARD_REQUESTS if _check_request_forward(scan, data) is not None]
    assert accepted == [REQUESTS[0], REQUESTS[1], REQUESTS[7], FORWARD_REQUESTS[0], FORWARD_REQUESTS[6]]


def test_mutated_requests_forwarded_as_read_agree(scan: Any) -> None:
    for data in _mutations(REQUESTS[:8] + FORWARD_REQUESTS, 3000):
        _check_request_forward(scan, data)


def test_reading_a_request_heads_headers_stops_forwarding_it_as_read() -> None:
    class Keep(Events):
        def on_head(self, head: Any) -> None:
            self.head = head

    ev = Keep()
    h1.request_parser(ev, pure=False).feed(FORWARD_REQUESTS[0])
    head = ev.head
    assert head.forward == FORWARD_REQUESTS[0] and head.parsed_headers is None
    headers = head.headers
    assert headers == [(b"Host", b"x"), (b"User-Agent", b"t")] and head.forward is None
