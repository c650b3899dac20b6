"""The HTTP/1 proxy path without sockets: user-space CPU per request, for profiling.

One Http1Server (outbound, fallback route, metrics on) with an idle upstream connection
in its pool; fake transports record what would be written. Each request is one client
read (a bodiless GET) and one upstream read (nginx's 200 with a 2-byte body), through the
same parser, exchange, pool and metrics code as a real connection. No kernel, no event
loop callbacks: what is left is the proxy's own per-request work, so a change to it can
be compared in seconds on a busy machine (run before/after, several times, take the
best). It is not a benchmark result: `bench/run.py` measures whole proxies.

    python bench/h1_micro.py                 # compiled twins (build them first)
    MESHPROXY_NO_EXTENSIONS=1 python bench/h1_micro.py   # the pure twins
    perf record -F 4000 -- python bench/h1_micro.py      # where the time goes
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop  # noqa: E402

from proxy.config import Addr  # noqa: E402
from proxy.http.stack import Clients, HttpRoute  # noqa: E402
from proxy.metrics.families import ProxyMetrics  # noqa: E402
from proxy.native import load  # noqa: E402
from proxy.transport.relay import TcpSeries  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:4140\r\n\r\n"  # what wrk sends
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 15:00:10 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")


class RecordingTransport:
    """Counts writes and keeps the last one; never closes (a close would be a bug here)."""

    def __init__(self) -> None:
        self.writes = 0
        self.last = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        raise AssertionError("the proxy closed a keep-alive connection")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _labels(target: Addr, peer: str | None) -> tuple[Any, ...]:
    tls = ("no_identity", None, None, "loopback")
    if peer is None:  # HTTP labels
        return ("outbound", None, str(target), target.host, str(target.port), *tls, *([None] * 10))
    return ("outbound", peer, None, str(target), target.host, str(target.port), *tls, None, None, None, None, None)


async def measure(requests: int, rounds: int) -> tuple[float, str]:
    http1, implementation = load("http1", "proxy.http.h1")
    metrics = ProxyMetrics()
    target = Addr("127.0.0.1", 8080)
    route = HttpRoute("outbound", target, _labels(target, None), 1.0, None, True, dst_labels=_labels(target, "dst"))
    server = http1.Http1Server(route, metrics, Clients(None), implementation != "cython", 65536, 3.0, 100, set(), None,
                               TcpSeries(metrics, _labels(target, "src")), None, [0, 1_000_000])
    client = RecordingTransport()
    server.connection_made(client)
    pool = server.pool()
    upstream = http1.UpstreamConnection(pool)
    upstream_transport = RecordingTransport()
    upstream.connection_made(upstream_transport)
    upstream.series = TcpSeries(metrics, _labels(target, "dst"))
    pool.release(upstream)

    def run(n: int) -> None:
        for _ in range(n):
            server.data_received(REQUEST)
            upstream.data_received(RESPONSE)

    run(2000)  # warm-up: caches, series, the parser kept by the connection
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        run(requests)
        best = min(best, (time.process_time() - started) / requests * 1e6)
    # The proxy did its job on every request: one write each way, the last response whole.
    done = 2000 + rounds * requests
    assert upstream_transport.writes == done and client.writes == done, (upstream_transport.writes, client.writes)
    assert upstream_transport.last == REQUEST and client.last.endswith(b"\r\n\r\nok"), client.last
    assert metrics.request_total.series[route.labels].value == done
    return best, implementation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=15, help="rounds; the best is reported")
    args = ap.parse_args()
    best, implementation = uvloop.run(measure(args.requests, args.rounds))
    print(f"{best:.2f} us of CPU per request (best of {args.rounds} x {args.requests}, {implementation} twins)")


if __name__ == "__main__":
    main()
