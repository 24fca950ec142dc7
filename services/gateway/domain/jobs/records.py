"""Job records: their states, how a lifecycle event changes one, and the job object the
API shows."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from sluice.common.v1 import chat_pb2
from sluice.errors import ErrorCode, SluiceError
from sluice.inference.v1 import lifecycle_pb2
from sluice.jobs.v1 import jobs_pb2
from sluice.pricing import PriceTable

from services.gateway.domain.clock import now_ms
from services.gateway.domain.dialects.common import RequestMeta
from services.gateway.domain.dialects.openai.response import openai_usage
from services.gateway.domain.dialects.registry import dialect_named
from services.gateway.domain.problems import insufficient_confidence, problem_body
from services.gateway.domain.verdict import AnswerHints, Checks, checks_for

Status = jobs_pb2.JobStatus
STATUS_NAMES: dict[int, str] = {
    Status.JOB_STATUS_QUEUED: "queued",
    Status.JOB_STATUS_IN_PROGRESS: "in_progress",
    Status.JOB_STATUS_COMPLETED: "completed",
    Status.JOB_STATUS_FAILED: "failed",
    Status.JOB_STATUS_CANCELLED: "cancelled",
}


TERMINAL = frozenset(
    {Status.JOB_STATUS_COMPLETED, Status.JOB_STATUS_FAILED, Status.JOB_STATUS_CANCELLED}
)


EVENT_TYPES: dict[int, str] = {
    Status.JOB_STATUS_COMPLETED: "job.completed",
    Status.JOB_STATUS_FAILED: "job.failed",
    Status.JOB_STATUS_CANCELLED: "job.cancelled",
}


JOB_PREFIX = "job_"


def new_job_id() -> str:
    """Time-ordered (microseconds, hex) then random: key order is submission order."""
    return f"{JOB_PREFIX}{time.time_ns() // 1000:014x}{secrets.token_hex(6)}"


@dataclass
class Applied:
    changed: bool
    webhook: bool = False


class JobRenderer:
    """Turns records into the API's job objects and lifecycle events into record changes."""

    def __init__(self, prices: PriceTable | None) -> None:
        self.prices = prices

    def apply(self, record: jobs_pb2.JobRecord, event: lifecycle_pb2.LifecycleEvent) -> Applied:
        at_ms = event.at_unix_nanos // 1_000_000 or now_ms()
        if event.HasField("started"):
            started = event.started
            if record.status in TERMINAL:
                return Applied(False)
            changed = (
                record.status != Status.JOB_STATUS_IN_PROGRESS or started.attempt > record.attempts
            )
            record.status = Status.JOB_STATUS_IN_PROGRESS
            record.attempts = max(record.attempts, started.attempt)
            record.worker = started.worker
            if not record.started_unix_ms:
                record.started_unix_ms = at_ms
            return Applied(changed)
        if not event.HasField("finished") or record.status in TERMINAL:
            return Applied(False)
        finished = event.finished
        record.finished_unix_ms = at_ms
        record.attempts = max(record.attempts, finished.attempt)
        if finished.HasField("final"):
            final = finished.final
            record.status = Status.JOB_STATUS_COMPLETED
            meta = RequestMeta(record.job_id, record.trace_id, record.request.model)
            meta.created = record.created_unix_ms // 1000
            # Judged against what the caller asked (a record written before the checks
            # were kept: the request's schema) and shaped as the API it came through.
            if record.HasField("checks"):
                meta.checks = Checks.from_proto(record.checks)
            else:
                meta.checks = checks_for(
                    record.request, AnswerHints(), review_threshold=None, schema_repair=False
                )
            body = dialect_named(record.dialect).body
            record.result_json = body(meta, final, cache_hit=False)
            record.usage.CopyFrom(final.usage)
            record.cost_usd = final.cost_usd
            verdict = meta.verdict
            if verdict is not None and verdict.insufficient:
                # Below the caller's minimum: failed as the request would have been,
                # the answer (made and billed) still in result_json.
                record.status = Status.JOB_STATUS_FAILED
                record.error.CopyFrom(insufficient_confidence(verdict, meta.checks, {}).to_proto())
        else:
            failure = finished.failure
            cancelled = failure.problem.code == ErrorCode.CANCELLED
            record.status = Status.JOB_STATUS_CANCELLED if cancelled else Status.JOB_STATUS_FAILED
            record.error.CopyFrom(failure.problem)
            record.usage.CopyFrom(failure.partial_usage)
            record.cost_usd = self._partial_cost(
                failure.model_served or record.request.model, failure.partial_usage
            )
        webhook = bool(record.webhook_url)
        if webhook:
            record.webhook_status = "pending"
            record.webhook_id = f"msg_{record.job_id}"
        return Applied(True, webhook)

    def _partial_cost(self, model: str, usage: chat_pb2.Usage) -> float:
        if self.prices is None or not (usage.input_tokens or usage.output_tokens):
            return 0.0
        try:
            return float(self.prices.price(model, usage).total_usd)
        except Exception:
            return 0.0

    def view(self, record: jobs_pb2.JobRecord, tokens: int = 0) -> dict[str, Any]:
        status = STATUS_NAMES.get(record.status, "queued")
        sampling = record.request.sampling
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
        if record.status in TERMINAL:
            tokens = int(record.usage.output_tokens) or tokens
        fraction: float | None = None
        if record.status == Status.JOB_STATUS_COMPLETED:
            fraction = 1.0
        elif max_tokens:
            fraction = round(min(1.0, tokens / max_tokens), 4)
        error = None
        if record.HasField("error") and record.error.code:
            err = SluiceError.from_proto(record.error)
            error = problem_body(
                err,
                instance=f"/v1/jobs/{record.job_id}",
                request_id=record.job_id,
                trace_id=record.trace_id,
            )
        webhook = None
        if record.webhook_url:
            webhook = {
                "url": record.webhook_url,
                "status": record.webhook_status or "waiting",
                "id": record.webhook_id or None,
                "deliveries": [
                    {
                        "attempt": a.attempt,
                        "at": a.at_unix_ms / 1000,
                        "event": a.event_type,
                        "status_code": a.status_code or None,
                        "error": a.error or None,
                    }
                    for a in record.webhook_deliveries
                ],
            }
        return {
            "id": record.job_id,
            "object": "job",
            "status": status,
            "model": record.request.model,
            "priority": record.priority,
            "created_at": record.created_unix_ms // 1000,
            "started_at": record.started_unix_ms // 1000 or None,
            "finished_at": record.finished_unix_ms // 1000 or None,
            "expires_at": record.expires_unix_ms // 1000,
            "attempts": record.attempts,
            "cancel_requested": record.cancel_requested,
            "progress": {"tokens": tokens, "max_tokens": max_tokens, "fraction": fraction},
            "result": orjson.Fragment(record.result_json) if record.result_json else None,
            "usage": openai_usage(record.usage) if record.status in TERMINAL else None,
            "cost_usd": record.cost_usd if record.status in TERMINAL else None,
            "error": error,
            "metadata": dict(record.metadata),
            "webhook": webhook,
            "trace_id": record.trace_id or None,
        }
