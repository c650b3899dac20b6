"""One logical service's endpoints inside one worker: a P2C/peak-EWMA balancer and its failfast queue.

``Backends`` keeps them per service name and refreshes a backend's endpoint set when
discovery's version changes. The data path picks an endpoint per HTTP request and per
opaque TCP connection (ref 4): ``pick_now`` when one is ready, else ``acquire``, which waits
in the queue and raises FailFast (504) after the failfast timeout or LoadShed (503) when full.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from proxy.balance.p2c import Balancer, EndpointState
from proxy.balance.budget import RetryBudget
from proxy.balance.queue import Queue
from proxy.balance.split import WeightedSplit
from proxy.discovery.static import Endpoint


class Backend:
    __slots__ = ("name", "balancer", "queue", "version", "labels", "service", "budget", "split")

    def __init__(self, name: str, zone: str, capacity: int, failfast_timeout: float) -> None:
        self.name = name
        self.service: Any = None  # discovery.static.Service: routes, retry budget, dst_overrides
        self.budget: RetryBudget | None = None
        self.split: WeightedSplit[Backend] | None = None  # dst_overrides: weighted choice of backends per request
        # warm_start: a newly discovered endpoint is tried at once instead of after its default
        # 30 ms estimate decays (tens of seconds next to fast endpoints); its first response sets it.
        self.balancer = Balancer(local_zone=zone, warm_start=True)
        self.queue = Queue(capacity, failfast_timeout)
        self.balancer.on_ready = self.queue.notify_ready
        self.version = -1
        self.labels: dict[Any, Any] = {}  # per-endpoint metric labels, built once

    def refresh(self, endpoints: Iterable[Endpoint], version: int, service: Any = None) -> bool:
        if version == self.version:
            return False
        self.version = version
        self.balancer.update(endpoints, now=asyncio.get_running_loop().time())
        self.labels.clear()
        if service is not None:
            self.service = service
            spec = service.retry_budget
            try:
                self.budget = RetryBudget(spec.retry_ratio, spec.min_retries_per_second, spec.ttl)
            except ValueError:
                self.budget = None  # an invalid budget disables retries (ref 10.2)
        return True

    def concrete(self, rng: Any) -> Backend:
        """The backend this request goes to: one of the dst_overrides by weight, else this one."""
        if self.split is None:
            return self
        return self.split.pick(rng, lambda b: b.queue.failfast.state(asyncio.get_running_loop().time()) != "failfast") or self

    def pick_now(self) -> EndpointState | None:
        return self.balancer.pick(asyncio.get_running_loop().time(), self.queue.rng)

    async def acquire(self) -> EndpointState:
        return await self.queue.acquire(self.balancer)

    def failed(self, ep: EndpointState) -> None:
        """The endpoint could not be reached: back off from it (ref 1.5 defaults)."""
        self.balancer.mark_failed(ep, asyncio.get_running_loop().time())


class Backends:
    def __init__(self, zone: str, capacity: int, failfast_timeout: float) -> None:
        self.zone = zone
        self.capacity = capacity
        self.failfast_timeout = failfast_timeout
        self.by_name: dict[str, Backend] = {}

    def get(self, name: str, endpoints: Iterable[Endpoint], version: int, service: Any = None, discovery: Any = None) -> Backend:
        backend = self.by_name.get(name)
        if backend is None:
            backend = self.by_name[name] = Backend(name, self.zone, self.capacity, self.failfast_timeout)
        if backend.refresh(endpoints, version, service) and service is not None and discovery is not None:
            # Traffic split (ref 10.2): each dst_override is a service of its own, balanced on its own.
            parts = []
            for authority, weight in service.dst_overrides:
                found = discovery.resolve_name(authority)
                if found is not None and found.service is not None:
                    parts.append((self.get(authority, found.endpoints, version, found.service), weight))
            backend.split = WeightedSplit(parts) if parts else None
        return backend
