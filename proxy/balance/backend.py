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
from proxy.balance.queue import Queue
from proxy.discovery.static import Endpoint


class Backend:
    __slots__ = ("name", "balancer", "queue", "version", "labels")

    def __init__(self, name: str, zone: str, capacity: int, failfast_timeout: float) -> None:
        self.name = name
        # warm_start: a newly discovered endpoint is tried at once instead of after its default
        # 30 ms estimate decays (tens of seconds next to fast endpoints); its first response sets it.
        self.balancer = Balancer(local_zone=zone, warm_start=True)
        self.queue = Queue(capacity, failfast_timeout)
        self.balancer.on_ready = self.queue.notify_ready
        self.version = -1
        self.labels: dict[Any, Any] = {}  # per-endpoint metric labels, built once

    def refresh(self, endpoints: Iterable[Endpoint], version: int) -> None:
        if version != self.version:
            self.version = version
            self.balancer.update(endpoints, now=asyncio.get_running_loop().time())
            self.labels.clear()

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

    def get(self, name: str, endpoints: Iterable[Endpoint], version: int) -> Backend:
        backend = self.by_name.get(name)
        if backend is None:
            backend = self.by_name[name] = Backend(name, self.zone, self.capacity, self.failfast_timeout)
        backend.refresh(endpoints, version)
        return backend
