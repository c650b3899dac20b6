"""Retry budget (ratio, floor, sliding ttl window) and retryability (proxy.balance.budget).

Time is a float handed to every call.
"""

from __future__ import annotations

import pytest

from proxy.balance.budget import MAX_RETRY_BODY, RetryBudget, is_failure, is_retryable


def drain(budget: RetryBudget, now: float) -> int:
    n = 0
    while budget.try_withdraw(now):
        n += 1
        assert n < 1_000_000
    return n


def test_ratio_allows_one_retry_per_five_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, ttl=10.0)
    assert not budget.try_withdraw(0.0)
    for _ in range(1000):
        budget.deposit(0.5)
    assert budget.available(0.5) == 200
    assert drain(budget, 0.5) == 200


def test_floor_allows_min_per_second_times_ttl_without_traffic() -> None:
    budget = RetryBudget()  # 0.2, 10/s, 10 s: the controller default
    assert drain(budget, 100.0) == 100
    # the withdrawals expire with the window, then the floor is back
    assert not budget.try_withdraw(105.0)
    assert drain(budget, 110.0) == 100


def test_floor_and_ratio_add_up() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10, ttl=10.0)
    for _ in range(500):
        budget.deposit(0.0)
    assert drain(budget, 0.0) == 100 + 100


def test_deposits_expire_after_ttl() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0, ttl=10.0)
    for _ in range(10):
        budget.deposit(0.0)
    assert budget.available(9.9) == 5
    assert budget.available(10.0) == 0
    assert not budget.try_withdraw(10.0)


def test_sliding_window_expires_slot_by_slot() -> None:
    budget = RetryBudget(ratio=1.0, min_per_second=0, ttl=10.0)
    for t in range(10):  # one deposit in each 1 s slot
        budget.deposit(t + 0.5)
    assert budget.available(9.5) == 10
    assert budget.available(10.5) == 9  # the t=0 slot left the window
    assert budget.available(14.5) == 5
    assert budget.available(100.0) == 0


def test_steady_failures_are_retried_within_the_budget() -> None:
    """Half the responses fail; each failure asks for a retry: at most ratio of requests + floor."""
    budget = RetryBudget()
    retries = 0
    t = 0.0
    for i in range(20_000):  # 1000 requests per second for 20 s
        t = i * 0.001
        budget.deposit(t)
        if i % 2 and budget.try_withdraw(t):
            retries += 1
    # 20 % of 20000 plus the floor (10/s over 20 s, counted once per 10 s window)
    assert retries <= 0.2 * 20_000 + 10 * 20
    assert retries >= 0.2 * 20_000


def test_ratio_zero_is_floor_only_and_invalid_budgets_are_refused() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1, ttl=2.0)
    for _ in range(100):
        budget.deposit(0.0)
    assert drain(budget, 0.0) == 2
    for bad in ({"ratio": -0.1}, {"ratio": 1001.0}, {"ttl": 0.5}, {"ttl": 61.0}, {"min_per_second": -1}):
        with pytest.raises(ValueError):
            RetryBudget(**bad)


def test_ratio_above_one() -> None:
    budget = RetryBudget(ratio=2.0, min_per_second=0, ttl=10.0)
    for _ in range(10):
        budget.deposit(0.0)
    assert drain(budget, 0.0) == 20


def test_is_failure_default_classification() -> None:
    assert is_failure(500) and is_failure(503) and is_failure(599)
    assert not is_failure(200) and not is_failure(404) and not is_failure(429)
    assert is_failure(200, grpc_status=14)
    assert not is_failure(200, grpc_status=0)


def test_is_retryable() -> None:
    assert is_retryable(503, body_size=0)
    assert is_retryable(200, grpc_status=14, body_size=100)
    assert not is_retryable(200, body_size=0)
    assert not is_retryable(None)  # connect failure / reset: no response to classify
    assert is_retryable(503, body_size=MAX_RETRY_BODY)
    assert not is_retryable(503, body_size=MAX_RETRY_BODY + 1)
    assert not is_retryable(503, body_size=None)  # streaming body of unknown length
    assert not is_retryable(503, body_size=10, body_complete=False)  # response came before the body finished
    assert not is_retryable(503, body_size=10, failure=False)  # a route's response class said success
    assert is_retryable(404, body_size=10, failure=True)  # ...or failure
