"""Traffic splits between backends (ref 4, 10.2: ``dst_overrides`` and backendRefs).

Theory of operation: a route's backends carry weights; each request goes to
one backend drawn at random in proportion to the weights, among the backends
that are *available* (linkerd's "random available"; a backend in failfast is
not available). Weight-0 backends are dropped up front, as linkerd drops
0-weight ``dst_overrides``. With one backend this is "first available".

This is where an 80/20 split is exact on average; endpoint weights inside one
backend are a capacity hint to P2C instead (see ``p2c.py``).

Sans-IO: randomness is an injected ``random.Random``.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import Generic, TypeVar

T = TypeVar("T")


class WeightedSplit(Generic[T]):
    __slots__ = ("backends", "weights", "_cumulative", "_total")

    def __init__(self, backends: Iterable[tuple[T, int | float]]) -> None:
        kept = [(b, w) for b, w in backends if w > 0]
        self.backends: tuple[T, ...] = tuple(b for b, _ in kept)
        self.weights: tuple[int | float, ...] = tuple(w for _, w in kept)
        self._cumulative = list(accumulate(self.weights))
        self._total = self._cumulative[-1] if kept else 0

    def __len__(self) -> int:
        return len(self.backends)

    def pick(self, rng: random.Random, available: Callable[[T], bool] | None = None) -> T | None:
        """A backend drawn by weight among the available ones; None if none is."""
        n = len(self.backends)
        if n == 0:
            return None
        if n == 1:
            only = self.backends[0]
            return only if available is None or available(only) else None
        if available is None:
            i = bisect_right(self._cumulative, rng.random() * self._total)
            return self.backends[i if i < n else n - 1]
        live = [(b, w) for b, w in zip(self.backends, self.weights, strict=True) if available(b)]
        if not live:
            return None
        total = sum(w for _, w in live)
        x = rng.random() * total
        for backend, weight in live:
            x -= weight
            if x < 0:
                return backend
        return live[-1][0]  # float rounding at the very top of the range
