"""Admission leases: the gateway admits most requests of a busy key without a round trip
to the limiter.

The first request of a key asks the limiter for its own reservation plus a lease: tokens
and requests held for the key's next requests (at most 1/8 of what the key has left, for
2 s by default). Until the lease runs out or expires, the gateway admits the key's
requests from it locally and names each by a share id (``sluice.leases``); the worker's
usage event settles each share against its actual usage, as it settles a reservation.
A lease that is replaced, expires or is left at shutdown is closed, and what was never
admitted goes back to the key.

The limits still hold across replicas: a lease counts in the limiter's window from the
moment it is granted, so the sum of every replica's leases and reservations never
exceeds a quota. The price is that a lease held by one replica is briefly unavailable to
another (at most its share, for at most its TTL), and a key with little left gets no
lease at all and is admitted one request at a time, exactly as without leases.

Leases are for a key's own rates only ("tpm", "rpm"). A request whose reservation
carries any level's limit or budget, the key's own included (``leasable``), goes to the
limiter every time: a lease granted under the key's room would admit past those levels
(a team's minute, a concurrency count, a day's dollars), whose room the gateway cannot
see, and an end user's request could spend from a lease obtained for another. The
limiter grants no lease to such a request either. Leases are held per key, team and
end user (``lease_key``), so a key shared by teams or users (a JWT issuer's) never
admits one caller from another's lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from opentelemetry import trace
from sluice.leases import share_id
from sluice.limiter.v1 import limiter_pb2

from services.gateway.domain.ports import Limiter

log = logging.getLogger(__name__)

TPM, RPM = "tpm", "rpm"


def _set(message: object) -> bool:
    return any(value for _field, value in message.ListFields())  # type: ignore[attr-defined]


def leasable(request: limiter_pb2.ReserveRequest) -> bool:
    """Whether only the key's own rates apply to this request (see the module doc)."""
    return not (
        _set(request.key_limits)
        or _set(request.team_limits)
        or _set(request.team_budgets)
        or _set(request.end_user_limits)
        or _set(request.end_user_budgets)
        or _set(request.key_budgets)
    )


def lease_key(request: limiter_pb2.ReserveRequest) -> str:
    return f"{request.key_id}\x00{request.team_id}\x00{request.end_user}"


@dataclass
class Lease:
    lease_id: str
    key_id: str
    quotas: tuple[int, int]
    tokens_left: int
    requests_left: int
    granted_at: float
    expires_at: float
    policies: list[limiter_pb2.PolicyState]
    # The span of the request whose round trip to the limiter obtained the lease.
    granted_in: trace.SpanContext | None = None
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def take(self, tokens: int) -> str:
        self.tokens_left -= tokens
        self.requests_left -= 1
        return share_id(self.lease_id, next(self.numbers), tokens)

    def view(self, now: float) -> list[limiter_pb2.PolicyState]:
        """The policies as the limiter reported them at the grant, with what is still
        unadmitted in the lease counted as remaining (it is this key's to spend)."""
        elapsed_ms = int((now - self.granted_at) * 1000)
        out = []
        for p in self.policies:
            back = self.tokens_left if p.name == TPM else self.requests_left if p.name == RPM else 0
            out.append(
                limiter_pb2.PolicyState(
                    name=p.name,
                    quota=p.quota,
                    remaining=min(p.quota, p.remaining + back),
                    window_seconds=p.window_seconds,
                    reset_ms=max(0, p.reset_ms - elapsed_ms),
                )
            )
        return out


class LeasingLimiter:
    """The limiter as the request path sees it (``reserve``, ``release``, ``drain``),
    admitting from leases where it can."""

    def __init__(
        self,
        limiter: Limiter,
        lease_requests: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.lease_requests = max(0, lease_requests)
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        # One lease request in flight per key; the others wait for it, then look again.
        self._refills: dict[str, asyncio.Future[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.admitted_locally = 0
        self._tracer = trace.get_tracer("sluice.gateway")

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        if self.lease_requests == 0 or not leasable(request):
            return await self.limiter.reserve(request)
        need = request.input_tokens + request.max_output_tokens
        local = self._from_lease(request, need)
        if local is not None:
            return local
        refill = self._refills.get(lease_key(request))
        if refill is not None:
            # Another request of this key is asking for a lease: take from it if it
            # has room, otherwise ask for our own.
            await asyncio.shield(refill)
            local = self._from_lease(request, need)
            if local is not None:
                return local
        return await self._reserve_with_lease(request, need)

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None:
        self.limiter.release(reservation_id, key_id, request_id)

    async def drain(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for key_id in list(self._leases):
            self._close(self._leases.pop(key_id))
        await self.limiter.drain()

    @property
    def open_leases(self) -> int:
        return len(self._leases)

    # --- inside -----------------------------------------------------------------------

    def _from_lease(
        self, request: limiter_pb2.ReserveRequest, need: int
    ) -> limiter_pb2.ReserveResponse | None:
        held = lease_key(request)
        lease = self._leases.get(held)
        if lease is None:
            return None
        now = self._clock()
        quotas = (request.tokens_per_minute, request.requests_per_minute)
        if now >= lease.expires_at or lease.quotas != quotas:
            # Expired, or the key's quotas changed: the next lease is granted under them.
            self._close(self._leases.pop(held))
            return None
        if lease.tokens_left < need or lease.requests_left < 1:
            return None
        reservation_id = lease.take(need)
        self.admitted_locally += 1
        # The admission has its place in the request's trace, linked to the trace that
        # holds the limiter's decision for the whole lease.
        links = [trace.Link(lease.granted_in)] if lease.granted_in is not None else None
        span = self._tracer.start_span(
            "limiter.lease admit",
            links=links,
            attributes={
                "sluice.key_id": request.key_id,
                "sluice.limiter.lease_id": lease.lease_id,
                "sluice.limiter.reserved_tokens": need,
            },
        )
        span.end()
        return limiter_pb2.ReserveResponse(
            allowed=True,
            reservation_id=reservation_id,
            policies=lease.view(now),
            reserved_tokens=need,
        )

    async def _reserve_with_lease(
        self, request: limiter_pb2.ReserveRequest, need: int
    ) -> limiter_pb2.ReserveResponse:
        key_id = lease_key(request)
        refill: asyncio.Future[None] | None = None
        if key_id not in self._refills:
            refill = asyncio.get_running_loop().create_future()
            self._refills[key_id] = refill
        try:
            asked = limiter_pb2.ReserveRequest()
            asked.CopyFrom(request)
            asked.lease_tokens = need * self.lease_requests
            asked.lease_requests = self.lease_requests
            response = await self.limiter.reserve(asked)
            if response.allowed and response.lease_tokens > 0:
                self._install(request, response, need)
            return response
        finally:
            if refill is not None:
                del self._refills[key_id]
                refill.set_result(None)

    def _install(
        self,
        request: limiter_pb2.ReserveRequest,
        response: limiter_pb2.ReserveResponse,
        need: int,
    ) -> None:
        now = self._clock()
        lease = Lease(
            lease_id=response.reservation_id,
            key_id=request.key_id,
            quotas=(request.tokens_per_minute, request.requests_per_minute),
            # The request that asked is the lease's first share.
            tokens_left=response.lease_tokens + need,
            requests_left=response.lease_requests + 1,
            granted_at=now,
            expires_at=now + response.lease_ttl_ms / 1000,
            policies=list(response.policies),
            granted_in=trace.get_current_span().get_span_context(),
        )
        response.reservation_id = lease.take(need)
        # Its headers count the lease as the later requests' headers will.
        del response.policies[:]
        response.policies.extend(lease.view(now))
        held = lease_key(request)
        previous = self._leases.get(held)
        self._leases[held] = lease
        if previous is not None:
            self._close(previous)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="gateway-lease-sweeper")

    def _close(self, lease: Lease) -> None:
        tokens, requests = max(0, lease.tokens_left), max(0, lease.requests_left)
        lease.tokens_left = lease.requests_left = 0
        self.limiter.close_lease(lease.lease_id, lease.key_id, tokens, requests)

    async def _sweep(self) -> None:
        """Closes leases that expired on keys with no request since, so that what
        they hold goes back within about a second of their expiry."""
        while True:
            await asyncio.sleep(1.0)
            now = self._clock()
            for key_id, lease in list(self._leases.items()):
                if now >= lease.expires_at:
                    self._close(self._leases.pop(key_id))
