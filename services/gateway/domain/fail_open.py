"""While the limiter does not answer: what a team's tier says (``limiter_failure``).

``fail_closed`` (the default): 503 ``limiter_unavailable``; nothing is admitted that
cannot be counted. ``fail_open``: this gateway admits within a conservative local
allowance, ``share`` of each requests-per-minute limit the request carries (the key's
own, or the default, and each level's), counted per key, team and end user in this
process over the last minute. Budgets and concurrency cannot be known here: the share of
the request rate is what bounds them meanwhile.

A request admitted so gets a reservation id in its partition (``p<n>.open-...``) that no
limiter holds. Its usage event goes to ``SLUICE_USAGE`` as any other, and the owner of
the partition counts it as spent when it sees it: live, or, for what was used while it
was down, when it rebuilds the partition from the usage stream on its return. So the
limits hold again from then on with the outage's spend in them.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable

from sluice.errors import ErrorCode
from sluice.limiter.v1 import limiter_pb2
from sluice.partitions import id_prefix, partition_of

from services.gateway.domain.ports import Admission
from services.gateway.domain.problems import GatewayError
from services.gateway.domain.tenancy.tiers import LimiterFailure

WINDOW_SECONDS = 60.0


class FailOpenAllowance:
    def __init__(
        self,
        share: float,
        default_requests_per_minute: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.share = share
        self.default_requests_per_minute = default_requests_per_minute
        self._clock = clock
        self._admitted: dict[str, deque[float]] = {}
        self.admitted = 0

    def _caps(self, request: limiter_pb2.ReserveRequest) -> list[tuple[str, str, int]]:
        """(policy name, counting scope, cap) of each requests-per-minute limit."""
        key_rpm = request.requests_per_minute or self.default_requests_per_minute
        if request.key_limits.requests_per_minute:
            key_rpm = min(key_rpm, request.key_limits.requests_per_minute)
        caps = [("key.requests_per_minute", f"key:{request.key_id}", key_rpm)]
        if request.team_id and request.team_limits.requests_per_minute:
            caps.append(
                (
                    "team.requests_per_minute",
                    f"team:{request.team_id}",
                    request.team_limits.requests_per_minute,
                )
            )
        if request.end_user and request.end_user_limits.requests_per_minute:
            caps.append(
                (
                    "end_user.requests_per_minute",
                    f"user:{request.team_id}:{request.end_user}",
                    request.end_user_limits.requests_per_minute,
                )
            )
        return [(name, scope, max(1, int(rpm * self.share))) for name, scope, rpm in caps]

    def admit(self, request: limiter_pb2.ReserveRequest) -> limiter_pb2.ReserveResponse:
        now = self._clock()
        policies = []
        refused: tuple[str, float] | None = None
        windows = []
        for name, scope, cap in self._caps(request):
            window = self._admitted.setdefault(scope, deque())
            while window and window[0] <= now - WINDOW_SECONDS:
                window.popleft()
            windows.append(window)
            reset_ms = int((window[0] + WINDOW_SECONDS - now) * 1000) if window else 0
            policies.append(
                limiter_pb2.PolicyState(
                    name=f"fail_open.{name}",
                    quota=cap,
                    remaining=max(0, cap - len(window)),
                    window_seconds=int(WINDOW_SECONDS),
                    reset_ms=max(0, reset_ms),
                    unit="requests",
                )
            )
            if len(window) >= cap:
                wait = window[0] + WINDOW_SECONDS - now
                if refused is None or wait > refused[1]:
                    refused = (f"fail_open.{name}", wait)
        if refused is not None:
            return limiter_pb2.ReserveResponse(
                allowed=False,
                policies=policies,
                denied_by=refused[0],
                retry_after_ms=max(1, int(refused[1] * 1000)),
            )
        for window in windows:
            window.append(now)
        for policy in policies:
            policy.remaining = max(0, policy.remaining - 1)
        self.admitted += 1
        partition = partition_of(request.team_id, request.key_id)
        return limiter_pb2.ReserveResponse(
            allowed=True,
            reservation_id=f"{id_prefix(partition)}open-{uuid.uuid4().hex}",
            policies=policies,
            reserved_tokens=request.input_tokens + request.max_output_tokens,
        )


async def reserve(
    limiter: Admission,
    request: limiter_pb2.ReserveRequest,
    failure: LimiterFailure,
    allowance: FailOpenAllowance | None,
) -> limiter_pb2.ReserveResponse:
    """The limiter's decision; while it does not answer, the tier's choice."""
    try:
        return await limiter.reserve(request)
    except GatewayError as exc:
        if exc.code is not ErrorCode.SERVICE_UNAVAILABLE:
            raise
        if failure is LimiterFailure.FAIL_OPEN and allowance is not None:
            return allowance.admit(request)
        raise GatewayError(
            ErrorCode.LIMITER_UNAVAILABLE,
            "The rate limiter did not answer, and this team's tier admits nothing it cannot count.",
            retry_after_ms=1000,
        ) from None
