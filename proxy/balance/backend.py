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

from proxy.balance.budget import RetryBudget
from proxy.balance.p2c import Balancer, EndpointState
from proxy.balance.queue import Queue
from proxy.balance.split import WeightedSplit
from proxy.discovery.static import Endpoint
from proxy.log import get_logger

log = get_logger("proxy.balance.backend")


class Backend:
    __slots__ = ("name", "balancer", "queue", "version", "labels", "service", "budget", "split", "last_used", "dns_task")

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
        self.last_used = asyncio.get_running_loop().time()
        self.dns_task: asyncio.Task[None] | None = None

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
        now = asyncio.get_running_loop().time()
        self.last_used = now
        return self.balancer.pick(now, self.queue.rng)

    async def acquire(self) -> EndpointState:
        self.last_used = asyncio.get_running_loop().time()
        return await self.queue.acquire(self.balancer)

    def idle(self, now: float, timeout: float) -> bool:
        """Unused for ``timeout`` and nothing in flight or queued: its state can go (ref 3.1)."""
        return (now - self.last_used > timeout and not len(self.queue)
                and not any(ep.load.pending for ep in self.balancer.endpoints()))

    def close(self) -> None:
        if self.dns_task is not None:
            self.dns_task.cancel()

    def failed(self, ep: EndpointState) -> None:
        """The endpoint could not be reached: back off from it (ref 1.5 defaults)."""
        self.balancer.mark_failed(ep, asyncio.get_running_loop().time())


class Backends:
    def __init__(self, zone: str, capacity: int, failfast_timeout: float, dns_refresh: float = 5.0) -> None:
        self.zone = zone
        self.capacity = capacity
        self.failfast_timeout = failfast_timeout
        self.dns_refresh = dns_refresh
        self.by_name: dict[str, Backend] = {}

    def sweep(self, now: float, idle_timeout: float) -> int:
        """Drop the backends nobody used for ``idle_timeout``; returns how many went."""
        gone = [name for name, b in self.by_name.items() if b.idle(now, idle_timeout)]
        for name in gone:
            self.by_name.pop(name).close()
        return len(gone)

    def dns(self, authority: str) -> Backend:
        """A name the discovery file does not know: its endpoints are its DNS addresses,
        re-resolved every ``dns_refresh`` seconds (getaddrinfo shows no TTL; see config)."""
        backend = self.by_name.get(authority)
        if backend is None:
            backend = self.by_name[authority] = Backend(authority, self.zone, self.capacity, self.failfast_timeout)
            backend.dns_task = asyncio.get_running_loop().create_task(self._resolve_forever(backend, authority))
        return backend

    async def _resolve_forever(self, backend: Backend, authority: str) -> None:
        import socket

        from proxy.config import Addr

        host, _, port = authority.rpartition(":")
        host = host.strip("[]")
        loop = asyncio.get_running_loop()
        while True:
            try:
                infos = await loop.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
                addrs = sorted({Addr(str(info[4][0]), int(info[4][1])) for info in infos}, key=str)
                backend.balancer.update([Endpoint(a) for a in addrs], now=loop.time())
                backend.labels.clear()
            except (OSError, ValueError, UnicodeError) as exc:
                log.info("DNS resolution failed; keeping the last addresses", name=authority, error=str(exc))
            await asyncio.sleep(self.dns_refresh)

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
