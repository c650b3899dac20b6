"""Metric families with a fixed label order, cheap to update and easy to merge.

Theory of operation: Linkerd's dashboards query the legacy families by name
*and* label order (ref section 7), so each family declares its label names once
and every series is keyed by a tuple of values in that order. ``labels(...)``
returns a small mutable series object; hot paths keep that object and do
``series.value += n``, one attribute add, no lock (each worker is one thread).

Workers never share memory. ``snapshot()`` turns a registry into plain lists
(JSON-able), the supervisor ``merge()``s the snapshots of all workers by
summing series with equal labels, and ``render()`` prints the Prometheus text
exposition format. Series idle for ``retain_idle`` seconds are dropped at
snapshot time (Linkerd's METRICS_RETAIN_IDLE), except gauges that are non-zero.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class Series:
    __slots__ = ("value", "touched", "seen")

    def __init__(self) -> None:
        self.value: float = 0
        self.touched = time.monotonic()
        self.seen: float = 0  # value at the last snapshot: a change since then means "active"


class HistogramSeries:
    __slots__ = ("bounds", "counts", "sum", "count", "touched", "seen")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot is +Inf
        self.sum = 0.0
        self.count = 0
        self.touched = time.monotonic()
        self.seen = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Family:
    kind = "counter"

    def __init__(self, name: str, help: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.label_names = tuple(label_names)
        self.series: dict[tuple[str, ...], Any] = {}
        self.last_snapshot = time.monotonic()

    def _new(self) -> Any:
        return Series()

    def labels(self, *values: str) -> Any:
        key = tuple(values)
        series = self.series.get(key)
        if series is None:
            if len(key) != len(self.label_names):
                raise ValueError(f"{self.name} takes labels {self.label_names}, got {key}")
            series = self.series[key] = self._new()
        series.touched = time.monotonic()
        return series

    def snapshot_series(self, series: Any) -> Any:
        return series.value

    def snapshot(self, now: float, retain_idle: float) -> dict[str, Any]:
        rows = []
        for key, series in list(self.series.items()):
            # Hot paths keep a series object and add to it without calling labels():
            # a value that moved since the last snapshot was active at least then.
            if isinstance(series, Series) and series.value != series.seen:
                series.seen = series.value
                series.touched = max(series.touched, self.last_snapshot)
            elif isinstance(series, HistogramSeries) and series.count != series.seen:
                series.seen = series.count
                series.touched = max(series.touched, self.last_snapshot)
            if now - series.touched > retain_idle and not (self.kind == "gauge" and series.value):
                del self.series[key]
                continue
            rows.append([list(key), self.snapshot_series(series)])
        self.last_snapshot = now
        return {"name": self.name, "type": self.kind, "help": self.help, "labels": list(self.label_names), "series": rows}


class Counter(Family):
    kind = "counter"


class Gauge(Family):
    kind = "gauge"


class Histogram(Family):
    kind = "histogram"

    def __init__(self, name: str, help: str, label_names: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, help, label_names)
        self.buckets = tuple(buckets)

    def _new(self) -> HistogramSeries:
        return HistogramSeries(self.buckets)

    def snapshot_series(self, series: HistogramSeries) -> Any:
        return {"counts": list(series.counts), "sum": series.sum, "count": series.count}

    def snapshot(self, now: float, retain_idle: float) -> dict[str, Any]:
        snap = super().snapshot(now, retain_idle)
        snap["buckets"] = list(self.buckets)
        return snap


class Registry:
    """The families of one process, plus hooks run before each snapshot
    (e.g. to flush byte counts of connections still open)."""

    def __init__(self, retain_idle: float = 600.0) -> None:
        self.families: list[Family] = []
        self.before_snapshot: list[Callable[[], None]] = []
        self.retain_idle = retain_idle

    def add(self, family: Family) -> Any:
        self.families.append(family)
        return family

    def snapshot(self) -> list[dict[str, Any]]:
        for hook in self.before_snapshot:
            hook()
        now = time.monotonic()
        return [f.snapshot(now, self.retain_idle) for f in self.families]


# ------------------------------------------------------------------ merging

def merge(snapshots: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Sum series with the same family and labels; keeps the first snapshot's order."""
    merged: dict[str, dict[str, Any]] = {}
    index: dict[str, dict[tuple[str, ...], Any]] = {}
    for snap in snapshots:
        for fam in snap:
            name = fam["name"]
            if name not in merged:
                merged[name] = {k: v for k, v in fam.items() if k != "series"}
                merged[name]["series"] = []
                index[name] = {}
            rows = index[name]
            for labels, value in fam["series"]:
                key = tuple(labels)
                if key not in rows:
                    row = [labels, _copy(value)]
                    rows[key] = row
                    merged[name]["series"].append(row)
                else:
                    rows[key][1] = _add(rows[key][1], value)
    return list(merged.values())


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {"counts": list(value["counts"]), "sum": value["sum"], "count": value["count"]}
    return value


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {
            "counts": [x + y for x, y in zip(a["counts"], b["counts"], strict=True)],
            "sum": a["sum"] + b["sum"],
            "count": a["count"] + b["count"],
        }
    return a + b


# ------------------------------------------------------------------ rendering

def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    # Linkerd omits a label whose value is absent (e.g. `authority` with no name); we use None for that.
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True) if v is not None]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _le(bound: float) -> str:
    # Linkerd prints millisecond bounds without decimals: le="10", not le="10.0".
    return _num(bound)


def render(families: Iterable[dict[str, Any]]) -> str:
    out: list[str] = []
    for fam in families:
        name, kind, names = fam["name"], fam["type"], fam["labels"]
        out.append(f"# HELP {name} {fam['help']}")
        out.append(f"# TYPE {name} {kind}")
        for values, value in fam["series"]:
            if kind == "histogram":
                cumulative = 0
                for bound, count in zip(fam["buckets"], value["counts"], strict=False):
                    cumulative += count
                    le = 'le="' + _le(bound) + '"'
                    out.append(f"{name}_bucket{_labels_text(names, values, le)} {cumulative}")
                cumulative += value["counts"][-1]
                inf = 'le="+Inf"'
                out.append(f"{name}_bucket{_labels_text(names, values, inf)} {cumulative}")
                out.append(f"{name}_sum{_labels_text(names, values)} {_num(value['sum'])}")
                out.append(f"{name}_count{_labels_text(names, values)} {value['count']}")
            else:
                out.append(f"{name}{_labels_text(names, values)} {_num(value)}")
    return "\n".join(out) + "\n"
