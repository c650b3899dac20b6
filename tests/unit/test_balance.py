"""Peak-EWMA, P2C, endpoint-set updates, backoff and traffic splits (proxy.balance).

No event loop, no sleeping: time is a float handed to every call, randomness
is a seeded ``random.Random``. The distribution tests drive a small simulated
world (``simulate``): requests arrive every ``interval`` seconds, each is
dispatched with ``pick`` + ``start`` and completes ``latency(addr, t)`` later
with that RTT sample, in time order.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable

import pytest

from proxy.balance.ewma import PeakEwma
from proxy.balance.p2c import Backoff, Balancer, EndpointState
from proxy.balance.split import WeightedSplit
from proxy.config import Addr
from proxy.discovery.static import Endpoint

A, B, C, D = (Addr(f"10.0.0.{i}", 8080) for i in (1, 2, 3, 4))


def ep(addr: Addr, weight: int = 1, zone: str = "", identity: str = "") -> Endpoint:
    return Endpoint(addr, weight=weight, identity=identity, zone=zone)


def got(bal: Balancer, addr: Addr) -> EndpointState:
    state = bal.get(addr)
    assert state is not None
    return state


def picked(bal: Balancer, now: float, rng: random.Random) -> Addr:
    state = bal.pick(now, rng)
    assert state is not None
    return state.addr


class World:
    """A simulated clock with in-flight requests completing in time order."""

    def __init__(self, balancer: Balancer, seed: int = 1) -> None:
        self.balancer = balancer
        self.rng = random.Random(seed)
        self.now = 0.0
        self._inflight: list[tuple[float, int, EndpointState, float, float]] = []
        self._seq = 0

    def simulate(self, requests: int, interval: float, latency: Callable[[Addr, float], float]) -> Counter[Addr]:
        picks: Counter[Addr] = Counter()
        for _ in range(requests):
            self._complete_until(self.now)
            chosen = self.balancer.pick(self.now, self.rng)
            assert chosen is not None
            handle = chosen.load.start(self.now)
            rtt = latency(chosen.addr, self.now)
            self._seq += 1
            heapq.heappush(self._inflight, (self.now + rtt, self._seq, chosen, handle, rtt))
            picks[chosen.addr] += 1
            self.now += interval
        return picks

    def _complete_until(self, t: float) -> None:
        while self._inflight and self._inflight[0][0] <= t:
            done, _, state, handle, rtt = heapq.heappop(self._inflight)
            state.load.complete(handle, done, rtt)


# -- peak-EWMA ---------------------------------------------------------------------


def test_ewma_starts_at_default_rtt_and_pending_multiplies_cost() -> None:
    e = PeakEwma(now=0.0)
    assert e.cost(0.0) == pytest.approx(0.030)
    h1 = e.start(0.0)
    e.start(0.0)
    assert e.pending == 2
    assert e.cost(0.0) == pytest.approx(0.030 * 3)
    e.complete(h1, 0.0)  # no sample: only the pending slot is released
    assert e.pending == 1
    assert e.estimate == pytest.approx(0.030)


def test_ewma_default_rtt_is_floored_at_1ms() -> None:
    assert PeakEwma(default_rtt=0.0).default_rtt == 0.001
    assert PeakEwma(default_rtt=0.0002).estimate == 0.001
    with pytest.raises(ValueError):
        PeakEwma(decay=0.0)


def test_ewma_peak_sample_replaces_estimate() -> None:
    e = PeakEwma(now=0.0)
    h = e.start(0.0)
    e.complete(h, 0.080, rtt=0.080)
    assert e.estimate == 0.080  # replaced, no blending
    assert e.cost(0.080) == pytest.approx(0.080)


def test_ewma_lower_sample_blends_with_elapsed_weight() -> None:
    e = PeakEwma(now=0.0)
    h = e.start(4.99)
    e.complete(h, 5.0, rtt=0.010)  # 5 s since the estimate was last touched
    w = math.exp(-5.0 / 10.0)
    assert e.estimate == pytest.approx(0.030 * w + 0.010 * (1 - w))
    assert e.estimate == pytest.approx(0.022131, abs=1e-6)


def test_ewma_decays_toward_zero_when_read() -> None:
    e = PeakEwma(now=0.0)
    assert e.cost(10.0) == pytest.approx(0.030 * math.exp(-1.0))
    # decay composes: reading often or once gives the same estimate
    f = PeakEwma(now=0.0)
    for t in range(1, 11):
        f.cost(float(t))
    assert f.estimate == pytest.approx(e.estimate)
    assert e.cost(100.0) == pytest.approx(0.030 * math.exp(-10.0))


def test_ewma_read_then_sample_uses_time_since_the_read() -> None:
    e = PeakEwma(now=0.0)
    e.cost(10.0)  # decayed and re-stamped at t=10
    decayed = e.estimate
    h = e.start(10.0)
    e.complete(h, 10.0, rtt=0.001)  # no time since the read: the sample has no weight
    assert e.estimate == pytest.approx(decayed)


def test_ewma_without_initial_stamp_starts_clock_on_first_use() -> None:
    e = PeakEwma()
    assert e.cost(12345.0) == pytest.approx(0.030)  # no decay from an unknown origin
    assert e.cost(12355.0) == pytest.approx(0.030 * math.exp(-1.0))


def test_ewma_double_completion_never_makes_pending_negative() -> None:
    e = PeakEwma(now=0.0)
    h = e.start(0.0)
    e.complete(h, 0.01)
    e.complete(h, 0.01)
    assert e.pending == 0


# -- P2C ---------------------------------------------------------------------------------


def test_pick_none_one_two() -> None:
    rng = random.Random(0)
    bal = Balancer(now=0.0)
    assert bal.pick(0.0, rng) is None
    bal.update([ep(A)], now=0.0)
    assert picked(bal, 0.0, rng) == A
    bal.update([ep(A), ep(B)], now=0.0)
    a = got(bal, A)
    a.load.start(0.0)  # A busy: cost 2x
    assert all(picked(bal, 0.0, rng) == B for _ in range(50))


def test_pick_draws_two_distinct_and_tie_goes_to_first() -> None:
    class Scripted(random.Random):
        def __init__(self, values: list[float]) -> None:
            super().__init__(0)
            self.values = values

        def random(self) -> float:
            return self.values.pop(0)

    bal = Balancer([ep(A), ep(B), ep(C)], now=0.0)
    # i = int(0.5 * 3) = 1 (B); j = int(0.4 * 2) = 0 (A): equal costs, the first drawn (B) wins
    assert picked(bal, 0.0, Scripted([0.5, 0.4])) == B
    # i = 1 (B); j = int(0.6 * 2) = 1 -> shifted past i to 2 (C): never the same endpoint twice
    assert picked(bal, 0.0, Scripted([0.5, 0.6])) == B
    got(bal, B).load.start(0.0)
    assert picked(bal, 0.0, Scripted([0.5, 0.6])) == C


def test_slow_endpoint_loses_traffic_and_gets_it_back_after_recovery() -> None:
    """Issue 5 acceptance, simulated: one of three endpoints 50 ms slower."""
    bal = Balancer([ep(A), ep(B), ep(C)], now=0.0)
    world = World(bal, seed=3)
    slow = {"on": True}

    def latency(addr: Addr, t: float) -> float:
        return 0.055 if (addr == C and slow["on"]) else 0.005

    world.simulate(300, 0.01, latency)  # warm-up: 3 s
    picks = world.simulate(3000, 0.01, latency)  # 30 s
    assert picks[C] / 3000 < 0.10
    assert picks[A] / 3000 > 0.4 and picks[B] / 3000 > 0.4

    slow["on"] = False
    # Its peak estimate has to decay below the others' before it is probed
    # again (about decay * ln(55 / 5) = 24 s); then its share returns.
    world.simulate(4000, 0.01, latency)
    back = world.simulate(3000, 0.01, latency)
    assert 0.25 < back[C] / 3000 < 0.42


def test_pending_steers_traffic_under_concurrency() -> None:
    """Equal latency, 30 requests in flight: P2C keeps in-flight counts level."""
    bal = Balancer([ep(A), ep(B), ep(C)], now=0.0)
    world = World(bal, seed=5)
    world.simulate(500, 0.001, lambda a, t: 0.030)
    picks = world.simulate(3000, 0.001, lambda a, t: 0.030)
    for addr in (A, B, C):
        assert abs(picks[addr] / 3000 - 1 / 3) < 0.05


def test_weights_split_traffic_in_proportion_under_load() -> None:
    """Endpoint weights divide the cost: 80/20 over 2000 requests within 5 points.

    Weights are capacity weights (cost / weight), so the split follows them
    once requests overlap (here ~20 in flight); with one request at a time
    and equal RTTs the heavier endpoint simply always wins (checked below).
    Exact splits between backends are WeightedSplit's job.
    """
    bal = Balancer([ep(A, weight=80), ep(B, weight=20)], now=0.0)
    world = World(bal, seed=7)
    world.simulate(500, 0.0005, lambda a, t: 0.010)
    picks = world.simulate(2000, 0.0005, lambda a, t: 0.010)
    assert abs(picks[A] / 2000 - 0.80) <= 0.05

    idle = Balancer([ep(A, weight=80), ep(B, weight=20)], now=0.0)
    world = World(idle, seed=7)
    picks = world.simulate(200, 0.05, lambda a, t: 0.010)
    assert picks[A] == 200


def test_weight_zero_is_never_picked() -> None:
    rng = random.Random(1)
    bal = Balancer([ep(A, weight=0), ep(B)], now=0.0)
    assert {picked(bal, 0.0, rng) for _ in range(100)} == {B}
    assert bal.ready_count == 1
    bal.update([ep(A, weight=0)])
    assert bal.pick(0.0, rng) is None


def test_zone_preference_while_an_in_zone_endpoint_is_ready() -> None:
    rng = random.Random(2)
    bal = Balancer([ep(A, zone="a"), ep(B, zone="b"), ep(C, zone="a"), ep(D, zone="b")], local_zone="a", now=0.0)
    for addr in (A, C):  # make the in-zone endpoints much more expensive: still chosen
        for _ in range(5):
            got(bal, addr).load.start(0.0)
    assert {picked(bal, 0.0, rng) for _ in range(200)} == {A, C}
    bal.mark_failed(got(bal, A), 0.0)
    assert {picked(bal, 0.0, rng) for _ in range(50)} == {C}
    bal.mark_failed(got(bal, C), 0.0)  # no in-zone endpoint ready: spill to the others
    assert {picked(bal, 0.0, rng) for _ in range(200)} == {B, D}
    bal.mark_ok(got(bal, C))
    assert {picked(bal, 0.0, rng) for _ in range(50)} == {C}


def test_no_zone_preference_without_local_zone() -> None:
    rng = random.Random(2)
    bal = Balancer([ep(A, zone="a"), ep(B, zone="b")], now=0.0)
    assert {picked(bal, 0.0, rng) for _ in range(200)} == {A, B}


# -- update() --------------------------------------------------------------------------


def test_update_removed_endpoint_is_never_picked_but_its_requests_finish() -> None:
    rng = random.Random(3)
    bal = Balancer([ep(A), ep(B), ep(C)], now=0.0)
    gone = got(bal, B)
    handle = gone.load.start(0.0)
    bal.update([ep(A), ep(C)], now=1.0)
    assert B not in bal and gone.removed
    assert all(picked(bal, 1.0 + i * 0.001, rng) != B for i in range(2000))
    gone.load.complete(handle, 1.1, rtt=0.1)  # in flight on the removed endpoint: harmless
    assert gone.load.pending == 0
    bal.mark_failed(gone, 1.2)  # a late connect failure on it changes nothing
    assert bal.ready_count == 2


def test_update_added_endpoint_is_picked_within_a_few_picks() -> None:
    rng = random.Random(4)
    bal = Balancer([ep(A), ep(B)], now=0.0)
    for addr in (A, B):
        got(bal, addr).load.start(0.0)  # both busy: the newcomer is cheaper
    bal.update([ep(A), ep(B), ep(C)], now=0.1)
    first = next(i for i in range(10) if picked(bal, 0.1, rng) == C)
    assert first < 5


def test_update_keeps_state_of_unchanged_and_replaces_changed_metadata() -> None:
    bal = Balancer([ep(A), ep(B)], now=0.0)
    a, b = got(bal, A), got(bal, B)
    a.load.start(0.0)
    bal.update([ep(A), ep(B, identity="b.ns.serviceaccount.identity.linkerd.cluster.local")], now=1.0)
    assert got(bal, A) is a and a.load.pending == 1
    assert got(bal, B) is not b and b.removed
    assert got(bal, B).endpoint.identity.startswith("b.ns")
    bal.add([ep(C)], now=1.0)
    bal.remove([A])
    assert sorted(s.addr.host for s in bal.endpoints()) == ["10.0.0.2", "10.0.0.3"]
    assert a.removed


def test_new_endpoint_cold_start_is_linkerds_and_warm_start_is_opt_in() -> None:
    """With warm endpoints at 1 ms and one request at a time, a new endpoint
    at the 30 ms default waits for its estimate to decay (~34 s); warm_start
    seeds it below the cheapest so it is tried on the next pick that draws it."""
    for warm, bound in ((False, None), (True, 0.1)):
        bal = Balancer([ep(A), ep(B)], now=0.0, warm_start=warm)
        world = World(bal, seed=2)
        world.simulate(2000, 0.01, lambda a, t: 0.001)
        bal.update([ep(A), ep(B), ep(C)], now=world.now)
        added = world.now
        first = None
        for _ in range(6000):
            if world.simulate(1, 0.01, lambda a, t: 0.001)[C]:
                first = world.now - added
                break
        assert first is not None
        if bound is None:
            assert 20.0 < first < 45.0
        else:
            assert first < bound


# -- readiness and backoff -----------------------------------------------------------


def test_backoff_grows_exponentially_and_is_capped_with_bounded_jitter() -> None:
    backoff = Backoff(0.1, 60.0, 0.1)
    rng = random.Random(9)
    for attempt in range(14):
        base = min(60.0, 0.1 * 2**attempt)
        for _ in range(50):
            d = backoff.delay(attempt, rng)
            assert base <= d <= min(60.0, base * 1.1)
    assert backoff.delay(200, rng) == 60.0
    assert Backoff(0.1, 60.0, 0.0).delay(3, rng) == 0.8
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0, 0.1)


def test_mark_failed_backs_off_then_the_endpoint_is_probed_again() -> None:
    rng = random.Random(1)
    bal = Balancer([ep(A), ep(B)], now=0.0, rng=random.Random(5))
    a = got(bal, A)
    retry_1 = bal.mark_failed(a, 10.0)
    assert 10.1 <= retry_1 <= 10.11 and not a.ready
    assert bal.next_ready_at() == retry_1
    assert all(picked(bal, 10.05, rng) == B for _ in range(50))
    # after the backoff it is a candidate again (the next request is the probe)
    got(bal, B).load.start(retry_1)
    assert picked(bal, retry_1, rng) == A and a.ready
    assert bal.next_ready_at() is None
    retry_2 = bal.mark_failed(a, 20.0)  # the probe failed too: longer
    assert 20.2 <= retry_2 <= 20.22
    retry_3 = bal.mark_failed(a, 30.0)
    assert 30.4 <= retry_3 <= 30.44
    bal.mark_ok(a)
    assert a.ready and a.failures == 0
    assert 40.1 <= bal.mark_failed(a, 40.0) <= 40.11  # reset by the success


def test_backoff_cap_reached_after_many_failures() -> None:
    bal = Balancer([ep(A)], now=0.0, rng=random.Random(1))
    a = got(bal, A)
    for i in range(30):
        retry = bal.mark_failed(a, float(i))
    assert retry == pytest.approx(29.0 + 60.0)


def test_connecting_endpoint_is_not_ready_until_ok() -> None:
    rng = random.Random(1)
    woke: list[int] = []
    bal = Balancer([ep(A)], now=0.0)
    bal.on_ready = lambda: woke.append(1)
    bal.mark_connecting(got(bal, A))
    assert bal.pick(100.0, rng) is None and bal.next_ready_at() is None
    bal.mark_ok(got(bal, A))
    assert picked(bal, 100.0, rng) == A
    assert woke == [1]


def test_on_ready_fires_when_candidates_appear() -> None:
    woke: list[int] = []
    bal = Balancer(now=0.0)
    bal.on_ready = lambda: woke.append(1)
    bal.update([ep(A)])
    bal.update([ep(A), ep(B)])  # already had candidates: no second call
    assert woke == [1]
    bal.update([])
    bal.add([ep(C)])
    assert woke == [1, 1]


def test_pick_is_deterministic_with_a_seeded_rng() -> None:
    def run() -> list[str]:
        bal = Balancer([ep(A), ep(B), ep(C), ep(D)], now=0.0)
        world = World(bal, seed=11)
        out: list[str] = []
        for _ in range(200):
            picks = world.simulate(1, 0.002, lambda a, t: 0.001 * (1 + int(a.host[-1])))
            out.extend(a.host for a in picks)
        return out

    assert run() == run()


# -- traffic splits between backends ------------------------------------------------------


def test_weighted_split_80_20_over_2000_requests() -> None:
    split = WeightedSplit([("primary", 80), ("canary", 20)])
    rng = random.Random(12)
    picks = Counter(split.pick(rng) for _ in range(2000))
    assert abs(picks["primary"] / 2000 - 0.80) <= 0.05


def test_weighted_split_random_available_and_zero_weights() -> None:
    split = WeightedSplit([("a", 50), ("b", 0), ("c", 50)])
    assert split.backends == ("a", "c")
    rng = random.Random(1)
    assert {split.pick(rng, available=lambda b: b != "a") for _ in range(100)} == {"c"}
    assert split.pick(rng, available=lambda b: False) is None
    assert WeightedSplit([("only", 1)]).pick(rng) == "only"
    assert WeightedSplit([]).pick(rng) is None
