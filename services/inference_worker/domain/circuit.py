"""Per-deployment circuit breakers that see errors and slowness, shared by every worker.

A breaker counts the outcomes of the last ``window`` calls to its deployment. A call
fails when the provider errs (5xx, a connection or protocol error, a cut stream) or
when it is too slow: no first token within the route's bound, or a total time above
it. The breaker opens when ``consecutive`` calls in a row fail, or when at least
``min_calls`` were seen and the share of failures reaches ``failure_rate``; it stays
open for ``cooldown_seconds``, then lets ``probes`` calls through (half-open): a probe
that succeeds closes it, one that fails opens it again. A stream cut after output
reached the client counts as a failure and marks the deployment avoided for a cooldown
(``mark_interrupted``): the next requests try every other deployment of their route
first, and use it only when nothing else answers.

Every change of state is handed to ``on_change`` (the worker writes it to the
``sluice_breakers`` bucket); what another worker wrote arrives through ``apply_shared``,
so a deployment one replica found failing is skipped by all of them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class TripReason(StrEnum):
    ERRORS = "errors"
    LATENCY = "latency"
    STREAM_INTERRUPTED = "stream_interrupted"


@dataclass(frozen=True)
class BreakerPolicy:
    window: int = 20
    min_calls: int = 10
    failure_rate: float = 0.5
    consecutive: int = 5
    cooldown_seconds: float = 15.0
    probes: int = 1


@dataclass(frozen=True)
class Transition:
    """A breaker's new state, as it is shared: ``open_for`` seconds from now while open."""

    deployment: str
    provider: str
    state: CircuitState
    open_for: float
    reason: str
    failure_rate: float
    # Seconds the deployment is tried only after every other one (stream interrupted).
    avoid_for: float = 0.0


@dataclass
class CircuitBreaker:
    deployment: str
    provider: str = ""
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[Transition], None] | None = None
    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    requests_total: int = 0
    failures_total: int = 0
    latency_failures_total: int = 0
    reason: str = ""
    # Smoothed seconds to the first token (or the whole answer): "latency" balancing.
    latency_ewma: float | None = None
    _outcomes: deque[bool] = field(default_factory=deque, repr=False)
    _open_until: float = field(default=0.0, repr=False)
    _avoid_until: float = field(default=0.0, repr=False)
    _probes: int = field(default=0, repr=False)

    # --- reading --------------------------------------------------------------------

    def current(self) -> CircuitState:
        """The state, with an expired cooldown shown as half-open."""
        if self.state is CircuitState.OPEN and self.clock() >= self._open_until:
            return CircuitState.HALF_OPEN
        return self.state

    def open_for(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when it would now)."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._open_until - self.clock())

    def avoided(self) -> bool:
        """Marked after a stream it served broke: tried after every other deployment."""
        return self.clock() < self._avoid_until

    def avoid_for(self) -> float:
        return max(0.0, self._avoid_until - self.clock())

    def failure_rate(self) -> float:
        return sum(self._outcomes) / len(self._outcomes) if self._outcomes else 0.0

    # --- calls ----------------------------------------------------------------------

    def allow(self) -> bool:
        """Whether a call may go to the deployment now (taking a probe when half-open)."""
        state = self.current()
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and self._probes < self.policy.probes:
            if self.state is CircuitState.OPEN:
                self.state = CircuitState.HALF_OPEN
                self._notify(0.0)
            self._probes += 1
            return True
        return False

    def release(self) -> None:
        """A call that was allowed but never finished (cancelled): its probe is free."""
        self._probes = max(0, self._probes - 1)

    def observe_latency(self, seconds: float) -> None:
        self.latency_ewma = (
            seconds if self.latency_ewma is None else 0.8 * self.latency_ewma + 0.2 * seconds
        )

    def record_success(self) -> None:
        self.requests_total += 1
        self.consecutive_failures = 0
        self._push(False)
        self._probes = max(0, self._probes - 1)
        # A probe's success closes; a call begun before the breaker opened does not.
        if self.current() is CircuitState.HALF_OPEN:
            self._close()

    def record_failure(self, reason: TripReason = TripReason.ERRORS) -> None:
        self.requests_total += 1
        self.failures_total += 1
        if reason is TripReason.LATENCY:
            self.latency_failures_total += 1
        self.consecutive_failures += 1
        self._push(True)
        self._probes = max(0, self._probes - 1)
        if self.state is CircuitState.OPEN and self.clock() < self._open_until:
            return
        tripped = self.consecutive_failures >= self.policy.consecutive or (
            len(self._outcomes) >= self.policy.min_calls
            and self.failure_rate() >= self.policy.failure_rate
        )
        if self.state is not CircuitState.CLOSED or tripped:
            self._open(reason, self.policy.cooldown_seconds)

    def record_neutral(self) -> None:
        """A call that says nothing about the deployment's health (a bad request, a
        throttle)."""
        self.requests_total += 1
        self._probes = max(0, self._probes - 1)
        if self.state is CircuitState.HALF_OPEN:
            # The probe proved the deployment answers: close.
            self._close()

    def trip(self, reason: TripReason) -> None:
        """Open now, whatever the counts."""
        self._open(reason, self.policy.cooldown_seconds)

    def mark_interrupted(self) -> None:
        """A stream this deployment served broke after output reached the client: the
        failure counts, and for a cooldown the next requests try every other deployment
        of their route first (a route with no other still uses it, rather than fail)."""
        self._avoid_until = self.clock() + self.policy.cooldown_seconds
        was_open = self.state is CircuitState.OPEN
        self.record_failure(TripReason.STREAM_INTERRUPTED)
        if not was_open and self.state is not CircuitState.OPEN:
            self.reason = str(TripReason.STREAM_INTERRUPTED)
            self._notify(0.0)

    # --- shared state ---------------------------------------------------------------

    def apply_shared(
        self, state: CircuitState, open_for: float, reason: str, avoid_for: float = 0.0
    ) -> None:
        """Another worker's view: follow it without announcing it again."""
        if avoid_for > 0:
            self._avoid_until = self.clock() + avoid_for
        if state is CircuitState.OPEN and open_for > 0:
            self.state = CircuitState.OPEN
            self._open_until = self.clock() + open_for
            self.reason = reason
            self._probes = 0
        elif state is CircuitState.CLOSED and self.state is not CircuitState.CLOSED:
            self.state = CircuitState.CLOSED
            self.consecutive_failures = 0
            self._outcomes.clear()
            self._probes = 0
            self.reason = ""

    # --- internals ------------------------------------------------------------------

    def _push(self, failed: bool) -> None:
        self._outcomes.append(failed)
        while len(self._outcomes) > self.policy.window:
            self._outcomes.popleft()

    def _open(self, reason: TripReason, seconds: float) -> None:
        self.state = CircuitState.OPEN
        self._open_until = self.clock() + seconds
        self.reason = str(reason)
        self._probes = 0
        self._notify(seconds)

    def _close(self) -> None:
        self.state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self._outcomes.clear()
        self._probes = 0
        self.reason = ""
        self._notify(0.0)

    def _notify(self, open_for: float) -> None:
        if self.on_change is not None:
            self.on_change(
                Transition(
                    self.deployment,
                    self.provider,
                    self.state,
                    open_for,
                    self.reason,
                    self.failure_rate(),
                    self.avoid_for(),
                )
            )


class CircuitRegistry:
    """One breaker per deployment name."""

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self.breakers: dict[str, CircuitBreaker] = {}
        self.on_change: Callable[[Transition], None] | None = None

    def get(self, deployment: str, provider: str = "") -> CircuitBreaker:
        breaker = self.breakers.get(deployment)
        if breaker is None:
            breaker = CircuitBreaker(deployment, provider, self.policy, self._clock, self._changed)
            self.breakers[deployment] = breaker
        elif provider and not breaker.provider:
            breaker.provider = provider
        return breaker

    def _changed(self, transition: Transition) -> None:
        if self.on_change is not None:
            self.on_change(transition)
