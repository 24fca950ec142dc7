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

A lease carries every level the request does (key, team, end user): the limiter grants
it under the tightest of their quotas and budgets and counts it there at once, as that
many requests in their minutes and in flight, its input and output tokens in their
windows and the most they may cost in their day's and month's spend. The gateway admits
a request from it while it has a request, the tokens, the prompt's input and the
request's output left (``Lease.fits``). Each share's usage settles on every level as a
reservation's would; closing the lease hands back the rest on every level.

A lease is refilled ahead: when the one in use has a quarter of its requests, tokens or
time left (``REFILL_AHEAD``), the next is asked for in the background, and the requests
after the last of the old one are admitted from it without waiting for the limiter. Only
the first request of a key, or one that finds both leases spent before the next came,
waits for a round trip; before this, every request that arrived while a lease was being
renewed waited for the limiter (the heavier tail of the admission, issue 14). The next
lease is granted under the same rule as any (at most 1/8 of what is left); the ask is
``lease_only``, so a key near a limit gets none and nothing is held for it.

A lease is held per key, team, end user, model and priority class (``lease_key``), and
only for the terms it was granted under (``LeaseTerms``: the key's quotas and every
level's limits and budgets): an end user never admits from another's lease, a model's
price never stands in for another's, batch work never takes interactive room, and a
changed limit or budget ends the lease at the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.context import Context
from sluice.leases import Unused, share_id
from sluice.limiter.v1 import limiter_pb2

from services.gateway.domain.ports import Limiter

log = logging.getLogger(__name__)

TPM, RPM = "tpm", "rpm"
# Units of a policy, as PolicyState.unit names them.
U_TOKENS, U_REQUESTS, U_CONCURRENT = "tokens", "requests", "concurrent_requests"
U_INPUT, U_OUTPUT = "input_tokens", "output_tokens"
# The share of a lease's requests, tokens or time left at which the next is asked for.
REFILL_AHEAD = 0.25


def lease_key(request: limiter_pb2.ReserveRequest) -> str:
    return (
        f"{request.key_id}\x00{request.team_id}\x00{request.end_user}"
        f"\x00{request.model}\x00{request.priority}"
    )


# The terms a lease was granted under: the key's quotas, the batch share and every
# level's limits and budgets (messages compare by value).
LeaseTerms = tuple[object, ...]


def lease_terms(request: limiter_pb2.ReserveRequest) -> LeaseTerms:
    return (
        request.tokens_per_minute,
        request.requests_per_minute,
        request.batch_share,
        request.key_limits,
        request.key_budgets,
        request.team_limits,
        request.team_budgets,
        request.end_user_limits,
        request.end_user_budgets,
    )


@dataclass
class Lease:
    lease_id: str
    key_id: str
    terms: LeaseTerms
    tokens_left: int
    requests_left: int
    input_left: int
    output_left: int
    granted_at: float
    expires_at: float
    # The grant's answer as every admission from the lease starts from it: allowed, the
    # policies at the grant, the spend ceiling (the lease's own hold counted as spent).
    granted: limiter_pb2.ReserveResponse
    # Per policy of ``granted``, what counts back into it (``count_back``).
    backs: tuple[int, ...]
    # The span of the request whose round trip to the limiter obtained the lease.
    granted_in: trace.SpanContext | None = None
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    # What was granted: the marks ``running_low`` measures against.
    requests_granted: int = 0
    tokens_granted: int = 0

    def usable(self, request: limiter_pb2.ReserveRequest, now: float) -> bool:
        """Not expired, and granted under the terms ``request`` carries."""
        return now < self.expires_at and self.terms == lease_terms(request)

    def running_low(self, now: float) -> bool:
        """A quarter or less of its requests, tokens or time left: the next is due."""
        ttl = self.expires_at - self.granted_at
        return (
            self.requests_left <= self.requests_granted * REFILL_AHEAD
            or self.tokens_left <= self.tokens_granted * REFILL_AHEAD
            or self.expires_at - now <= ttl * REFILL_AHEAD
        )

    def fits(self, input_tokens: int, output_tokens: int) -> bool:
        return (
            self.requests_left >= 1
            and self.tokens_left >= input_tokens + output_tokens
            and self.input_left >= input_tokens
            and self.output_left >= output_tokens
        )

    def take(self, input_tokens: int, output_tokens: int) -> str:
        tokens = input_tokens + output_tokens
        self.tokens_left -= tokens
        self.requests_left -= 1
        self.input_left -= input_tokens
        self.output_left -= output_tokens
        return share_id(self.lease_id, next(self.numbers), tokens, input_tokens)

    def unused(self) -> Unused:
        """What was never handed out, and the lease emptied (it admits no more)."""
        left = Unused(
            max(0, self.tokens_left),
            max(0, self.requests_left),
            max(0, self.input_left),
            max(0, self.output_left),
        )
        self.tokens_left = self.requests_left = self.input_left = self.output_left = 0
        return left

    def answer(self, now: float) -> limiter_pb2.ReserveResponse:
        """An admission from this lease: the grant's answer (its policies, its spend
        ceiling) with the policies brought up to now (``count_back``)."""
        response = limiter_pb2.ReserveResponse()
        response.CopyFrom(self.granted)
        self.count_back(response, now)
        return response

    def count_back(self, response: limiter_pb2.ReserveResponse, now: float) -> None:
        """The policies as the limiter reported them at the grant, with what is still
        unadmitted in the lease counted as remaining (it is this key's to spend). A
        budget's remaining stays as at the grant, the lease's whole hold counted spent:
        the gateway knows no prices, and the headers err on the safe side."""
        elapsed_ms = int((now - self.granted_at) * 1000)
        lefts = (self.tokens_left, self.requests_left, self.input_left, self.output_left)
        for policy, back in zip(response.policies, self.backs, strict=True):
            if back >= 0:
                policy.remaining = min(policy.quota, policy.remaining + lefts[back])
            if policy.reset_ms:
                policy.reset_ms = max(0, policy.reset_ms - elapsed_ms)


# Which of a lease's (tokens, requests, input, output) left counts back into a policy of
# each unit (see ``Lease.count_back``); budgets and unknown units get nothing back.
_BACK_BY_UNIT = {U_TOKENS: 0, U_REQUESTS: 1, U_CONCURRENT: 1, U_INPUT: 2, U_OUTPUT: 3}


def _backs(policies: Iterable[limiter_pb2.PolicyState]) -> tuple[int, ...]:
    out = []
    for p in policies:
        unit = p.unit or (U_TOKENS if p.name == TPM else U_REQUESTS if p.name == RPM else "")
        out.append(_BACK_BY_UNIT.get(unit, -1))
    return tuple(out)


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
        # The lease asked for ahead, waiting for the one in use to be spent.
        self._next: dict[str, Lease] = {}
        # One lease request in flight per key; the others wait for it, then look again.
        self._refills: dict[str, asyncio.Future[bool]] = {}
        self._ahead: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.admitted_locally = 0
        # Leases asked for ahead, and how many of them the limiter granted.
        self.asked_ahead = 0
        self.refilled_ahead = 0
        self._tracer = trace.get_tracer("sluice.gateway")

    async def reserve(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        if self.lease_requests == 0:
            return await self.limiter.reserve(request)
        held = lease_key(request)
        while True:
            local = self._from_lease(request, held)
            if local is not None:
                return local
            refill = self._refills.get(held)
            if refill is None:
                return await self._reserve_with_lease(request, held)
            # Another request of this key is asking for a lease: wait for it and take
            # from it. One lease request at a time per key, so that a burst does not
            # scatter what is left over many leases (refusing while room is held).
            # When it brought no lease, the key is near a limit: ask one by one.
            if not await asyncio.shield(refill):
                return await self.limiter.reserve(request)

    def release(self, reservation_id: str, key_id: str, request_id: str) -> None:
        self.limiter.release(reservation_id, key_id, request_id)

    async def drain(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        # A lease asked for ahead is closed too once granted: never left held.
        if self._ahead:
            await asyncio.gather(*self._ahead, return_exceptions=True)
        for leases in (self._leases, self._next):
            for key_id in list(leases):
                self._close(leases.pop(key_id))
        await self.limiter.drain()

    @property
    def open_leases(self) -> int:
        return len(self._leases) + len(self._next)

    # --- inside -----------------------------------------------------------------------

    def _from_lease(
        self, request: limiter_pb2.ReserveRequest, held: str
    ) -> limiter_pb2.ReserveResponse | None:
        lease = self._leases.get(held)
        now = self._clock()
        if lease is not None and not lease.usable(request, now):
            # Expired, or a quota, limit or budget changed: the next lease is granted
            # under the new terms.
            self._close(self._leases.pop(held))
            lease = None
        input_tokens, output_tokens = request.input_tokens, request.max_output_tokens
        if lease is None or not lease.fits(input_tokens, output_tokens):
            lease = self._promote_next(request, held, now) or lease
            if lease is None:
                return None
            if not lease.fits(input_tokens, output_tokens):
                # Too little left for this request, which goes to the limiter: what the
                # lease still holds goes back first, so that it can count there.
                self._close(self._leases.pop(held))
                return None
        need = input_tokens + output_tokens
        reservation_id = lease.take(input_tokens, output_tokens)
        if lease.running_low(now) and held not in self._refills and held not in self._next:
            self._refill_ahead(request, held)
        response = lease.answer(now)
        response.reservation_id = reservation_id
        response.reserved_tokens = need
        response.reserved_output_tokens = output_tokens
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
        return response

    async def _reserve_with_lease(
        self, request: limiter_pb2.ReserveRequest, held: str
    ) -> limiter_pb2.ReserveResponse:
        refill: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._refills[held] = refill
        leased = False
        try:
            asked = limiter_pb2.ReserveRequest()
            asked.CopyFrom(request)
            asked.lease_tokens = (
                request.input_tokens + request.max_output_tokens
            ) * self.lease_requests
            asked.lease_requests = self.lease_requests
            response = await self.limiter.reserve(asked)
            if response.allowed and response.lease_tokens > 0:
                self._install(asked, response, held)
                leased = True
            return response
        finally:
            del self._refills[held]
            refill.set_result(leased)

    def _promote_next(
        self, request: limiter_pb2.ReserveRequest, held: str, now: float
    ) -> Lease | None:
        """The lease asked for ahead, now the one in use (the spent one closed)."""
        lease = self._next.pop(held, None)
        if lease is None:
            return None
        if not lease.usable(request, now):
            self._close(lease)
            return None
        spent = self._leases.pop(held, None)
        if spent is not None:
            self._close(spent)
        self._leases[held] = lease
        return lease

    def _refill_ahead(self, request: limiter_pb2.ReserveRequest, held: str) -> None:
        refill: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._refills[held] = refill
        self.asked_ahead += 1
        asked = limiter_pb2.ReserveRequest()
        asked.CopyFrom(request)
        asked.request_id = ""
        asked.lease_tokens = (request.input_tokens + request.max_output_tokens) * (
            self.lease_requests
        )
        asked.lease_requests = self.lease_requests
        asked.lease_only = True
        # Its own trace (linked from the request that found the lease running low): the
        # request does not wait for it, and its trace ends with its answer.
        task = asyncio.create_task(
            self._ask_ahead(asked, held, refill, trace.get_current_span().get_span_context()),
            name="gateway-lease-refill",
        )
        self._ahead.add(task)
        task.add_done_callback(self._ahead.discard)

    async def _ask_ahead(
        self,
        asked: limiter_pb2.ReserveRequest,
        held: str,
        refill: asyncio.Future[bool],
        found_low_in: trace.SpanContext,
    ) -> None:
        leased = False
        try:
            with self._tracer.start_as_current_span(
                "limiter.lease refill",
                context=Context(),
                links=[trace.Link(found_low_in)] if found_low_in.is_valid else None,
                attributes={"sluice.key_id": asked.key_id},
            ):
                response = await self.limiter.reserve(asked)
            if response.allowed and response.lease_tokens > 0:
                self._next[held] = self._lease_of(asked, response, self._clock())
                self.refilled_ahead += 1
                leased = True
            elif response.allowed:
                # A limiter that does not know lease_only (an older replica) reserved
                # the ask as a request: it goes back.
                self.limiter.release(response.reservation_id, asked.key_id, "")
        except Exception:
            # The requests that find the lease spent ask the limiter themselves (and
            # meet its failure there, with their tier's choice).
            log.debug("asking for the next lease failed", exc_info=True)
        finally:
            del self._refills[held]
            refill.set_result(leased)

    def _lease_of(
        self, asked: limiter_pb2.ReserveRequest, response: limiter_pb2.ReserveResponse, now: float
    ) -> Lease:
        """The lease ``response`` grants, with the asking reservation part of its room
        (as the limiter held it: its output may be the key's learned estimate)."""
        first_input = min(asked.input_tokens, response.reserved_tokens)
        first_output = response.reserved_tokens - first_input
        return Lease(
            lease_id=response.reservation_id,
            key_id=asked.key_id,
            terms=lease_terms(asked),
            tokens_left=response.lease_tokens + response.reserved_tokens,
            requests_left=response.lease_requests + 1,
            input_left=response.lease_input_tokens + first_input,
            output_left=response.lease_output_tokens + first_output,
            granted_at=now,
            expires_at=now + response.lease_ttl_ms / 1000,
            granted=limiter_pb2.ReserveResponse(
                allowed=True,
                policies=response.policies,
                spend_ceiling_usd_nanos=response.spend_ceiling_usd_nanos,
            ),
            backs=_backs(response.policies),
            granted_in=trace.get_current_span().get_span_context(),
            requests_granted=response.lease_requests + 1,
            tokens_granted=response.lease_tokens + response.reserved_tokens,
        )

    def _install(
        self,
        asked: limiter_pb2.ReserveRequest,
        response: limiter_pb2.ReserveResponse,
        held: str,
    ) -> None:
        now = self._clock()
        lease = self._lease_of(asked, response, now)
        # The request that asked is the lease's first share, as the limiter held it.
        first_input = min(asked.input_tokens, response.reserved_tokens)
        response.reservation_id = lease.take(first_input, response.reserved_tokens - first_input)
        # Its headers count the lease as the later requests' headers will.
        lease.count_back(response, now)
        previous = self._leases.get(held)
        self._leases[held] = lease
        if previous is not None:
            self._close(previous)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="gateway-lease-sweeper")

    def _close(self, lease: Lease) -> None:
        self.limiter.close_lease(lease.lease_id, lease.key_id, lease.unused())

    async def _sweep(self) -> None:
        """Closes leases that expired on keys with no request since, so that what
        they hold goes back within about a second of their expiry."""
        while True:
            await asyncio.sleep(1.0)
            now = self._clock()
            for leases in (self._leases, self._next):
                for key_id, lease in list(leases.items()):
                    if now >= lease.expires_at:
                        self._close(leases.pop(key_id))
