"""Power-of-two-choices over the ready endpoints of one backend (ref 4, 6.3).

Theory of operation: the balancer keeps one ``EndpointState`` per address,
each with a ``PeakEwma`` load. ``pick`` draws two distinct endpoints at random
from the *candidates* and returns the cheaper (ties go to the first drawn);
with one candidate it returns it, with none it returns ``None`` and the caller
queues (see ``queue.Queue``) until one is ready or failfast fires.

Candidates are the ready endpoints with a weight above zero, narrowed to the
local zone when ``local_zone`` is set and at least one ready endpoint is in it
(issue 5, topology: traffic stays in-zone while an in-zone endpoint is ready).
The candidate list is rebuilt only when the set or a readiness flag changes,
so ``pick`` does O(1) work whatever the number of endpoints.

Readiness: an endpoint is ready unless it is connecting (``mark_connecting``)
or backing off after a failed connect (``mark_failed``). A backing-off
endpoint becomes a candidate again by itself once its backoff has passed (the
next request is its probe); ``mark_ok`` after a successful connect resets its
backoff. Backoff is linkerd's jittered exponential one (ref 1.5, 3.9).

Weights: the cost compared is ``peak_ewma_cost / weight``. A weight says how
much concurrent load an endpoint is meant to carry, so an endpoint of weight 4
looks as loaded with 4 requests in flight as one of weight 1 with 1 request;
under load P2C then keeps in-flight requests, and so traffic, in proportion to
the weights (tower-balance's historical ``Weighted`` load, used by early
linkerd2-proxy), while latency still steers traffic away from a slow endpoint.
When idle and equally fast, the heavier endpoint simply wins. Exact percentage
splits between backends (``dst_overrides``, backendRefs) are ``split.py``'s job.
Weight 0 means "never chosen".

Updates (``update``): new addresses are added, vanished ones removed, and an
address whose metadata changed gets a fresh state (a new service, as linkerd
rebuilds one). A removed endpoint is only dropped from the candidates: requests
in flight on it keep their ``EndpointState`` and complete normally.

Sans-IO: time is a parameter, randomness is an injected ``random.Random``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import inf
from typing import TYPE_CHECKING

from proxy.balance.ewma import DEFAULT_DECAY, DEFAULT_RTT, PeakEwma

if TYPE_CHECKING:  # only for types: balance does not depend on discovery at run time
    from proxy.config import Addr
    from proxy.discovery.static import Endpoint


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential backoff, linkerd's ``ExponentialBackoff``.

    The n-th consecutive failure (n = 0, 1, ...) waits
    ``base = min(max, min * 2**n)`` plus a uniform jitter in
    ``[0, base * jitter)``, the total never above ``max``.
    """

    # Ref 1.5 / 3.9: outbound connect backoff 100 ms - 60 s, jitter 0.1
    # (LINKERD2_PROXY_OUTBOUND_CONNECT_EXP_BACKOFF_{MIN,MAX,JITTER}); inbound
    # uses max 10 s.
    min: float = 0.1
    max: float = 60.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.min <= self.max or self.max <= 0.0:
            raise ValueError(f"backoff needs 0 <= min <= max and max > 0, got {self.min!r}..{self.max!r}")
        if not 0.0 <= self.jitter <= 100.0:
            raise ValueError(f"backoff jitter must be within 0..100, got {self.jitter!r}")

    def base(self, attempt: int) -> float:
        if attempt >= 64:  # 2**64 * min is past any sane max; avoid huge ints
            return self.max
        return min(self.max, self.min * (1 << attempt))

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = self.base(attempt)
        if self.jitter == 0.0:
            return base
        return base + min(base * self.jitter * rng.random(), self.max - base)


OUTBOUND_BACKOFF = Backoff(0.1, 60.0, 0.1)
INBOUND_BACKOFF = Backoff(0.1, 10.0, 0.1)


class EndpointState:
    """One endpoint as the balancer sees it. ``load`` is its PeakEwma.

    Dispatch on it with ``h = ep.load.start(now)`` and finish with
    ``ep.load.complete(h, now, rtt)``.
    """

    __slots__ = ("addr", "endpoint", "load", "weight", "inv_weight", "zone", "ready", "failures", "retry_at", "removed")

    def __init__(self, endpoint: Endpoint, load: PeakEwma) -> None:
        self.addr: Addr = endpoint.addr
        self.endpoint = endpoint
        self.load = load
        self.weight = endpoint.weight
        # Multiplying by 1/weight is cheaper per pick than dividing; weight 0
        # endpoints are never candidates, so inf is never used in a comparison.
        self.inv_weight = 1.0 / endpoint.weight if endpoint.weight > 0 else inf
        self.zone = endpoint.zone
        self.ready = True
        self.failures = 0  # consecutive connect failures; the backoff exponent
        self.retry_at = inf  # while backing off: when it is eligible again
        self.removed = False

    def __repr__(self) -> str:
        state = "ready" if self.ready else ("backoff" if self.retry_at < inf else "connecting")
        return f"EndpointState({self.addr}, {state}, w={self.weight}, zone={self.zone!r}, {self.load!r})"


class Balancer:
    """P2C + peak-EWMA over one backend's endpoints. Not thread-safe (one per event loop)."""

    def __init__(
        self,
        endpoints: Iterable[Endpoint] = (),
        *,
        local_zone: str = "",
        default_rtt: float = DEFAULT_RTT,
        decay: float = DEFAULT_DECAY,
        backoff: Backoff = OUTBOUND_BACKOFF,
        rng: random.Random | None = None,
        warm_start: bool = False,
        now: float | None = None,
    ) -> None:
        self.local_zone = local_zone
        self.default_rtt = default_rtt
        self.decay = decay
        self.backoff = backoff
        self.rng = rng if rng is not None else random.Random()  # backoff jitter
        # Off (linkerd): a new endpoint starts at default_rtt, so next to warm
        # fast endpoints it gets traffic only once its estimate has decayed
        # (~10 s * ln(30 ms / their RTT): half a minute for 1 ms endpoints at
        # low concurrency). On (a meshproxy option): it starts at half the
        # lowest estimate among the current candidates, so the next pick that
        # draws it sends it a request; its first response then sets its real
        # estimate (a larger sample replaces it), and pending growth caps the
        # burst it can receive before that.
        self.warm_start = warm_start
        # Called (no arguments) when the candidates go from none to some, so a
        # queue can wake its waiters: ``balancer.on_ready = queue.notify_ready``.
        self.on_ready: Callable[[], None] | None = None
        self._by_addr: dict[Addr, EndpointState] = {}
        self._candidates: list[EndpointState] = []
        self._ready_count = 0
        self._next_retry_at = inf  # earliest retry_at among backing-off endpoints
        if endpoints:
            self.update(endpoints, now=now)

    # -- reading -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_addr)

    def __contains__(self, addr: object) -> bool:
        return addr in self._by_addr

    def get(self, addr: Addr) -> EndpointState | None:
        return self._by_addr.get(addr)

    def endpoints(self) -> list[EndpointState]:
        return list(self._by_addr.values())

    @property
    def ready_count(self) -> int:
        """Ready endpoints with weight > 0 (in any zone)."""
        return self._ready_count

    @property
    def candidates(self) -> tuple[EndpointState, ...]:
        """What ``pick`` currently chooses among (after zone preference)."""
        return tuple(self._candidates)

    def next_ready_at(self) -> float | None:
        """When the earliest backing-off endpoint becomes eligible again, or None."""
        return self._next_retry_at if self._next_retry_at < inf else None

    # -- picking (per request) -------------------------------------------------

    def pick(self, now: float, rng: random.Random) -> EndpointState | None:
        """The cheaper of two distinct random candidates; None when none is ready."""
        if now >= self._next_retry_at:
            self._promote(now)
        eps = self._candidates
        n = len(eps)
        if n > 1:
            rand = rng.random
            i = int(rand() * n)
            j = int(rand() * (n - 1))
            if j >= i:
                j += 1  # distinct: j is drawn from the n-1 others
            a = eps[i]
            b = eps[j]
            if b.load.cost(now) * b.inv_weight < a.load.cost(now) * a.inv_weight:
                return b
            return a  # cheaper, or a tie: the first drawn
        if n:
            return eps[0]
        return None

    # -- set management (per discovery update) ------------------------------------

    def update(self, endpoints: Iterable[Endpoint], now: float | None = None) -> None:
        """Replace the endpoint set (a discovery Reset); unchanged endpoints keep their state."""
        old = self._by_addr
        new: dict[Addr, EndpointState] = {}
        seed = self._warm_estimate() if self.warm_start else None
        for endpoint in endpoints:
            current = old.get(endpoint.addr)
            if current is not None and current.endpoint == endpoint:
                new[endpoint.addr] = current
            else:
                new[endpoint.addr] = self._new_state(endpoint, now, seed)
        for addr, state in old.items():
            if new.get(addr) is not state:
                state.removed = True  # in-flight requests finish on it; it is never picked again
        self._by_addr = new
        self._rebuild()

    def add(self, endpoints: Iterable[Endpoint], now: float | None = None) -> None:
        """Upsert (a discovery Add): metadata changes rebuild that endpoint's state."""
        seed = self._warm_estimate() if self.warm_start else None
        for endpoint in endpoints:
            current = self._by_addr.get(endpoint.addr)
            if current is not None and current.endpoint == endpoint:
                continue
            if current is not None:
                current.removed = True
            self._by_addr[endpoint.addr] = self._new_state(endpoint, now, seed)
        self._rebuild()

    def remove(self, addrs: Iterable[Addr]) -> None:
        """Evict addresses (a discovery Remove)."""
        for addr in addrs:
            state = self._by_addr.pop(addr, None)
            if state is not None:
                state.removed = True
        self._rebuild()

    # -- readiness (per connection attempt) ------------------------------------

    def mark_failed(self, ep: EndpointState, now: float, rng: random.Random | None = None) -> float:
        """A connect to ``ep`` failed: not ready until ``now + backoff``; returns that time."""
        delay = self.backoff.delay(ep.failures, rng if rng is not None else self.rng)
        ep.failures += 1
        ep.ready = False
        ep.retry_at = now + delay
        if not ep.removed:
            self._rebuild()
        return ep.retry_at

    def mark_ok(self, ep: EndpointState) -> None:
        """A connect to ``ep`` succeeded: ready, backoff reset."""
        ep.failures = 0
        ep.retry_at = inf
        if not ep.ready:
            ep.ready = True
            if not ep.removed:
                self._rebuild()

    def mark_connecting(self, ep: EndpointState) -> None:
        """``ep`` is not usable until ``mark_ok``/``mark_failed`` (eager connect, e.g. HTTP/2)."""
        ep.retry_at = inf
        if ep.ready:
            ep.ready = False
            if not ep.removed:
                self._rebuild()

    # -- internals -------------------------------------------------------------

    def _new_state(self, endpoint: Endpoint, now: float | None, seed: float | None) -> EndpointState:
        if seed is not None and seed >= self.default_rtt:
            seed = None
        return EndpointState(endpoint, PeakEwma(self.default_rtt, self.decay, now=now, estimate=seed))

    def _warm_estimate(self) -> float | None:
        estimates = [s.load.estimate for s in self._candidates]
        return 0.5 * min(estimates) if estimates else None

    def _promote(self, now: float) -> None:
        """Backing-off endpoints whose time has come are candidates again (the next request probes)."""
        for state in self._by_addr.values():
            if not state.ready and state.retry_at <= now:
                state.ready = True
                state.retry_at = inf  # failures stays: another failure backs off longer
        self._rebuild()

    def _rebuild(self) -> None:
        had_candidates = bool(self._candidates)
        ready: list[EndpointState] = []
        local: list[EndpointState] = []
        next_retry = inf
        zone = self.local_zone
        for state in self._by_addr.values():
            if state.ready:
                if state.weight > 0:
                    ready.append(state)
                    if zone and state.zone == zone:
                        local.append(state)
            elif state.retry_at < next_retry:
                next_retry = state.retry_at
        self._ready_count = len(ready)
        self._candidates = local if local else ready
        self._next_retry_at = next_retry
        if not had_candidates and self._candidates and self.on_ready is not None:
            self.on_ready()
