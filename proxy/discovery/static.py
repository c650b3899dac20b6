"""Standalone discovery from a TOML file (SPEC section 6), applied live when it changes.

    [[services]]
    authority = "web.default.svc.cluster.local"
    port = 8080
    vip = "10.96.0.10:8080"            # optional: the service's virtual address (like a ClusterIP)
    [[services.endpoints]]
    addr = "10.0.0.5:8080"
    weight = 1                          # optional, default 1
    identity = "web.default.serviceaccount.identity.linkerd.cluster.local"   # optional: meshed (mTLS)
    zone = "zone-a"                     # optional
    protocol = "http1"                  # optional: http1 | http2 | opaque
    opaque_transport_port = 4143        # optional, meshed endpoints: opaque TCP goes to this inbound
                                        # port behind a transport.l5d.io/v1 header (ref 3.7)

Lookups are by original destination: a service's ``vip`` resolves to all its
endpoints; one endpoint's ``addr`` resolves to that endpoint alone (traffic to
a pod IP is meshed with that pod's identity). ``authority:port`` is looked up
for ingress-style routing by name. A file that fails to parse is reported and
the previous contents stay in use: a typo never empties the mesh.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Addr, parse_addr, parse_duration
from proxy.log import get_logger

log = get_logger("proxy.discovery.static")

PROTOCOLS = ("http1", "http2", "opaque", "")


@dataclass(frozen=True, slots=True)
class Endpoint:
    addr: Addr
    weight: int = 1
    identity: str = ""  # empty: not meshed, plaintext
    zone: str = ""
    protocol: str = ""  # hint: "", "http1", "http2", "opaque"
    labels: tuple[tuple[str, str], ...] = ()
    opaque_transport_port: int = 0  # meshed: opaque TCP goes to this (inbound) port with a transport header


@dataclass(frozen=True, slots=True)
class Route:
    """A service-profile route (ref 10.2): the first route whose conditions match a request applies."""

    name: str
    path_regex: Any = None  # compiled, anchored; None matches any path
    method: str = ""  # "" matches any method
    timeout: float | None = None
    is_retryable: bool = False

    def matches(self, method: bytes, path: bytes) -> bool:
        if self.method and method.decode("latin-1") != self.method:
            return False
        if self.path_regex is not None:
            return self.path_regex.fullmatch(path.split(b"?", 1)[0].decode("latin-1")) is not None
        return True


@dataclass(frozen=True, slots=True)
class RetryBudgetSpec:
    retry_ratio: float = 0.2  # the controller's defaults (ref 10.2)
    min_retries_per_second: int = 10
    ttl: float = 10.0


@dataclass(frozen=True, slots=True)
class Service:
    authority: str
    port: int
    vip: Addr | None
    endpoints: tuple[Endpoint, ...]
    routes: tuple[Route, ...] = ()
    retry_budget: RetryBudgetSpec = RetryBudgetSpec()
    dst_overrides: tuple[tuple[str, int], ...] = ()  # (authority name:port, weight)

    def route_for(self, method: bytes, path: bytes) -> Route | None:
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None  # the implicit default route: no timeout, no retries

    @property
    def name(self) -> str:
        return f"{self.authority}:{self.port}"


@dataclass(frozen=True)
class Resolution:
    """What an original destination resolved to: a logical service (balanced) or one endpoint."""

    endpoints: tuple[Endpoint, ...]
    service: Service | None = None


@dataclass
class Table:
    services: list[Service] = field(default_factory=list)
    by_vip: dict[Addr, Service] = field(default_factory=dict)
    by_endpoint: dict[Addr, Endpoint] = field(default_factory=dict)
    by_name: dict[str, Service] = field(default_factory=dict)


def parse_table(text: str) -> Table:
    """Parse the file; raise ValueError listing every problem."""
    problems: list[str] = []
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not valid TOML: {exc}") from None
    table = Table()
    for i, svc in enumerate(doc.get("services", [])):
        where = f"services[{i}]"
        authority = svc.get("authority", "")
        port = svc.get("port")
        if not isinstance(authority, str) or not authority:
            problems.append(f"{where}: authority is required")
        if not isinstance(port, int) or not 0 < port < 65536:
            problems.append(f"{where}: port must be 1..65535")
            port = 0
        vip = None
        if "vip" in svc:
            try:
                vip = parse_addr(str(svc["vip"]))
            except ValueError as exc:
                problems.append(f"{where}.vip: {exc}")
        endpoints = []
        for j, ep in enumerate(svc.get("endpoints", [])):
            ew = f"{where}.endpoints[{j}]"
            try:
                addr = parse_addr(str(ep.get("addr", "")))
            except ValueError as exc:
                problems.append(f"{ew}.addr: {exc}")
                continue
            weight = ep.get("weight", 1)
            protocol = ep.get("protocol", "")
            if not isinstance(weight, int) or weight < 0:
                problems.append(f"{ew}.weight: must be a whole number >= 0")
                weight = 1
            if protocol not in PROTOCOLS:
                problems.append(f"{ew}.protocol: expected http1, http2 or opaque, got {protocol!r}")
                protocol = ""
            labels = tuple(sorted((str(k), str(v)) for k, v in ep.get("labels", {}).items()))
            transport_port = ep.get("opaque_transport_port", 0)
            if not isinstance(transport_port, int) or not 0 <= transport_port <= 65535:
                problems.append(f"{ew}.opaque_transport_port: expected a port number, got {transport_port!r}")
                transport_port = 0
            identity = str(ep.get("identity", ""))
            if transport_port and not identity:
                problems.append(f"{ew}.opaque_transport_port: needs an identity (the header travels over mTLS only)")
                transport_port = 0
            endpoints.append(Endpoint(addr, weight, identity, str(ep.get("zone", "")), protocol, labels, transport_port))
        routes = []
        for k, r in enumerate(svc.get("routes", [])):
            rw = f"{where}.routes[{k}]"
            regex = None
            if r.get("path_regex"):
                try:
                    regex = re.compile(str(r["path_regex"]))
                except re.error as exc:
                    problems.append(f"{rw}.path_regex: {exc}")
            timeout = None
            if "timeout" in r:
                try:
                    timeout = parse_duration(str(r["timeout"]))
                except ValueError as exc:
                    problems.append(f"{rw}.timeout: {exc}")
            routes.append(Route(str(r.get("name", f"route-{k}")), regex, str(r.get("method", "")).upper(), timeout, bool(r.get("is_retryable", False))))
        budget = RetryBudgetSpec()
        if "retry_budget" in svc:
            b = svc["retry_budget"]
            try:
                budget = RetryBudgetSpec(float(b.get("retry_ratio", 0.2)), int(b.get("min_retries_per_second", 10)),
                                         parse_duration(str(b.get("ttl", "10s"))))
            except (ValueError, TypeError) as exc:
                problems.append(f"{where}.retry_budget: {exc}")
        overrides = []
        for k, o in enumerate(svc.get("dst_overrides", [])):
            w = o.get("weight", 0)
            if not isinstance(w, int) or w < 0 or not o.get("authority"):
                problems.append(f"{where}.dst_overrides[{k}]: needs an authority (name:port) and a weight >= 0")
            elif w > 0:  # zero-weight overrides are dropped (ref 10.2)
                overrides.append((str(o["authority"]), w))
        service = Service(authority, port, vip, tuple(endpoints), tuple(routes), budget, tuple(overrides))
        table.services.append(service)
        if vip is not None:
            table.by_vip[vip] = service
        table.by_name[service.name] = service
        for ep in endpoints:
            table.by_endpoint[ep.addr] = ep
    if problems:
        raise ValueError("; ".join(problems))
    return table


class StaticDiscovery:
    """The discovery file, re-read when its mtime or size changes (checked at most every ``interval`` s)."""

    # A stat() every 200 ms is cheap, and a new endpoint is used well within a second of the edit.
    def __init__(self, path: str, interval: float = 0.2) -> None:
        self.path = path
        self.interval = interval
        self.table = Table()
        self.version = 0
        self._stamp: tuple[float, int] | None = None
        self.reload()

    def reload(self) -> bool:
        """Re-read if changed; True when a new table was installed."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if self._stamp is not None:
                log.warning("discovery file unreadable; keeping the last good contents", path=self.path, error=str(exc))
            self._stamp = None
            return False
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            with open(self.path) as f:
                table = parse_table(f.read())
        except (OSError, ValueError) as exc:
            log.warning("discovery file rejected; keeping the last good contents", path=self.path, error=str(exc))
            return False
        self.table = table
        self.version += 1
        log.info("discovery file applied", path=self.path, services=len(table.services), endpoints=len(table.by_endpoint))
        return True

    def resolve(self, dst: Addr) -> Resolution | None:
        service = self.table.by_vip.get(dst)
        if service is not None:
            return Resolution(tuple(e for e in service.endpoints if e.weight > 0), service)
        endpoint = self.table.by_endpoint.get(dst)
        if endpoint is not None:
            return Resolution((endpoint,))
        return None

    def resolve_name(self, authority: str) -> Resolution | None:
        service = self.table.by_name.get(authority)
        if service is None:
            return None
        return Resolution(tuple(e for e in service.endpoints if e.weight > 0), service)

    async def watch(self, on_change: Any = None) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self.interval)
            if self.reload() and on_change is not None:
                on_change(self)
