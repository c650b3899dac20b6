"""Outbound discovery through the Linkerd control plane (the Destination API).

``ControlPlaneDiscovery.resolve(dst)`` answers at once, as the static file does: the
first time a destination is seen it opens a ``GetProfile`` for it; a profile naming a
service (``fully_qualified_name``) makes ``name:port`` the logical target, otherwise the
address itself is watched with ``Get``. The endpoint set streams into the destination's
balancer; until the first endpoints arrive, requests wait in its queue (failfast after the
timeout). The last known endpoints stay in use while the controller is unreachable.
"""

from __future__ import annotations

from typing import Any

from proxy.balance.backend import Backend
from proxy.balance.budget import RetryBudget
from proxy.balance.split import WeightedSplit
from proxy.config import Addr, Config
from proxy.discovery.destination import DestinationClient
from proxy.discovery.static import Resolution, RetryBudgetSpec, Route, Service
from proxy.log import get_logger

log = get_logger("proxy.discovery.control")


class ProfileService:
    """A GetProfile answer in the shape the data path reads from the discovery file's services:
    routes (timeouts, retryability), the retry budget and the traffic split (ref 10.2)."""

    def __init__(self, name: str, profile: Any) -> None:
        self.name = name
        self.profile = profile
        budget = profile.retry_budget
        self.retry_budget = RetryBudgetSpec(budget.retry_ratio, budget.min_retries_per_second, budget.ttl) if budget else RetryBudgetSpec(0.0, 0, 10.0)
        self.dst_overrides = tuple((d.authority, d.weight) for d in profile.dst_overrides if d.weight > 0)
        self.routes = profile.routes

    def route_for(self, method: bytes, path: bytes) -> Route | None:
        found = self.profile.route_for(method.decode("latin-1"), path.decode("latin-1"))
        if found is None:
            return None
        # A route is retried only when the profile also has a retry budget (ref 10.2).
        name = dict(found.labels).get("route", "") or "route"
        return Route(name, None, "", found.timeout, found.is_retryable and self.profile.retry_budget is not None)


class _Entry:
    __slots__ = ("backend", "service", "profile_watch", "endpoint_watch", "logical")

    def __init__(self, backend: Backend, service: Service) -> None:
        self.backend = backend
        self.service = service
        self.profile_watch: Any = None
        self.endpoint_watch: Any = None
        self.logical = ""


class ControlPlaneDiscovery:
    version = 0  # the static file's change counter; Backends use their own update path here

    def __init__(self, config: Config, local: Any = None) -> None:
        factory = (lambda: local.client_ctx) if local is not None else None
        self.client = DestinationClient(config, ssl_context_factory=factory)
        self.config = config
        self.entries: dict[Addr, _Entry] = {}
        self.by_name: dict[str, _Entry] = {}

    def resolve(self, dst: Addr) -> Resolution | None:
        entry = self.entries.get(dst)
        if entry is None:
            entry = self._open(dst)
        return Resolution(tuple(e.endpoint for e in entry.backend.balancer.endpoints()), entry.service)

    def resolve_name(self, authority: str) -> Resolution | None:
        return None  # names are watched through backend_for_name (ingress mode)

    def backend_for_name(self, authority: str) -> Backend:
        """Ingress mode: the backend of ``name:port``, its endpoints watched with Get."""
        entry = self.by_name.get(authority)
        if entry is None:
            config = self.config
            backend = Backend(authority, config.zone, config.outbound_http_queue_capacity, config.outbound_http_failfast_timeout)
            entry = self.by_name[authority] = _Entry(backend, Service(authority, 0, None, ()))

            def on_endpoints(endpoints: tuple[Any, ...]) -> None:
                import asyncio

                backend.balancer.update(endpoints, now=asyncio.get_running_loop().time())
                backend.labels.clear()

            entry.endpoint_watch = self.client.watch(authority, on_endpoints)
        return entry.backend

    def backend_for(self, dst: Addr) -> Backend:
        entry = self.entries.get(dst) or self._open(dst)
        return entry.backend

    def _open(self, dst: Addr) -> _Entry:
        config = self.config
        service = Service(str(dst), dst.port, dst, ())
        backend = Backend(str(dst), config.zone, config.outbound_http_queue_capacity, config.outbound_http_failfast_timeout)
        entry = self.entries[dst] = _Entry(backend, service)

        def on_endpoints(endpoints: tuple[Any, ...]) -> None:
            import asyncio

            backend.balancer.update(endpoints, now=asyncio.get_running_loop().time())
            backend.labels.clear()

        def watch(target: str) -> None:
            if entry.logical == target:
                return
            if entry.endpoint_watch is not None:
                entry.endpoint_watch.close()
            entry.logical = target
            entry.endpoint_watch = self.client.watch(target, on_endpoints)
            log.debug("watching endpoints", dst=str(dst), target=target)

        def on_profile(profile: Any) -> None:
            name = getattr(profile, "fully_qualified_name", "") if profile is not None else ""
            logical = f"{name}:{dst.port}" if name else str(dst)
            if profile is not None and (profile.routes or profile.dst_overrides):
                svc = ProfileService(logical, profile)
                backend.service = svc
                try:
                    backend.budget = RetryBudget(svc.retry_budget.retry_ratio, svc.retry_budget.min_retries_per_second, svc.retry_budget.ttl)
                except ValueError:
                    backend.budget = None  # an invalid budget disables retries (ref 10.2)
                parts = [(self.backend_for_name(d), w) for d, w in svc.dst_overrides]
                backend.split = WeightedSplit(parts) if parts else None
            else:
                backend.service = None
                backend.split = None
            watch(logical)

        entry.profile_watch = self.client.get_profile(str(dst), on_profile)
        if entry.profile_watch is None:  # profiles are not looked up for this address: watch it directly
            watch(str(dst))
        return entry

    def sweep(self, now: float, idle_timeout: float) -> int:
        """Close the watches of destinations unused for ``idle_timeout`` (ref 3.1: 5 s outbound)."""
        gone = 0
        tables: tuple[dict[Any, _Entry], ...] = (self.entries, self.by_name)
        for table in tables:
            for key in [k for k, e in table.items() if e.backend.idle(now, idle_timeout)]:
                entry = table.pop(key)
                for w in (entry.profile_watch, entry.endpoint_watch):
                    if w is not None:
                        w.close()
                gone += 1
        return gone

    async def close(self) -> None:
        for entry in [*self.entries.values(), *self.by_name.values()]:
            if entry.profile_watch is not None:
                entry.profile_watch.close()
            if entry.endpoint_watch is not None:
                entry.endpoint_watch.close()
        await self.client.close()
