"""The asyncio side of a backend: wait for a ready endpoint, bounded, with failfast (ref 3.9).

Theory of operation: ``await queue.acquire(balancer)`` returns an endpoint at
once when the balancer has a ready one (no future, no task: the common case
costs one ``pick``). Otherwise the caller waits in a bounded FIFO of futures
until ``notify_ready()`` (wire it as ``balancer.on_ready = queue.notify_ready``),
a backing-off endpoint's retry time, or the failfast deadline, whichever
comes first; woken waiters pick again.

Outcomes and how the HTTP layer answers them (ref 3.5, ``proxy.http.errors``):

* ``FailFast``  -> 504, ``l5d-proxy-error: service in fail-fast``,
  ``error="failfast"``, gRPC DEADLINE_EXCEEDED (4), connection closed (fatal).
  Raised for every waiter when the failfast deadline passes and for new
  requests while the backend stays in failfast. ``exc.waited`` tells which:
  linkerd answers the second kind through its shut gate and load-shed layer
  (503), so map ``waited=False`` to 503 if you want that exactness.
* ``LoadShed``  -> 503, ``l5d-proxy-error: service unavailable``,
  ``error="loadshed"``, gRPC UNAVAILABLE (14), fatal. Raised when
  ``capacity`` requests are already waiting.
* For opaque TCP, either error just closes the accepted connection.

A waiter whose task is cancelled (the client went away) removes its future
in ``finally``; when the last waiter leaves, the wake-up timer is cancelled.
Nothing else holds a reference to it.
"""

from __future__ import annotations

import asyncio
import random
from math import inf
from typing import TYPE_CHECKING

from proxy.balance.failfast import FAILFAST, OUTBOUND_FAILFAST_TIMEOUT, Failfast

if TYPE_CHECKING:
    from proxy.balance.p2c import Balancer, EndpointState

# Ref 1.5 / 3.9: LINKERD2_PROXY_*_HTTP_QUEUE_CAPACITY and the outbound TCP
# connection queue: 10000 waiting requests per backend, then shed.
DEFAULT_CAPACITY = 10_000


class FailFast(Exception):
    """No endpoint became ready within the failfast timeout (504, ``error="failfast"``)."""

    status = 504
    error = "failfast"

    def __init__(self, waited: bool = True) -> None:
        super().__init__("service in fail-fast")
        self.waited = waited  # False: refused on arrival because the backend is in failfast


class LoadShed(Exception):
    """The queue is full (503, ``error="loadshed"``)."""

    status = 503
    error = "loadshed"

    def __init__(self) -> None:
        super().__init__("service unavailable")


class Queue:
    """Bounded wait for a ready endpoint of one backend. One per event loop."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        failfast_timeout: float = OUTBOUND_FAILFAST_TIMEOUT,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"queue capacity must be >= 0, got {capacity!r}")
        self.capacity = capacity
        self.failfast = Failfast(failfast_timeout)
        self.rng = rng if rng is not None else random.Random()
        # Insertion-ordered set of waiting futures: FIFO wake-ups, O(1) removal on cancel.
        # A waiter's future resolves to None (pick again now) or to the time its
        # wake-up timer was set for (pick again as of then; see ``_on_timer``).
        self._waiters: dict[asyncio.Future[float | None], None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = inf

    def __len__(self) -> int:
        """Requests waiting now (the ``*_balancer_queue_length`` gauge)."""
        return len(self._waiters)

    async def acquire(self, balancer: Balancer) -> EndpointState:
        """An endpoint to dispatch to; raises ``FailFast`` or ``LoadShed``."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        ep = balancer.pick(now, self.rng)
        if ep is not None:
            if self.failfast.active:
                self.failfast.on_ready()
            if self._waiters:
                self._wake_all()  # readiness arrived without notify_ready: let the queue go too
            return ep
        return await self._wait(loop, balancer, now)

    def notify_ready(self) -> None:
        """An endpoint may be ready: wake every waiter to pick again."""
        if self._waiters:
            self._wake_all()

    async def _wait(self, loop: asyncio.AbstractEventLoop, balancer: Balancer, now: float) -> EndpointState:
        failfast = self.failfast
        waited = False
        while True:
            if failfast.on_no_ready_endpoint(now) == FAILFAST:
                raise FailFast(waited)
            if len(self._waiters) >= self.capacity:
                raise LoadShed()
            fut: asyncio.Future[float | None] = loop.create_future()
            self._waiters[fut] = None
            wake_at = failfast.deadline if failfast.deadline is not None else inf
            retry_at = balancer.next_ready_at()
            if retry_at is not None and retry_at < wake_at:
                wake_at = retry_at
            self._arm(loop, wake_at)
            try:
                woken_at = await fut
            finally:
                self._waiters.pop(fut, None)
                if not self._waiters:
                    self._disarm()
                del fut
            waited = True
            now = loop.time()
            if woken_at is not None and woken_at > now:
                now = woken_at
            ep = balancer.pick(now, self.rng)
            if ep is not None:
                failfast.on_ready()
                return ep

    def _wake_all(self, at: float | None = None) -> None:
        waiters = self._waiters
        self._waiters = {}
        self._disarm()
        for fut in waiters:
            if not fut.done():
                fut.set_result(at)

    def _fail_all(self) -> None:
        waiters = self._waiters
        self._waiters = {}
        self._disarm()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(FailFast(True))

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if at == inf or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._on_timer, loop)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = inf

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        # Timers may fire a little before their time (uvloop's clock and timers
        # have 1 ms steps): the moment this timer stands for has come, so use
        # it rather than spin until the clock catches up.
        now = max(loop.time(), self._timer_at)
        self._timer = None
        self._timer_at = inf
        if self.failfast.state(now) == FAILFAST:
            self._fail_all()
        else:
            # A backoff expired: everyone picks again, as of ``now``; whoever
            # still finds nothing queues again and re-arms the timer.
            self._wake_all(now)
