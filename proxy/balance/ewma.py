"""Peak-EWMA load of one endpoint (ref 4; tower's ``load::PeakEwma`` behaviour).

Theory of operation: every endpoint carries an RTT estimate and a count of
requests in flight. Its cost is ``estimate * (pending + 1)``, so a slow
endpoint and a busy endpoint both look expensive, and the balancer prefers
the cheaper of two random candidates.

* The estimate starts at ``default_rtt`` (30 ms, floored at 1 ms).
* A sample larger than the estimate replaces it at once (the "peak"): one
  slow response is enough to push traffic away from an endpoint.
* A sample no larger than the estimate blends in with
  ``w = exp(-elapsed / decay)``: ``estimate = estimate * w + sample * (1 - w)``,
  where ``elapsed`` is the time since the estimate was last touched.
* Reading the cost first decays the estimate toward 0 the same way
  (``estimate *= w``), so an endpoint nobody sends to slowly becomes cheap
  again and gets probed.

No I/O and no clock: every method takes ``now`` (seconds, any monotonic
origin, e.g. ``loop.time()``). This runs on every request, so it is a handful
of float operations with ``__slots__`` and no allocation.
"""

from __future__ import annotations

from math import exp, inf

# Ref 4: the RTT a new endpoint is assumed to have (profile backends, policy
# controller and control-plane clients all use 30 ms).
DEFAULT_RTT = 0.030
# Ref 4: linkerd floors a configured default RTT at 1 ms, so a zero or tiny
# value cannot make a never-measured endpoint look free.
MIN_DEFAULT_RTT = 0.001
# Ref 4: the EWMA time constant; a sample's influence (and an idle estimate)
# fades by 1/e every 10 s.
DEFAULT_DECAY = 10.0


class PeakEwma:
    """The load of one endpoint: ``cost(now) = rtt_estimate * (pending + 1)``.

    ``start(now)`` returns a handle (the dispatch time, a float: no object is
    allocated per request); hand it back to ``complete``. The RTT sample is
    passed explicitly because the caller knows when the first response byte
    arrived; ``rtt=None`` only releases the pending slot.
    """

    __slots__ = ("pending", "_estimate", "_stamp", "_k", "default_rtt", "decay")

    def __init__(
        self,
        default_rtt: float = DEFAULT_RTT,
        decay: float = DEFAULT_DECAY,
        *,
        now: float | None = None,
        estimate: float | None = None,
    ) -> None:
        if not decay > 0.0:
            raise ValueError(f"decay must be > 0 seconds, got {decay!r}")
        self.default_rtt = max(float(default_rtt), MIN_DEFAULT_RTT)
        self.decay = float(decay)
        self._k = -1.0 / self.decay  # exp(elapsed * _k) == exp(-elapsed / decay), one multiply per read
        # ``estimate`` overrides the starting point (the balancer's opt-in warm start).
        self._estimate = self.default_rtt if estimate is None else float(estimate)
        # When the estimate was last touched. Unknown until the first call if
        # no ``now`` was given: +inf makes the first touch start the clock
        # without decaying anything.
        self._stamp = inf if now is None else float(now)
        self.pending = 0

    @property
    def estimate(self) -> float:
        """The RTT estimate as last stored (without decaying it to now)."""
        return self._estimate

    def cost(self, now: float) -> float:
        """Decay the estimate to ``now`` and return ``estimate * (pending + 1)``."""
        stamp = self._stamp
        if now != stamp:
            if now > stamp:
                self._estimate *= exp((now - stamp) * self._k)
            self._stamp = now
        return self._estimate * (self.pending + 1)

    def start(self, now: float) -> float:
        """A request was dispatched to this endpoint; returns its handle."""
        self.pending += 1
        return now

    def complete(self, handle: float, now: float, rtt: float | None = None) -> None:
        """The request dispatched at ``handle`` is no longer pending.

        ``rtt`` (seconds) is the sample to learn from, normally
        ``first_response_byte_time - handle``; ``None`` records no sample.
        """
        pending = self.pending - 1
        self.pending = pending if pending > 0 else 0  # a double completion must not make cost negative
        if rtt is None:
            return
        estimate = self._estimate
        if rtt > estimate:
            self._estimate = rtt  # peak: the worst recent RTT wins immediately
        else:
            elapsed = now - self._stamp
            if elapsed > 0.0:
                w = exp(elapsed * self._k)
                self._estimate = estimate * w + rtt * (1.0 - w)
        self._stamp = now

    def __repr__(self) -> str:
        return f"PeakEwma(estimate={self._estimate:.6f}s, pending={self.pending})"
