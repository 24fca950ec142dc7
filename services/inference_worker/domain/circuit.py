"""Per-provider circuit breakers: after consecutive failures a provider is skipped for a
cooldown, then one probe call decides whether it closes again."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 5
    cooldown_seconds: float = 15.0
    clock: Callable[[], float] = time.monotonic
    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    requests_total: int = 0
    failures_total: int = 0
    _opened_at: float = field(default=0.0, repr=False)
    _probe_in_flight: bool = field(default=False, repr=False)

    def current(self) -> CircuitState:
        """The state, with an expired cooldown shown as half-open."""
        cooled = self.clock() - self._opened_at >= self.cooldown_seconds
        if self.state is CircuitState.OPEN and cooled:
            return CircuitState.HALF_OPEN
        return self.state

    def allow(self) -> bool:
        """Whether a call may go to the provider now (taking the probe when half-open)."""
        state = self.current()
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probe_in_flight:
            self.state = CircuitState.HALF_OPEN
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.requests_total += 1
        self.consecutive_failures = 0
        self.state = CircuitState.CLOSED
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self.requests_total += 1
        self.failures_total += 1
        self.consecutive_failures += 1
        tripped = self.consecutive_failures >= self.failure_threshold
        if self.state is CircuitState.HALF_OPEN or tripped:
            self.state = CircuitState.OPEN
            self._opened_at = self.clock()
        self._probe_in_flight = False

    def record_neutral(self) -> None:
        """A call that says nothing about the provider's health (a bad request, a throttle)."""
        self.requests_total += 1
        self._probe_in_flight = False
        if self.state is CircuitState.HALF_OPEN:
            # The probe proved the provider answers: close.
            self.state = CircuitState.CLOSED
            self.consecutive_failures = 0


class CircuitRegistry:
    def __init__(self, failure_threshold: int, cooldown_seconds: float) -> None:
        self._threshold = failure_threshold
        self._cooldown = cooldown_seconds
        self.breakers: dict[str, CircuitBreaker] = {}

    def get(self, provider: str) -> CircuitBreaker:
        breaker = self.breakers.get(provider)
        if breaker is None:
            breaker = CircuitBreaker(self._threshold, self._cooldown)
            self.breakers[provider] = breaker
        return breaker
