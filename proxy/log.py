"""Logs: structlog to stdout, ``plain`` or ``json``, filtered like Linkerd's EnvFilter.

A filter is a comma list of directives, ``level`` or ``target=level`` (levels
trace, debug, info, warn, error, off), e.g. ``warn,linkerd=info,proxy.transport=debug``.
Our logger names are module paths under ``proxy``; a Linkerd target beginning
with ``linkerd`` names the same thing, so a filter written for linkerd2-proxy
keeps its meaning. The most specific matching target wins.

The filter is process-global and can be replaced at runtime (the admin
``PUT /proxy-log-level``); the supervisor forwards it to every worker. A level
check is a dict lookup cached per logger name, so disabled calls cost little,
but hot paths still guard debug logs with ``enabled()``.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import structlog

LEVELS = {"trace": 5, "debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "off": 100}
LEVEL_NAMES = {5: "trace", 10: "debug", 20: "info", 30: "warn", 40: "error"}
_START = time.monotonic()


@dataclass(frozen=True)
class LogFilter:
    text: str
    default: int
    targets: tuple[tuple[str, int], ...]  # longest target first

    @classmethod
    def parse(cls, text: str) -> LogFilter:
        default = LEVELS["error"]
        targets: list[tuple[str, int]] = []
        for directive in (d.strip() for d in text.split(",")):
            if not directive:
                continue
            # Linkerd appends span filters such as `[{headers}]=off`; they do not apply to us.
            if directive.startswith("["):
                continue
            target, sep, level = directive.rpartition("=") if "=" in directive else ("", "", directive)
            level = level.strip().lower()
            if not sep and level not in LEVELS:
                # A bare target (`linkerd`) enables everything under it, as in tracing-subscriber.
                target, sep, level = directive, "=", "trace"
            if level not in LEVELS:
                raise ValueError(f"invalid log level {level!r} in directive {directive!r}")
            if sep:
                target = target.strip()
                if not target or any(c.isspace() for c in target):
                    raise ValueError(f"invalid target in directive {directive!r}")
                targets.append((normalise_target(target), LEVELS[level]))
            else:
                default = LEVELS[level]
        targets.sort(key=lambda t: len(t[0]), reverse=True)
        return cls(text.strip(), default, tuple(targets))

    def level_for(self, name: str) -> int:
        for target, level in self.targets:
            if name == target or name.startswith(target + "."):
                return level
        return self.default


def normalise_target(target: str) -> str:
    """``linkerd_app_inbound`` / ``linkerd::x`` / ``proxy.x`` -> ``proxy...``."""
    target = target.replace("::", ".")
    if target == "linkerd" or target.startswith("linkerd"):
        rest = target[len("linkerd"):].lstrip("_.")
        return "proxy" + ("." + rest.replace("_", ".") if rest else "")
    return target


_filter = LogFilter.parse("warn,linkerd=info,hickory=error")
_cache: dict[str, int] = {}


def set_filter(text: str) -> LogFilter:
    """Replace the filter (raises ValueError on a bad one, leaving the old in place)."""
    global _filter
    new = LogFilter.parse(text)
    _filter = new
    _cache.clear()
    return new


def current_filter() -> str:
    return _filter.text


def enabled(name: str, level: int) -> bool:
    threshold = _cache.get(name)
    if threshold is None:
        threshold = _cache[name] = _filter.level_for(name)
    return level >= threshold


def _uptime(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    # Linkerd's plain format shows process uptime, `[    12.345678s]`.
    event["uptime"] = f"[{time.monotonic() - _START:>10.6f}s]"
    return event


class _Bound:
    """A logger for one target; methods named after levels."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def _log(self, method: str, event: str, **kw: Any) -> None:
        if enabled(self.name, LEVELS[method]):
            structlog.get_logger().log(LEVELS[method] if LEVELS[method] >= 10 else 10, event, _logger_name=self.name, _method=method, **kw)

    def trace(self, event: str, **kw: Any) -> None:
        self._log("trace", event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warn", event, **kw)

    warn = warning

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, **kw)


def get_logger(name: str) -> _Bound:
    return _Bound(name)


def _name_level(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["target"] = event.pop("_logger_name", "proxy")
    event["level"] = event.pop("_method", method)
    return event


def configure(filter_text: str, fmt: str, worker: int | None = None) -> None:
    """Set up structlog once per process."""
    set_filter(filter_text)
    processors: list[Any] = [_name_level]
    if worker is not None:
        processors.append(lambda _logger, _method, event: {**event, "worker": worker})
    if fmt == "json":
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"), structlog.processors.JSONRenderer()]
    else:
        processors += [_uptime, _plain_renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        # One write per record, newline included: worker processes share stdout and must not interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def _plain_renderer(logger: Any, method: str, event: dict[str, Any]) -> str:
    uptime = event.pop("uptime", "")
    level = event.pop("level", "").upper()
    target = event.pop("target", "")
    message = event.pop("event", "")
    fields = " ".join(f"{k}={v}" for k, v in event.items())
    return f"{uptime} {level:>5} {target}: {message}" + (f" {fields}" if fields else "")
