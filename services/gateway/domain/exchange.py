"""What the HTTP edge hands the domain about a request, and what it gets back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from services.gateway.domain.tenancy.audit import RequestNotes
from services.gateway.domain.versions import VersionChoice

JSON = "application/json"
SSE = "text/event-stream"
# Every streamed answer: proxies must neither cache nor buffer it.
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# Names the job a response is about (a 202, or an inline answer under Prefer: wait).
JOB_ID_HEADER = "x-sluice-job-id"


@dataclass(frozen=True)
class RequestContext:
    """The request's own ids: ``request_id`` (``x-request-id``), ``trace_id`` (its
    trace), and the path it came on (a problem's ``instance``)."""

    request_id: str
    trace_id: str
    path: str
    # Filled as the request goes (caller, model, usage, error), for its audit record.
    notes: RequestNotes = field(default_factory=RequestNotes, compare=False)
    # The API version it is answered in (``Sluice-Version``).
    version: VersionChoice = field(default_factory=VersionChoice, compare=False)

    @property
    def instance(self) -> str:
        return f"{self.path}#{self.request_id}"


@dataclass
class Answer:
    """A response before it is an HTTP one: a whole body, or an SSE byte stream."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = JSON
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None

    @classmethod
    def sse(cls, stream: AsyncIterator[bytes], headers: dict[str, str]) -> Answer:
        headers.update(SSE_HEADERS)
        return cls(200, headers, SSE, stream=stream)
