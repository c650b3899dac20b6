"""Failfast for one backend (ref 3.9; linkerd ``proxy/balance/queue/src/failfast.rs``).

Theory of operation: a backend is ``"ok"`` while it has a ready endpoint.
The first time a request finds none, a timer starts (``"waiting"``). If no
endpoint becomes ready within ``timeout`` the backend is in ``"failfast"``:
queued and new requests fail at once (504, ``error="failfast"``) instead of
piling up. The first ready endpoint clears the state, whichever it was.

The timer is not reset by requests going away: as in linkerd, once a backend
has been seen without endpoints, it fails fast ``timeout`` seconds later
unless an endpoint became ready in between.

Sans-IO: ``now`` is a parameter; the asyncio side (``queue.Queue``) schedules
a wake-up at ``deadline``.
"""

from __future__ import annotations

OK = "ok"
WAITING = "waiting"
FAILFAST = "failfast"

# Ref 1.5 / 3.9: LINKERD2_PROXY_{OUTBOUND,INBOUND}_HTTP_FAILFAST_TIMEOUT and
# the outbound TCP connection queue. Outbound waits 3 s for an endpoint
# (discovery may still be arriving); inbound 1 s (the target is the local app).
OUTBOUND_FAILFAST_TIMEOUT = 3.0
INBOUND_FAILFAST_TIMEOUT = 1.0


class Failfast:
    __slots__ = ("timeout", "_since", "_deadline", "_shut", "shut_total", "open_total")

    def __init__(self, timeout: float = OUTBOUND_FAILFAST_TIMEOUT) -> None:
        if timeout < 0:
            raise ValueError(f"failfast timeout must be >= 0, got {timeout!r}")
        self.timeout = float(timeout)
        self._since: float | None = None  # when no ready endpoint was first seen
        self._deadline: float | None = None
        self._shut = False  # whether entering failfast has been counted
        # Gate metrics (ref 3.9): times the backend entered failfast, and left it.
        self.shut_total = 0
        self.open_total = 0

    @property
    def since(self) -> float | None:
        return self._since

    @property
    def deadline(self) -> float | None:
        """When ``"waiting"`` turns into ``"failfast"``; None while ``"ok"``."""
        return self._deadline

    @property
    def active(self) -> bool:
        """Waiting or in failfast (a cheap check before ``on_ready``)."""
        return self._since is not None

    def on_no_ready_endpoint(self, now: float) -> str:
        """A request found no ready endpoint: start the timer if it is not running."""
        if self._since is None:
            self._since = now
            self._deadline = now + self.timeout
        return self.state(now)

    def state(self, now: float) -> str:
        deadline = self._deadline
        if deadline is None:
            return OK
        if now >= deadline:
            if not self._shut:
                self._shut = True
                self.shut_total += 1
            return FAILFAST
        return WAITING

    def on_ready(self) -> None:
        """An endpoint is ready: back to ``"ok"`` (the gate reopens)."""
        if self._shut:
            self.open_total += 1
        self._since = None
        self._deadline = None
        self._shut = False
