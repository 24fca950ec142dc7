"""The limiter on NATS: reserve and commit (request/reply, queue group ``limiter``) and
the ``SLUICE_USAGE`` consumer that settles reservations with actual usage.

The consumer is a ``sluice.consumers.DurableConsumer``: it settles each event inside a
CONSUMER span continued from the event's headers and acks it after applying it, so a
redelivery (a lost ack, a crash before the ack) finds the reservation already settled
and changes nothing. An undecodable event can never be applied and is terminated.
After a batch smaller than ``batch`` it lingers ``window`` seconds, so that usage is
settled in batches rather than one fetch per event.

**One ack per event, not AckAll.** Settling is idempotent and the limiter runs as one
process, so acking each batch at once would be safe for the events; but it buys
nothing measurable: at 100 requests/s (``python -m bench --only overhead --rates 100
--seconds 10``, medians of four alternated runs) AckAll takes the limiter from 1.23 to
0.42 NATS messages sent per request and its CPU from 0.485 to 0.465 ms per request
(0.47 to 0.485 streaming), inside the runs' spread of about 0.08 ms. Against that, a
switch needs a new durable (JetStream cannot change a consumer's ack policy), which
starts at the beginning of ``SLUICE_USAGE`` or needs the old one's position carried
over, and nothing keeps two limiters from pulling at once during a rollout (the
Deployment uses the default rolling update, which starts the new pod before it stops
the old). Worth revisiting if usage grows to thousands of events a second.
"""

from __future__ import annotations

from nats.aio.msg import Msg
from opentelemetry import trace
from sluice.bus import Bus
from sluice.consumers import ConsumerBroker, Delivery, DurableConsumer
from sluice.cost.v1 import cost_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.topology import ConsumerSpec, Subjects

from services.limiter.domain.admission import Admission

QUEUE = "limiter"


class AdmissionHandlers:
    """``Bus.serve`` handlers: proto in, ``Admission`` call, proto out."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def reserve(
        self, request: limiter_pb2.ReserveRequest, _msg: Msg
    ) -> limiter_pb2.ReserveResponse:
        return self.admission.reserve(request)

    async def commit(
        self, request: limiter_pb2.CommitRequest, _msg: Msg
    ) -> limiter_pb2.CommitResponse:
        return self.admission.commit(request)

    async def serve(self, bus: Bus) -> None:
        await bus.serve(
            Subjects.LIMITER_RESERVE, limiter_pb2.ReserveRequest, self.reserve, queue=QUEUE
        )
        await bus.serve(
            Subjects.LIMITER_COMMIT, limiter_pb2.CommitRequest, self.commit, queue=QUEUE
        )


class UsageReconciler:
    """Settles each usage event's reservation (``Admission.apply_usage``), in the
    message's CONSUMER span, which the settlement tags with what it found."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def handle(self, event: cost_pb2.UsageEvent, delivery: Delivery) -> None:
        delivery.span.set_attribute("sluice.key_id", event.key_id)
        delivery.span.set_attribute("sluice.request_id", event.request_id)
        self.admission.apply_usage(event)


def usage_reconciler(
    broker: ConsumerBroker,
    admission: Admission,
    spec: ConsumerSpec,
    *,
    batch: int,
    fetch_timeout: float,
    window: float,
) -> DurableConsumer[cost_pb2.UsageEvent]:
    """The durable consumer on ``SLUICE_USAGE`` that settles reservations."""
    return DurableConsumer(
        broker,
        spec,
        cost_pb2.UsageEvent,
        UsageReconciler(admission).handle,
        batch=batch,
        window=window,
        fetch_timeout=fetch_timeout,
        tracer=trace.get_tracer("sluice.limiter"),
        description="Reservations settled with each request's actual usage.",
    )
