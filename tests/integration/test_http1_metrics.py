"""HTTP/1.1 metrics as Linkerd prints them (issue 3, reference 7.1), after a scripted mix.

A fresh proxy (or pair) sees exactly 10 requests from one keep-alive client:
5 x 200, 3 x 404 and 2 x 500 from a server we control. ``/metrics`` must then
show exactly those counts, the classification Linkerd gives them (5xx is a
failure, 4xx a success), the ``response_latency_ms`` histogram with Linkerd's
bucket bounds printed without decimals, and labels in Linkerd's order.
In the pair both A's outbound and B's inbound count the same requests.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.fakes.h1_upstream import H1Upstream
from tests.integration.test_http1_transparency import chain
from tests.support import metric_value, wait_until

SCRIPT = [200, 404, 200, 500, 200, 404, 200, 500, 404, 200]  # 5 x 200, 3 x 404, 2 x 500
LINKERD_LE = ["1", "2", "3", "4", "5", "10", "20", "30", "40", "50", "100", "200", "300", "400", "500",
              "1000", "2000", "3000", "4000", "5000", "10000", "20000", "30000", "40000", "50000", "+Inf"]
SERIES = re.compile(r"^([a-z_]+)\{(.*)\} (\S+)$")
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def upstream():
    server = H1Upstream()
    yield server
    server.close()


@pytest.fixture(params=("one", "pair"))
def topology(request) -> str:
    return request.param


def series(text: str, name: str, direction: str) -> list[tuple[list[tuple[str, str]], float]]:
    """Every ``name{...} value`` line of one direction, labels in printed order."""
    out = []
    for line in text.splitlines():
        m = SERIES.match(line)
        if m and m.group(1) == name:
            labels = LABEL.findall(m.group(2))
            if ("direction", direction) in labels:
                out.append((labels, float(m.group(3))))
    return out


def check(text: str, direction: str) -> None:
    assert metric_value(text, "request_total", direction=direction) == 10
    responses = series(text, "response_total", direction)
    got = {(dict(lab)["status_code"], dict(lab)["classification"], dict(lab)["grpc_status"], dict(lab)["error"]): v for lab, v in responses}
    assert got == {("200", "success", "", ""): 5, ("404", "success", "", ""): 3, ("500", "failure", "", ""): 2}, got
    for labels, _ in responses:
        keys = [k for k, _ in labels]
        assert keys[0] == "direction", keys
        assert keys[-4:] == ["status_code", "classification", "grpc_status", "error"], keys
    for labels, _ in series(text, "request_total", direction):
        assert labels[0][0] == "direction"

    counts = series(text, "response_latency_ms_count", direction)
    assert sum(v for _, v in counts) == 10
    assert sorted((dict(lab)["status_code"], v) for lab, v in counts) == [("200", 5), ("404", 3), ("500", 2)]
    buckets: dict[tuple, list[tuple[str, float]]] = {}
    for labels, v in series(text, "response_latency_ms_bucket", direction):
        keys = [k for k, _ in labels]
        assert keys[0] == "direction" and keys[-2:] == ["status_code", "le"], keys
        buckets.setdefault(tuple(labels[:-1]), []).append((labels[-1][1], v))
    assert len(buckets) == 3
    for key, points in buckets.items():
        assert [le for le, _ in points] == LINKERD_LE, f"{key}: {[le for le, _ in points]}"
        values = [v for _, v in points]
        assert values == sorted(values), "buckets are cumulative"
        assert values[-1] == {"200": 5, "404": 3, "500": 2}[dict(key)["status_code"]]


def test_scripted_mix_is_counted_exactly(twin, topology, upstream):
    with chain(twin, topology, upstream.port) as (entry, proxies, last):
        with httpx.Client(base_url=f"http://127.0.0.1:{entry}", trust_env=False, timeout=10) as client:
            for i, status in enumerate(SCRIPT):
                r = client.get(f"/status/{status}?n={i}")
                assert r.status_code == status and r.content == b"status %d\n" % status
        # response_total is counted when the response stream ends: wait for the last one (bounded).
        watched = [(proxies[0], "outbound")] + ([(last, "inbound")] if topology == "pair" else [])
        for proxy, direction in watched:
            text = wait_until(
                lambda p=proxy, d=direction: (t := p.metrics()) and sum(v for _, v in series(t, "response_total", d)) >= 10 and t,
                5, what=f"{direction} responses counted",
            )
            check(text, direction)
