"""Process metrics (the standard Prometheus set), summed over the proxy's processes.

prometheus-client's ProcessCollector reads /proc for one process; the
supervisor adds up its own figures and every worker's, so one scrape shows the
whole proxy (RSS and CPU of all processes; the earliest start time).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.registry import CollectorRegistry

_HOW = {
    "process_start_time_seconds": min,
    "process_max_fds": max,
}
_collector = ProcessCollector(registry=CollectorRegistry())


def sample() -> dict[str, list[Any]]:
    """{name: [type, help, value]} for this process."""
    out: dict[str, list[Any]] = {}
    for metric in _collector.collect():
        for s in metric.samples:
            out[s.name] = [metric.type, metric.documentation, s.value]
    return out


def merge(samples: list[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {}
    for one in samples:
        for name, (kind, doc, value) in one.items():
            if name not in merged:
                merged[name] = [kind, doc, value]
            else:
                merged[name][2] = _HOW.get(name, lambda a, b: a + b)(merged[name][2], value)
    return merged


def render(merged: dict[str, list[Any]]) -> str:
    lines = []
    for name, (kind, doc, value) in merged.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {value!r}" if isinstance(value, float) and not value.is_integer() else f"{name} {int(value)}")
    return "\n".join(lines) + "\n"
