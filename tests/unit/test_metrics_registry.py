"""proxy.metrics.registry and proxy.metrics.process: series, snapshots, merging
the snapshots of several workers, and the Prometheus text they render to.

Time is injected: the registry module's ``time`` is replaced by a namespace whose
``monotonic`` is a manual clock, so idle expiry needs no sleeps.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from proxy.metrics import process, registry
from proxy.metrics.registry import Counter, Gauge, Histogram, Registry, merge, render


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(registry, "time", SimpleNamespace(monotonic=c))
    return c


def rendered_lines(*families) -> list[str]:
    reg = Registry()
    for fam in families:
        reg.add(fam)
    return render(reg.snapshot()).splitlines()


# ------------------------------------------------------------------ render: counters and gauges


def test_render_writes_help_and_type_before_the_series():
    c = Counter("requests_total", "Total requests", ["direction"])
    c.labels("inbound").value += 2
    assert rendered_lines(c) == [
        "# HELP requests_total Total requests",
        "# TYPE requests_total counter",
        'requests_total{direction="inbound"} 2',
    ]


def test_render_gauge_type():
    g = Gauge("open", "Open things", [])
    g.labels().value += 1
    assert rendered_lines(g)[1] == "# TYPE open gauge"
    assert rendered_lines(g)[2] == "open 1"


def test_render_keeps_declared_label_order():
    c = Counter("c", "h", ["zeta", "alpha", "mid"])
    c.labels("1", "2", "3").value += 1
    assert rendered_lines(c)[2] == 'c{zeta="1",alpha="2",mid="3"} 1'


def test_render_omits_labels_whose_value_is_none():
    c = Counter("c", "h", ["direction", "authority", "tls"])
    c.labels("outbound", None, "true").value += 1
    assert rendered_lines(c)[2] == 'c{direction="outbound",tls="true"} 1'


def test_render_all_labels_none_prints_bare_name():
    c = Counter("c", "h", ["authority"])
    c.labels(None).value += 1
    assert rendered_lines(c)[2] == "c 1"


def test_render_escapes_quote_backslash_and_newline():
    c = Counter("c", "h", ["v"])
    c.labels('a"b\\c\nd').value += 1
    assert rendered_lines(c)[2] == 'c{v="a\\"b\\\\c\\nd"} 1'


@pytest.mark.parametrize(("value", "text"), [(3, "3"), (3.0, "3"), (0, "0"), (2.5, "2.5"), (1e20, "1e+20")])
def test_render_prints_whole_numbers_without_decimal_point(value, text):
    g = Gauge("g", "h", [])
    g.labels().value = value
    assert rendered_lines(g)[2] == f"g {text}"


def test_labels_with_the_wrong_arity_are_rejected():
    c = Counter("c", "h", ["a", "b"])
    with pytest.raises(ValueError, match="c takes labels"):
        c.labels("only-one")


def test_labels_returns_the_same_series_for_the_same_values():
    c = Counter("c", "h", ["a"])
    assert c.labels("x") is c.labels("x")
    assert c.labels("x") is not c.labels("y")


# ------------------------------------------------------------------ render: histograms


def latency_histogram() -> Histogram:
    return Histogram("response_latency_ms", "Latency", ["direction"], [1, 10, 100])


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count():
    h = latency_histogram()
    series = h.labels("inbound")
    for v in (0.5, 5, 50, 500):
        series.observe(v)
    assert rendered_lines(h)[2:] == [
        'response_latency_ms_bucket{direction="inbound",le="1"} 1',
        'response_latency_ms_bucket{direction="inbound",le="10"} 2',
        'response_latency_ms_bucket{direction="inbound",le="100"} 3',
        'response_latency_ms_bucket{direction="inbound",le="+Inf"} 4',
        'response_latency_ms_sum{direction="inbound"} 555.5',
        'response_latency_ms_count{direction="inbound"} 4',
    ]


def test_histogram_observation_on_a_bound_goes_in_that_bucket():
    h = latency_histogram()
    h.labels("inbound").observe(10)
    assert h.labels("inbound").counts == [0, 1, 0, 0]
    assert 'response_latency_ms_bucket{direction="inbound",le="1"} 0' in rendered_lines(h)
    assert 'response_latency_ms_bucket{direction="inbound",le="10"} 1' in rendered_lines(h)


def test_histogram_le_keeps_fractions_and_drops_integral_decimals():
    h = Histogram("d", "h", [], [0.001, 0.5, 1.0, 10.0])
    h.labels().observe(0.2)
    bucket_lines = [line for line in rendered_lines(h) if "_bucket" in line]
    assert [line.split(" ")[0] for line in bucket_lines] == [
        'd_bucket{le="0.001"}',
        'd_bucket{le="0.5"}',
        'd_bucket{le="1"}',
        'd_bucket{le="10"}',
        'd_bucket{le="+Inf"}',
    ]


def test_histogram_sum_is_an_integer_when_whole():
    h = latency_histogram()
    h.labels("x").observe(3)
    h.labels("x").observe(4)
    assert 'response_latency_ms_sum{direction="x"} 7' in rendered_lines(h)


# ------------------------------------------------------------------ merge


def worker_registry(read: int, open_now: int, latencies: list[float], peer: str = "src") -> list:
    reg = Registry()
    c = reg.add(Counter("tcp_read_bytes_total", "Read", ["direction", "peer"]))
    g = reg.add(Gauge("tcp_open_connections", "Open", ["direction", "peer"]))
    h = reg.add(Histogram("lat", "Latency", ["direction"], [1, 10]))
    c.labels("inbound", peer).value += read
    g.labels("inbound", peer).value += open_now
    for v in latencies:
        h.labels("inbound").observe(v)
    return reg.snapshot()


def series_of(snapshot: list, name: str) -> dict:
    fam = next(f for f in snapshot if f["name"] == name)
    return {tuple(labels): value for labels, value in fam["series"]}


def test_merge_sums_counters_gauges_and_histograms_with_equal_labels():
    merged = merge([worker_registry(10, 1, [0.5]), worker_registry(5, 2, [5, 50])])
    assert series_of(merged, "tcp_read_bytes_total") == {("inbound", "src"): 15}
    assert series_of(merged, "tcp_open_connections") == {("inbound", "src"): 3}
    assert series_of(merged, "lat") == {("inbound",): {"counts": [1, 1, 1], "sum": 55.5, "count": 3}}


def test_merge_keeps_series_with_distinct_labels():
    merged = merge([worker_registry(10, 1, [], peer="src"), worker_registry(5, 1, [], peer="dst")])
    assert series_of(merged, "tcp_read_bytes_total") == {("inbound", "src"): 10, ("inbound", "dst"): 5}


def test_merge_keeps_family_metadata_and_order():
    merged = merge([worker_registry(1, 1, [])])
    assert [f["name"] for f in merged] == ["tcp_read_bytes_total", "tcp_open_connections", "lat"]
    assert merged[2]["type"] == "histogram"
    assert merged[2]["buckets"] == [1, 10]


def test_merge_does_not_modify_its_inputs():
    a, b = worker_registry(1, 1, [0.5]), worker_registry(2, 1, [0.5])
    before = json.dumps([a, b])
    merge([a, b])
    assert json.dumps([a, b]) == before


def test_merge_after_json_round_trip_renders_like_the_originals():
    a, b = worker_registry(10, 1, [0.5, 5]), worker_registry(5, 2, [50])
    direct = render(merge([a, b]))
    over_the_wire = render(merge([json.loads(json.dumps(a)), json.loads(json.dumps(b))]))
    assert over_the_wire == direct
    assert 'tcp_read_bytes_total{direction="inbound",peer="src"} 15' in over_the_wire
    assert 'lat_bucket{direction="inbound",le="+Inf"} 3' in over_the_wire


def test_merge_of_none_label_round_trips_through_json():
    reg = Registry()
    reg.add(Counter("c", "h", ["direction", "authority"])).labels("outbound", None).value += 1
    snap = json.loads(json.dumps(reg.snapshot()))
    assert render(merge([snap, snap])).splitlines()[2] == 'c{direction="outbound"} 2'


# ------------------------------------------------------------------ idle expiry


def test_series_idle_longer_than_retain_idle_is_dropped(clock):
    reg = Registry(retain_idle=600)
    c = reg.add(Counter("c", "h", ["a"]))
    c.labels("x").value += 1
    clock.now += 601
    assert reg.snapshot()[0]["series"] == []
    assert c.series == {}


def test_series_idle_exactly_retain_idle_is_kept(clock):
    reg = Registry(retain_idle=600)
    c = reg.add(Counter("c", "h", ["a"]))
    c.labels("x").value += 1
    clock.now += 600
    assert reg.snapshot()[0]["series"] == [[["x"], 1]]


def test_labels_call_refreshes_a_series(clock):
    reg = Registry(retain_idle=600)
    c = reg.add(Counter("c", "h", ["a"]))
    c.labels("x").value += 1
    clock.now += 500
    c.labels("x").value += 1
    clock.now += 500
    assert reg.snapshot()[0]["series"] == [[["x"], 2]]


def test_nonzero_gauge_is_kept_however_idle(clock):
    reg = Registry(retain_idle=600)
    g = reg.add(Gauge("open", "h", ["a"]))
    g.labels("busy").value += 1
    g.labels("done").value += 0
    clock.now += 10_000
    assert reg.snapshot()[0]["series"] == [[["busy"], 1]]


def test_idle_histogram_is_dropped(clock):
    reg = Registry(retain_idle=60)
    h = reg.add(latency_histogram())
    h.labels("x").observe(1)
    clock.now += 61
    assert reg.snapshot()[0]["series"] == []


def test_series_updated_through_a_held_reference_is_not_idle(clock):
    reg = Registry(retain_idle=600)
    c = reg.add(Counter("tcp_read_bytes_total", "h", ["peer"]))
    held = c.labels("src")  # as TcpSeries does at connection open
    for _ in range(3):
        clock.now += 300
        held.value += 100  # as Relay.flush_counts does before each scrape
        snap = reg.snapshot()
    assert snap[0]["series"] == [[["src"], 300]]


# ------------------------------------------------------------------ hooks


def test_before_snapshot_hooks_run_first_and_their_updates_show():
    reg = Registry()
    c = reg.add(Counter("c", "h", []))
    calls = []

    def flush():
        calls.append("flush")
        c.labels().value += 7

    reg.before_snapshot.append(flush)
    snap = reg.snapshot()
    assert calls == ["flush"]
    assert snap[0]["series"] == [[[], 7]]


# ------------------------------------------------------------------ process metrics


def proc(start: float, max_fds: float, rss: float, cpu: float) -> dict:
    return {
        "process_start_time_seconds": ["gauge", "Start time", start],
        "process_max_fds": ["gauge", "Max fds", max_fds],
        "process_resident_memory_bytes": ["gauge", "RSS", rss],
        "process_cpu_seconds_total": ["counter", "CPU", cpu],
    }


def test_process_merge_takes_earliest_start_largest_max_fds_and_sums_the_rest():
    merged = process.merge([proc(200.0, 1024, 100, 1.5), proc(100.0, 4096, 50, 2.0), proc(300.0, 2048, 25, 0.5)])
    assert merged["process_start_time_seconds"][2] == 100.0
    assert merged["process_max_fds"][2] == 4096
    assert merged["process_resident_memory_bytes"][2] == 175
    assert merged["process_cpu_seconds_total"][2] == pytest.approx(4.0)
    assert merged["process_cpu_seconds_total"][:2] == ["counter", "CPU"]


def test_process_merge_of_one_sample_is_that_sample():
    one = proc(5.0, 10, 20, 0.25)
    assert process.merge([one]) == one


def test_process_render_prints_help_type_and_integers_without_decimals():
    text = process.render(process.merge([proc(100.0, 1024, 100, 1.5)]))
    assert "# HELP process_max_fds Max fds\n# TYPE process_max_fds gauge\nprocess_max_fds 1024\n" in text
    assert "process_start_time_seconds 100\n" in text
    assert "process_cpu_seconds_total 1.5\n" in text


def test_process_sample_reads_this_process():
    sample = process.sample()
    assert sample["process_resident_memory_bytes"][2] > 0
    assert sample["process_max_fds"][0] == "gauge"
