"""bench h1-latency: the pacing of wrk's requests and the added-p99 arithmetic.

The harness lives in bench/harness (imported as ``harness``, as bench/run.py does); these
are its pure parts, checked without wrk, nginx or a proxy.
"""

from __future__ import annotations

import os
import re
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "bench")
)

from harness import loads  # noqa: E402
from harness.scenarios import (  # noqa: E402
    LATENCY_RATE,
    H1Latency,
    Row,
    minus_by_round,
)

# ------------------------------------------------------------------ pace_interval_us


def test_interval_is_the_period_of_one_thread() -> None:
    assert loads.pace_interval_us(1000) == 1000  # 1,000 req/s: one every ms
    assert loads.pace_interval_us(1000, threads=2) == 2000  # each thread half the rate
    assert loads.pace_interval_us(3) == 333_333
    assert loads.pace_interval_us(10_000_000) == 1  # never 0: a schedule must advance


@pytest.mark.parametrize("rate,threads", [(0, 1), (-5, 1), (1000, 0)])
def test_interval_refuses_a_rate_it_cannot_pace(rate: float, threads: int) -> None:
    with pytest.raises(ValueError):
        loads.pace_interval_us(rate, threads)


# ------------------------------------------------------------------ wrk_script_text


def _functions(text: str) -> set[str]:
    return set(re.findall(r"^function (\w+)\(", text, re.M))


def test_plain_script_has_only_the_summary() -> None:
    # No response()/delay(): the keep-alive runs must not hand every request to Lua.
    text = loads.wrk_script_text()
    assert _functions(text) == {"setup", "done"}
    assert "ffi" not in text
    assert re.search(r"\{[a-z_]+\}", text) is None  # every placeholder was filled


def test_budget_script_is_unchanged_by_pacing() -> None:
    text = loads.wrk_script_text(budget_per_thread=500)
    assert _functions(text) == {"setup", "done", "init", "response"}
    assert "local budget = 500" in text
    assert text.count('require("ffi")') == 1


def test_paced_script_defines_delay_with_the_interval() -> None:
    text = loads.wrk_script_text(rate_per_thread=LATENCY_RATE)
    assert _functions(text) == {"setup", "done", "delay"}
    assert "local interval_us = 1000\n" in text
    assert text.count('require("ffi")') == 1  # the clock delay() reads
    # wrk truncates delay()'s number to whole ms and wraps a negative one: rounded, clamped.
    assert "math.max(0, math.floor(wait_us / 1000 + 0.5))" in text
    assert "next_us < now then next_us = now" in text  # behind: no catch-up burst


def test_budget_and_pacing_share_one_clock() -> None:
    text = loads.wrk_script_text(budget_per_thread=10, rate_per_thread=250)
    assert _functions(text) == {"setup", "done", "init", "response", "delay"}
    assert text.count("local function now_us()") == 1
    assert "local interval_us = 4000\n" in text


def test_done_hook_prints_the_line_parse_wrk_reads() -> None:
    # The JSON template of done() (Lua's %d/%.1f filled in) is what parse_wrk expects.
    text = loads.wrk_script_text(rate_per_thread=LATENCY_RATE)
    template = re.search(r"'BENCH_JSON (\{.*?)\\n'", text.replace("' ..\n    '", ""), re.S)
    assert template is not None
    line = "BENCH_JSON " + template.group(1).replace("%.1f", "1.5").replace("%d", "7")
    res = loads.parse_wrk(line)
    assert res.units == 7 and res.p99_ms == 0.007 and res.p999_ms == 0.007


# ------------------------------------------------------------------ added p99


def _runs(*p99s: float | None, first_round: int = 1) -> list[dict[str, object]]:
    return [
        {"round": first_round + i, "p99_ms": p, "throughput": 1000.0, "machine_busy_cores": 0.2}
        for i, p in enumerate(p99s)
    ]


def test_minus_by_round_pairs_rounds_not_positions() -> None:
    assert minus_by_round(_runs(1.5, 2.0), _runs(0.5, 0.75), "p99_ms") == [1.0, 1.25]
    # The proxy row's round 1 failed: its round 2 is still paired with direct's round 2.
    assert minus_by_round(_runs(2.0, first_round=2), _runs(0.5, 0.75), "p99_ms") == [1.25]
    assert minus_by_round(_runs(2.0, None), _runs(0.5, 0.75), "p99_ms") == [1.5]
    assert minus_by_round(_runs(2.0), [], "p99_ms") == []


def _row(label: str, kind: str, *p99s: float) -> Row:
    row = Row("h1-latency", label, kind, runs=_runs(*p99s))
    row.metrics = dict(sorted(row.runs, key=lambda r: r["p99_ms"])[(len(p99s) - 1) // 2])
    return row


def test_derive_checks_meshproxy_and_shows_the_peers_as_reference() -> None:
    scn = H1Latency()
    rows = [
        _row("direct", "direct", 0.5, 0.6, 0.4),
        _row("meshproxy 1w", "meshproxy", 1.3, 1.7, 1.2),  # +0.8, +1.1, +0.8
        _row("haproxy http", "haproxy", 0.7, 0.7, 0.7),
        Row("h1-latency", "nginx http", "nginx", "skipped", "nginx not installed"),
    ]
    scn.derive(rows)
    mesh = rows[1].metrics
    assert mesh["p99_added_ms_rounds"] == pytest.approx([0.8, 1.1, 0.8])
    assert mesh["p99_added_ms"] == pytest.approx(0.8)  # median of rounds, not of rows
    assert mesh["p99_x_direct"] == pytest.approx(1.3 / 0.5)
    assert "p99_added_ms" not in rows[0].metrics and rows[0].metrics["p99_x_direct"] == 1.0
    by_label = {c["requirement"].split(":")[0]: c for c in scn.checks}
    assert by_label["meshproxy 1w"]["pass"] is True
    assert "1,000 RPS <= 1 ms" in by_label["meshproxy 1w"]["requirement"]
    assert by_label["haproxy http"]["pass"] is None  # a reference, not the requirement
    assert by_label["nginx http"]["figure"] == "-"


def test_derive_fails_above_one_ms_and_without_a_direct_row_measures_nothing() -> None:
    scn = H1Latency()
    rows = [_row("direct", "direct", 0.5), _row("meshproxy 1w", "meshproxy", 1.6)]
    scn.derive(rows)
    assert scn.checks[0]["pass"] is False
    assert scn.checks[0]["figure"].startswith("+1.100 ms")
    scn.derive([_row("meshproxy 1w", "meshproxy", 1.6)])
    assert scn.checks[0]["pass"] is None and scn.checks[0]["figure"] == "-"
