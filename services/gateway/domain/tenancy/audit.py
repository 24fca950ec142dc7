"""The audit trail's records: one per admin action, one per request (who, when, model,
tokens, cost, status; the prompt only when the key's policy says so)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from sluice.common.v1 import chat_pb2
from sluice.tenancy.v1 import tenancy_pb2

REQUEST = "request"
ADMIN = "admin"
# The subject token of records with no team (an action on no team).
NO_TEAM = "_"
# A stored prompt is cut here: the trail is for accountability, not a second copy of
# every conversation.
PROMPT_LIMIT_CHARS = 16_000


def kind_of(action: str) -> str:
    return REQUEST if action == REQUEST else ADMIN


def new_event_id() -> str:
    return "aud_" + uuid.uuid4().hex


def admin_event(
    *, actor: str, team_id: str, action: str, target: str, trace_id: str, details: dict[str, str]
) -> tenancy_pb2.AuditEvent:
    return tenancy_pb2.AuditEvent(
        event_id=new_event_id(),
        at_unix_nanos=time.time_ns(),
        actor=actor,
        team_id=team_id,
        action=action,
        target=target,
        status=200,
        trace_id=trace_id,
        details=details,
    )


@dataclass
class RequestNotes:
    """What the handlers learn about a request as it goes (the caller after
    authentication, the model, the usage and cost when the answer is final, the error
    code), for its audit record at the end."""

    actor: str = ""
    key_id: str = ""
    team_id: str = ""
    end_user: str = ""
    model: str = ""
    audit_prompts: bool = False
    prompt: str = ""
    usage: chat_pb2.Usage | None = None
    cost_usd: float = 0.0
    code: str = ""
    details: dict[str, str] = field(default_factory=dict)

    @property
    def authenticated(self) -> bool:
        return bool(self.actor)


def request_event(
    notes: RequestNotes, *, request_id: str, route: str, status: int, trace_id: str
) -> tenancy_pb2.AuditEvent:
    event = tenancy_pb2.AuditEvent(
        event_id=new_event_id(),
        at_unix_nanos=time.time_ns(),
        actor=notes.actor,
        team_id=notes.team_id,
        action=REQUEST,
        target=request_id,
        route=route,
        model=notes.model,
        cost_usd_nanos=round(notes.cost_usd * 1e9),
        status=status,
        code=notes.code,
        end_user=notes.end_user,
        trace_id=trace_id,
        details=notes.details,
    )
    if notes.key_id and notes.key_id != notes.actor:
        event.details["key_id"] = notes.key_id
    if notes.usage is not None:
        event.usage.CopyFrom(notes.usage)
    if notes.audit_prompts and notes.prompt:
        event.prompt = notes.prompt[:PROMPT_LIMIT_CHARS]
    return event


def event_key_id(event: tenancy_pb2.AuditEvent) -> str:
    """The key a record is about: the acting key, or the key an admin action targets."""
    return event.details.get("key_id") or event.actor


def matches(
    event: tenancy_pb2.AuditEvent,
    *,
    key_id: str | None,
    action: str | None,
    until_nanos: int | None,
) -> bool:
    if action and event.action != action:
        return False
    if key_id and key_id not in (event.actor, event.target, event.details.get("key_id", "")):
        return False
    return not (until_nanos is not None and event.at_unix_nanos > until_nanos)
