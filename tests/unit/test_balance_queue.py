"""Failfast (sans-IO) and the asyncio queue in front of a balancer (proxy.balance).

The queue tests run on ``VirtualTimeLoop``: a selector event loop whose clock
only moves when the loop would otherwise block, and then jumps straight to
the next timer. A 3 s failfast takes no wall time and lands exactly on its
deadline; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import gc
import random
import selectors
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.balance.failfast import FAILFAST, OK, WAITING, Failfast
from proxy.balance.p2c import Backoff, Balancer
from proxy.balance.queue import FailFast, LoadShed, Queue
from proxy.config import Addr
from proxy.discovery.static import Endpoint

A = Endpoint(Addr("10.0.0.1", 8080))
B = Endpoint(Addr("10.0.0.2", 8080))


# -- Failfast (fake clock: plain floats) -------------------------------------------------


def test_failfast_fails_exactly_after_the_timeout_and_clears_on_ready() -> None:
    ff = Failfast(3.0)
    assert ff.state(100.0) == OK and ff.deadline is None
    assert ff.on_no_ready_endpoint(100.0) == WAITING
    assert ff.deadline == 103.0
    ff.on_no_ready_endpoint(102.0)  # the timer is not restarted by later requests
    assert ff.state(102.999999) == WAITING
    assert ff.state(103.0) == FAILFAST
    assert ff.state(500.0) == FAILFAST
    assert ff.shut_total == 1
    ff.on_ready()
    assert ff.state(500.0) == OK and ff.open_total == 1
    # a new episode starts a new timer
    assert ff.on_no_ready_endpoint(600.0) == WAITING
    assert ff.state(602.5) == WAITING
    assert ff.state(603.0) == FAILFAST and ff.shut_total == 2


def test_failfast_cleared_while_waiting_never_shuts() -> None:
    ff = Failfast(1.0)
    ff.on_no_ready_endpoint(0.0)
    ff.on_ready()
    assert ff.state(5.0) == OK and ff.shut_total == 0 and ff.open_total == 0


def test_failfast_zero_timeout_fails_at_once() -> None:
    ff = Failfast(0.0)
    assert ff.on_no_ready_endpoint(7.0) == FAILFAST


# -- a virtual-time event loop -------------------------------------------------------------


class _JumpSelector(selectors.BaseSelector):
    """Polls the real selector without blocking; a wait advances the loop's clock instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if not ready and timeout is not None and timeout > 0:
            self._loop.advance(timeout)
        if not ready and timeout is None:
            raise RuntimeError("deadlock: nothing scheduled and nothing to read")
        return ready

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual_now = 1000.0
        super().__init__(selector=_JumpSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


# -- Queue ---------------------------------------------------------------------------------


def test_acquire_returns_at_once_when_an_endpoint_is_ready() -> None:
    async def main() -> None:
        bal = Balancer([A])
        q = Queue(capacity=10, failfast_timeout=3.0, rng=random.Random(1))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        state = await q.acquire(bal)
        assert state.addr == A.addr
        assert loop.time() == t0 and len(q) == 0 and q._timer is None

    run(main)


def test_no_endpoints_fail_fast_exactly_after_the_timeout_then_recover() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bal = Balancer()
        q = Queue(capacity=100, failfast_timeout=1.0, rng=random.Random(1))
        bal.on_ready = q.notify_ready
        t0 = loop.time()
        results = await asyncio.gather(*(q.acquire(bal) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, FailFast) and r.waited for r in results)
        assert loop.time() - t0 == pytest.approx(1.0, abs=1e-6)
        assert len(q) == 0 and q._timer is None
        # in failfast: new requests fail on arrival, without waiting
        t1 = loop.time()
        with pytest.raises(FailFast) as info:
            await q.acquire(bal)
        assert not info.value.waited and loop.time() == t1
        assert info.value.status == 504 and info.value.error == "failfast"
        # an endpoint appears: the gate reopens at once
        bal.update([A])
        assert (await q.acquire(bal)).addr == A.addr
        assert q.failfast.state(loop.time()) == OK

    run(main)


def test_waiters_are_woken_when_an_endpoint_becomes_ready() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bal = Balancer()
        q = Queue(capacity=100, failfast_timeout=3.0, rng=random.Random(1))
        bal.on_ready = q.notify_ready
        waiters = [asyncio.ensure_future(q.acquire(bal)) for _ in range(5)]
        await asyncio.sleep(0)  # virtual: lets them queue
        assert len(q) == 5
        loop.call_later(2.0, bal.update, [A, B])
        t0 = loop.time()
        got = await asyncio.gather(*waiters)
        assert {s.addr for s in got} <= {A.addr, B.addr}
        assert loop.time() - t0 == pytest.approx(2.0)
        assert len(q) == 0 and q._timer is None
        assert q.failfast.state(loop.time()) == OK

    run(main)


def test_backoff_expiry_wakes_waiters_without_notify() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bal = Balancer([A], backoff=Backoff(0.5, 60.0, 0.0))
        q = Queue(capacity=10, failfast_timeout=3.0, rng=random.Random(1))
        t0 = loop.time()
        state = bal.get(A.addr)
        assert state is not None
        bal.mark_failed(state, t0)
        state = await q.acquire(bal)  # no on_ready hook: the queue's timer finds the retry time
        assert state.addr == A.addr
        assert loop.time() - t0 == pytest.approx(0.5)

    run(main)


def test_queue_full_sheds_load() -> None:
    async def main() -> None:
        bal = Balancer()
        q = Queue(capacity=3, failfast_timeout=3.0, rng=random.Random(1))
        waiters = [asyncio.ensure_future(q.acquire(bal)) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(q) == 3
        with pytest.raises(LoadShed) as info:
            await q.acquire(bal)
        assert info.value.status == 503 and info.value.error == "loadshed"
        bal.update([A])
        q.notify_ready()
        assert all(s.addr == A.addr for s in await asyncio.gather(*waiters))

    run(main)


def test_cancelled_waiters_leave_nothing_behind() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bal = Balancer()
        q = Queue(capacity=20_000, failfast_timeout=3.0, rng=random.Random(1))
        baseline = len(asyncio.all_tasks(loop))
        tasks = [asyncio.ensure_future(q.acquire(bal)) for _ in range(10_000)]
        await asyncio.sleep(0)
        assert len(q) == 10_000 and q._timer is not None
        futures = [weakref.ref(f) for f in q._waiters]
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        del tasks, results
        assert len(q) == 0
        assert q._timer is None  # the failfast wake-up was cancelled with the last waiter
        gc.collect()
        assert all(ref() is None for ref in futures)
        assert len(asyncio.all_tasks(loop)) == baseline
        # the backend's failfast clock keeps running (as in linkerd) but nothing is scheduled
        assert q.failfast.state(loop.time()) == WAITING
        assert not loop._scheduled or all(h.cancelled() for h in loop._scheduled)

    run(main)


def test_waiter_cancelled_while_being_failed_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bal = Balancer()
        q = Queue(capacity=10, failfast_timeout=1.0, rng=random.Random(1))
        task = asyncio.ensure_future(q.acquire(bal))
        await asyncio.sleep(0)
        fut = next(iter(q._waiters))
        q._fail_all()  # the deadline fires...
        assert fut.done()
        task.cancel()  # ...and the client goes away before the waiter resumes
        with pytest.raises((asyncio.CancelledError, FailFast)):
            await task
        del fut, task
        gc.collect()
        assert len(q) == 0
        assert loop.time() >= 0

    run(main)
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_fifo_waiters_all_fail_together_when_the_deadline_passes() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        bal = Balancer()
        q = Queue(capacity=100, failfast_timeout=3.0, rng=random.Random(1))
        first = asyncio.ensure_future(q.acquire(bal))
        await asyncio.sleep(2.0)
        t_second = loop.time()
        second = asyncio.ensure_future(q.acquire(bal))
        done = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, FailFast) for r in done)
        # the second request waited only until the backend's deadline, not 3 s of its own
        assert loop.time() - t_second == pytest.approx(1.0)

    run(main)
