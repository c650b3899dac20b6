"""Retry budget and retryability (ref 10.2; tower's ``TpsBudget`` behaviour).

Theory of operation: every response that was not itself a retry deposits;
every retry withdraws. Over a sliding window of ``ttl`` seconds, retries may
use ``ratio`` of the deposits plus a fixed reserve of
``min_per_second * ttl`` (the floor that lets a quiet service retry at all).
Deposits and withdrawals both expire when they leave the window, so the
budget refills on its own.

The window is ``SLOTS`` slots of ``ttl / SLOTS`` seconds (1 s for the default
10 s ttl); a running total keeps every call O(1) apart from clearing expired
slots. Amounts are integers (a deposit is ``DEPOSIT`` units, a retry costs
``DEPOSIT / ratio`` units) so ratio 0.2 means exactly one retry per five
deposits, with no float drift. Like tower, the reserve may be spent in a
burst: the floor is "this many retries per ttl", not a rate limiter.

Sans-IO: ``now`` is a parameter.
"""

from __future__ import annotations

from math import floor

# Ref 6.2 / 10.2: the destination controller's default budget when a
# ServiceProfile sets none: retries up to 20 % of requests, at least
# 10 per second, remembered for 10 s.
DEFAULT_RATIO = 0.2
DEFAULT_MIN_PER_SECOND = 10
DEFAULT_TTL = 10.0
SLOTS = 10
DEPOSIT = 1000  # units per deposit; a retry costs DEPOSIT / ratio units

# Ref 10.2: only requests whose body is at most 64 KiB (and fully buffered)
# are replayed.
MAX_RETRY_BODY = 64 * 1024


class RetryBudget:
    __slots__ = ("ratio", "min_per_second", "ttl", "_deposit", "_withdraw", "_reserve", "_width", "_slots", "_gen", "_total")

    def __init__(self, ratio: float = DEFAULT_RATIO, min_per_second: int = DEFAULT_MIN_PER_SECOND, ttl: float = DEFAULT_TTL) -> None:
        # Ref 10.2: a budget outside these bounds disables retries in linkerd;
        # refusing it here lets the caller do that (and report why).
        if not 0.0 <= ratio <= 1000.0:
            raise ValueError(f"retry ratio must be within 0..1000, got {ratio!r}")
        if not 1.0 <= ttl <= 60.0:
            raise ValueError(f"retry budget ttl must be within 1..60 s, got {ttl!r}")
        if min_per_second < 0:
            raise ValueError(f"min retries per second must be >= 0, got {min_per_second!r}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = float(ttl)
        if ratio == 0.0:
            self._deposit, self._withdraw = 0, DEPOSIT  # only the reserve can be spent
        else:
            self._deposit, self._withdraw = DEPOSIT, max(1, round(DEPOSIT / ratio))
        self._reserve = int(min_per_second * self.ttl * self._withdraw)
        self._width = self.ttl / SLOTS
        self._slots = [0] * SLOTS
        self._gen: int | None = None  # index of the current slot since time 0
        self._total = 0  # sum of the slots

    def deposit(self, now: float) -> None:
        """A response that was not a retry."""
        self._add(now, self._deposit)

    def try_withdraw(self, now: float) -> bool:
        """May one retry be made? If so, it is charged."""
        self._expire(now)
        if self._total + self._reserve >= self._withdraw:
            self._add(now, -self._withdraw)
            return True
        return False

    def available(self, now: float) -> int:
        """Retries that could be made now (for metrics and tests)."""
        self._expire(now)
        return max(0, (self._total + self._reserve) // self._withdraw)

    def _add(self, now: float, amount: int) -> None:
        self._expire(now)
        slot = self._gen % SLOTS  # type: ignore[operator]  # set by _expire
        self._slots[slot] += amount
        self._total += amount

    def _expire(self, now: float) -> None:
        gen = floor(now / self._width)
        last = self._gen
        if last is None or gen - last >= SLOTS:
            self._slots = [0] * SLOTS
            self._total = 0
            self._gen = gen
            return
        if gen <= last:
            return  # same slot (or a clock that went back: keep writing the current slot)
        slots = self._slots
        for g in range(last + 1, gen + 1):
            i = g % SLOTS
            self._total -= slots[i]
            slots[i] = 0
        self._gen = gen


def is_failure(status: int, grpc_status: int | None = None) -> bool:
    """Linkerd's default response classification (ref 10.2, 7.1): gRPC status != OK, else HTTP 5xx."""
    if grpc_status is not None:
        return grpc_status != 0
    return 500 <= status <= 599


def is_retryable(
    status: int | None,
    grpc_status: int | None = None,
    body_size: int | None = 0,
    *,
    body_complete: bool = True,
    failure: bool | None = None,
) -> bool:
    """Whether a finished attempt may be retried on a retryable route (ref 10.2).

    * ``status`` None means no response (connect failure, reset, timeout):
      never retried.
    * The response must be classified as a failure: ``failure`` when the
      route's response classes decided, else ``is_failure(status, grpc_status)``.
    * The request body must be known, at most 64 KiB (``body_size``; None =
      unknown or streaming) and fully buffered before the response began
      (``body_complete``), so that it can be replayed.

    The budget is the caller's next check: ``budget.try_withdraw(now)``.
    """
    if status is None:
        return False
    if body_size is None or body_size > MAX_RETRY_BODY or not body_complete:
        return False
    if failure is None:
        failure = is_failure(status, grpc_status)
    return failure
