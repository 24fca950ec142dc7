"""The order in which the deployments of one step of a route are tried.

``weighted``: a random order drawn by weight (a deployment of weight 3 comes first three
times as often as one of weight 1), so that load spreads as configured and every
deployment stays a fallback for the others. ``latency``: the lowest smoothed latency
(time to first token, or the whole answer when not streamed) first; a deployment not
yet measured goes first so that it gets measured. Either way, deployments whose breaker
is open go last (they are skipped quickly), after those marked avoided.
"""

from __future__ import annotations

import random

from sluice.catalog import Deployment, Step

from services.inference_worker.domain.circuit import CircuitRegistry, CircuitState


class Balancer:
    def __init__(self, circuits: CircuitRegistry, rng: random.Random | None = None) -> None:
        self._circuits = circuits
        self._rng = rng or random.Random()

    def order(self, step: Step) -> list[Deployment]:
        deployments = list(step.deployments)
        if len(deployments) > 1:
            if step.balance == "latency":
                deployments.sort(key=self._latency)
            else:
                deployments = self._weighted(deployments)
        return sorted(deployments, key=self._rank)

    def avoided(self, deployment: Deployment) -> bool:
        breaker = self._circuits.breakers.get(deployment.name)
        return breaker is not None and breaker.avoided()

    def _rank(self, deployment: Deployment) -> tuple[bool, bool]:
        breaker = self._circuits.breakers.get(deployment.name)
        if breaker is None:
            return (False, False)
        return (breaker.current() is CircuitState.OPEN, breaker.avoided())

    def _latency(self, deployment: Deployment) -> float:
        breaker = self._circuits.breakers.get(deployment.name)
        if breaker is None or breaker.latency_ewma is None:
            return -1.0
        return breaker.latency_ewma

    def _weighted(self, deployments: list[Deployment]) -> list[Deployment]:
        # Efraimidis-Spirakis: sort by u ** (1 / weight), the largest first.
        keyed = [(self._rng.random() ** (1.0 / d.weight), d) for d in deployments]
        keyed.sort(key=lambda item: item[0], reverse=True)
        return [d for _, d in keyed]
