"""Per-request metrics (proxy.http.exchange and its compiled twin) and the idle
connection pool (proxy.http.pool), without sockets.

Each Exchange twin counts into a fresh ProxyMetrics; the tests read the series
back by their labels, in Linkerd's order (ref 7.1).
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import pytest

from proxy.config import Addr
from proxy.http import exchange as pure_exchange
from proxy.http import pool as pure_pool
from proxy.http.errors import LOADSHED
from proxy.http.stack import HttpRoute
from proxy.metrics.families import ProxyMetrics

TARGET = Addr("127.0.0.1", 8080)


def _labels(authority: str = "svc:80") -> tuple[Any, ...]:
    return ("outbound", authority, str(TARGET), TARGET.host, str(TARGET.port), "no_identity", None, None, "loopback",
            None, None, None, None, None, None, None, None, None, None)


@pytest.fixture(params=["cython", "python"])
def ex_mod(request: Any) -> Any:
    if request.param == "python":
        return pure_exchange
    try:
        return importlib.import_module("proxy._native.exchange")
    except ImportError:
        pytest.fail("proxy._native.exchange is not built; run `python setup.py build_ext --inplace`")


def _route(labels: tuple[Any, ...], **kw: Any) -> HttpRoute:
    return HttpRoute("outbound", TARGET, labels, 1.0, **kw)


def test_a_request_is_counted_at_dispatch_head_and_end(ex_mod: Any) -> None:
    m = ProxyMetrics()
    labels = _labels()
    route = _route(labels)
    for status in (200, 200, 503):
        ex = ex_mod.Exchange(m, route, grpc=False)
        ex.response_head(status)
        ex.end()
        ex.end()  # a second end is not counted
    assert m.request_total.series[labels].value == 3
    assert m.response_total.series[(*labels, "200", "success", "", "")].value == 2
    assert m.response_total.series[(*labels, "503", "failure", "", "")].value == 1
    assert m.response_latency_ms.series[(*labels, "200")].count == 2


def test_grpc_and_errors_are_classified(ex_mod: Any) -> None:
    m = ProxyMetrics()
    labels = _labels()
    route = _route(labels)
    ok = ex_mod.Exchange(m, route, grpc=True)
    ok.response_head(200)
    ok.end(grpc_status=0)
    unknown = ex_mod.Exchange(m, route, grpc=True)
    unknown.response_head(200)
    unknown.end()  # no grpc-status: UNKNOWN
    failed = ex_mod.Exchange(m, route, grpc=False)
    failed.response_head(LOADSHED.status)
    failed.proxy_error(LOADSHED)
    failed.end(error="i/o")
    cut = ex_mod.Exchange(m, route, grpc=False)
    cut.end(error="unexpected")
    assert m.response_total.series[(*labels, "200", "success", "0", "")].value == 1
    assert m.response_total.series[(*labels, "200", "failure", "2", "")].value == 1
    assert m.response_total.series[(*labels, "503", "failure", "", "i/o")].value == 1
    assert m.response_total.series[(*labels, None, "failure", "", "unexpected")].value == 1
    assert m.outbound_http_errors_total.series[(LOADSHED.metric,)].value == 1


def test_equal_labels_in_different_tuples_share_series(ex_mod: Any) -> None:
    m = ProxyMetrics()
    a, b = _labels(), _labels()
    assert a == b and a is not b
    for labels in (a, b, a):
        ex_mod.Exchange(m, _route(labels), grpc=False).end()
    assert m.request_total.series[a].value == 3
    assert len(m.request_total.series) == 1


def test_a_series_dropped_while_idle_is_made_again(ex_mod: Any) -> None:
    m = ProxyMetrics()
    labels = _labels()
    route = _route(labels)
    ex_mod.Exchange(m, route, grpc=False).end()
    ex_mod.Exchange(m, route, grpc=False).end()  # counted by the cached series
    # A snapshot long after: every series is idle past METRICS_RETAIN_IDLE and dropped.
    later = m.request_total.last_snapshot + 10_000
    for family in (m.request_total, m.response_total):
        family.snapshot(later, 600.0)
        family.snapshot(later + 1, 600.0)
    assert labels not in m.request_total.series
    ex_mod.Exchange(m, route, grpc=False).end()
    assert m.request_total.series[labels].value == 1
    assert m.response_total.series[(*labels, None, "failure", "", "")].value == 1


def test_registries_do_not_share_series(ex_mod: Any) -> None:
    labels = _labels()
    m1, m2 = ProxyMetrics(), ProxyMetrics()
    ex_mod.Exchange(m1, _route(labels), grpc=False)
    ex_mod.Exchange(m2, _route(labels), grpc=False)
    assert m1.request_total.series[labels].value == 1 and m2.request_total.series[labels].value == 1


def test_authz_is_counted_per_request(ex_mod: Any) -> None:
    m = ProxyMetrics()
    allow = tuple("a" for _ in m.inbound_http_authz_allow_total.label_names)
    deny = tuple("d" for _ in m.inbound_http_authz_deny_total.label_names)
    ex_mod.Exchange(m, _route(_labels(), authz_labels=(allow, deny)), grpc=False)
    ex_mod.Exchange(m, _route(_labels(), authz_labels=(allow, deny), authorized=False), grpc=False)
    assert m.inbound_http_authz_allow_total.series[allow].value == 1
    assert m.inbound_http_authz_deny_total.series[deny].value == 1


# ---------------------------------------------------------------- idle pool


class FakeConn:
    def __init__(self) -> None:
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self.transport = self

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


@pytest.fixture(params=["cython", "python"])
def pool_cls(request: Any) -> Any:
    if request.param == "python":
        return pure_pool.IdlePool
    try:
        return importlib.import_module("proxy._native.pool").IdlePool
    except ImportError:
        pytest.fail("proxy._native.pool is not built; run `python setup.py build_ext --inplace`")


def test_pool_reuses_the_most_recent_and_bounds_idle(pool_cls: Any) -> None:
    async def run() -> None:
        pool = pool_cls(TARGET, 1.0, idle_timeout=3.0, max_idle=2)
        a, b, c = FakeConn(), FakeConn(), FakeConn()
        for conn in (a, b, c):
            pool.release(conn)
        assert c.closed and not a.closed  # over max_idle: closed, not parked
        assert pool.acquire() is b and b.reused
        a.lost = True
        assert pool.acquire() is None  # a lost connection is skipped
        pool.close()
        assert pool.closed and not pool.idle

    asyncio.run(run())


def test_pool_closes_connections_idle_past_the_timeout(pool_cls: Any) -> None:
    async def run() -> None:
        pool = pool_cls(TARGET, 1.0, idle_timeout=0.05, max_idle=4)
        old = FakeConn()
        pool.release(old)
        await asyncio.sleep(0.03)
        young = FakeConn()
        pool.release(young)
        await asyncio.sleep(0.04)
        assert old.closed and not young.closed
        await asyncio.sleep(0.1)
        assert young.closed and not pool.idle

    asyncio.run(run())


def test_each_connection_hashes_its_labels_once(ex_mod: Any) -> None:
    """Equal label tuples of different connections: each is hashed on its first request only."""
    hashed = [0]

    class Counting(tuple):  # type: ignore[type-arg]
        def __hash__(self) -> int:
            hashed[0] += 1
            return tuple.__hash__(self)

    m = ProxyMetrics()
    conns = [Counting(_labels()) for _ in range(3)]
    for _ in range(5):
        for labels in conns:
            ex_mod.route_series(m, labels)
    first = hashed[0]
    for _ in range(5):
        for labels in conns:
            ex_mod.route_series(m, labels)
    assert hashed[0] == first
    assert len({id(ex_mod.route_series(m, labels)) for labels in conns}) == 1
