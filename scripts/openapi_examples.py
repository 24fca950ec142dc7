"""Captures the OpenAPI document's examples from real responses (`make openapi-examples`).

Starts the stack the integration tests start (an embedded NATS, the simulated provider
and the five services as processes, on free ports, in a temporary folder), sends one
request per operation and one per error code that a client can provoke, and writes what
came back (status, body, token counts and costs as the stack reported them) to
``services/gateway/handlers/http/openapi_examples.json``, which the gateway merges into
the OpenAPI document it serves. Secrets in answers (a new key's, the webhook secret) are
replaced by a marker of the same shape; long documents (metrics, AsyncAPI) are
abridged, and say so. A capture whose answer is not the one expected stops the script:
an example is never written from a response it did not get.

    .venv/bin/python scripts/openapi_examples.py [OUT]
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sluice.errors import ErrorCode  # noqa: E402

from tests.support.full_stack import DEV_KEY, FullStack, full_stack  # noqa: E402

OUT = REPO / "services" / "gateway" / "handlers" / "http" / "openapi_examples.json"
JSON = "application/json"
PROBLEM = "application/problem+json"
SSE = "text/event-stream"

# Codes no request to the HTTP API provokes on a healthy stack, and why.
NOT_CAPTURED = {
    ErrorCode.INVALID_SERVICE_TOKEN: "gRPC only: the operator APIs' service token.",
    ErrorCode.SERVICE_UNAVAILABLE: "Needs an internal service down (the outage tests kill one).",
    ErrorCode.LIMITER_UNAVAILABLE: "Needs the limiter down (the outage tests kill it).",
    ErrorCode.INTERNAL_ERROR: "A bug: nothing a request can provoke.",
    ErrorCode.UPSTREAM_TIMEOUT: "Needs a provider silent past its bound (60 s for the simulator).",
    ErrorCode.MODEL_TIMEOUT: "Needs a route's deadline to pass (120 s for the local model).",
    ErrorCode.MODEL_RETIRED: "Needs a route past its sunset; the shipped catalogue has none.",
}

CHAT = {
    "model": "sim-fast",
    "messages": [{"role": "user", "content": "Say hello in a few words."}],
    "max_tokens": 32,
}
MESSAGE = {
    "model": "sim-fast",
    "max_tokens": 32,
    "messages": [{"role": "user", "content": "Say hello in a few words."}],
}


class Capture:
    def __init__(self, stack: FullStack, admin_key: str) -> None:
        self.stack = stack
        self.base = stack.gateway_url
        self.admin_key = admin_key
        self.operations: dict[str, list[dict[str, Any]]] = {}
        self.errors: dict[str, dict[str, Any]] = {}

    def client(self, key: str | None = DEV_KEY, **headers: str) -> httpx.AsyncClient:
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=60)

    @staticmethod
    def _value(resp: httpx.Response) -> Any:
        media = resp.headers.get("content-type", "").split(";")[0]
        return resp.json() if media in (JSON, PROBLEM) else resp.text

    def ok(  # noqa: PLR0917 (the example's parts, in the order they are written)
        self,
        operation: str,
        name: str,
        summary: str,
        resp: httpx.Response,
        status: int,
        request: Any = None,
        value: Any = None,
    ) -> Any:
        if resp.status_code != status:
            raise SystemExit(
                f"{operation}/{name}: expected {status}, got {resp.status_code}: {resp.text[:500]}"
            )
        body = self._value(resp) if value is None else value
        entry: dict[str, Any] = {
            "name": name,
            "summary": summary,
            "status": resp.status_code,
            "media_type": resp.headers.get("content-type", "").split(";")[0],
            "value": body,
        }
        if request is not None:
            entry["request"] = request
        self.operations.setdefault(operation, []).append(entry)
        return body

    def error(
        self, code: ErrorCode, operation: str, resp: httpx.Response, request: Any = None
    ) -> None:
        body = resp.json()
        found = (
            body.get("code")
            or body.get("error", {}).get("code")
            or body.get("error", {}).get("type")
        )
        if str(code) not in json.dumps(body) or resp.status_code < 400:
            raise SystemExit(f"{code}: got {resp.status_code} {found}: {resp.text[:500]}")
        entry: dict[str, Any] = {
            "operation": operation,
            "status": resp.status_code,
            "media_type": resp.headers.get("content-type", "").split(";")[0],
            "value": body,
        }
        if request is not None:
            entry["request"] = request
        self.errors[str(code)] = entry

    def error_value(
        self, code: ErrorCode, operation: str, status: int, value: dict[str, Any]
    ) -> None:
        """An error met inside another answer (a job's ``error``, a stream's error event)."""
        if value.get("code") != str(code):
            raise SystemExit(f"{code}: got {value}")
        self.errors[str(code)] = {
            "operation": operation,
            "status": status,
            "media_type": PROBLEM,
            "value": value,
        }


_SECRET_HEAD = re.compile(r"^(whsec_|sk-sluice-admin-|sk-sluice-)")


def redact_secret(view: dict[str, Any], field: str = "secret") -> dict[str, Any]:
    match = _SECRET_HEAD.match(view[field])
    view[field] = (match.group(1) if match else "") + "<redacted in this example>"
    return view


async def wait_job(http: httpx.AsyncClient, job_id: str, statuses: set[str]) -> dict[str, Any]:
    for _ in range(300):
        job: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in statuses:
            return job
        await asyncio.sleep(0.1)
    raise SystemExit(f"job {job_id} never reached {statuses}")


async def operations(c: Capture) -> None:
    async with c.client() as http:
        resp = await http.post("/v1/chat/completions", json=CHAT)
        plain = c.ok("createChatCompletion", "completion", "A chat completion", resp, 200, CHAT)
        streamed = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        resp = await http.post("/v1/chat/completions", json=streamed)
        stream_text = c.ok(
            "createChatCompletion", "stream", "The same, streamed (SSE)", resp, 200, streamed
        )
        request_id = stream_text.split("id: ", 1)[1].split(":", 1)[0]
        resp = await http.get(
            f"/v1/streams/{request_id}", headers={"Last-Event-ID": f"{request_id}:1"}
        )
        c.ok("resumeStream", "resume", "The rest of a stream after sequence 1", resp, 200)

        anthropic = {"anthropic-version": "2023-06-01"}
        resp = await http.post("/v1/messages", json=MESSAGE, headers=anthropic)
        c.ok("createMessage", "message", "An Anthropic message", resp, 200, MESSAGE)
        resp = await http.post("/v1/messages", json={**MESSAGE, "stream": True}, headers=anthropic)
        c.ok(
            "createMessage", "stream", "The same, streamed", resp, 200, {**MESSAGE, "stream": True}
        )

        job_body = {"request": CHAT, "metadata": {"report": "q3"}}
        resp = await http.post("/v1/jobs", json=job_body)
        job = c.ok("createJob", "queued", "A job, accepted", resp, 202, job_body)
        done = await wait_job(http, job["id"], {"completed"})
        resp = await http.get(f"/v1/jobs/{job['id']}")
        c.ok("getJob", "completed", "A completed job", resp, 200, value=done)
        resp = await http.get(f"/v1/jobs/{job['id']}/events")
        c.ok("streamJobEvents", "events", "A finished job's events", resp, 200)
        resp = await http.get("/v1/jobs", params={"limit": 2})
        c.ok("listJobs", "page", "The newest jobs", resp, 200)

        slow = {"request": {**CHAT, "sim": {"ttft_ms": 20000}}}
        job = (await http.post("/v1/jobs", json=slow)).json()
        await wait_job(http, job["id"], {"in_progress"})
        resp = await http.post(f"/v1/jobs/{job['id']}/cancel")
        c.ok("cancelJob", "cancel", "A running job asked to stop", resp, 200)
        cancelled = await wait_job(http, job["id"], {"cancelled"})
        c.error_value(ErrorCode.CANCELLED, "getJob", 409, cancelled["error"])

        resp = await http.get("/v1/webhooks/secret")
        c.ok(
            "getWebhookSecret",
            "secret",
            "The team's signing secret",
            resp,
            200,
            value=redact_secret(resp.json()),
        )
        resp = await http.get("/v1/models")
        c.ok("listModels", "models", "The models served", resp, 200)
        estimate = {**CHAT, "max_tokens": 100}
        resp = await http.post("/v1/estimate", json=estimate)
        c.ok(
            "estimateCost",
            "estimate",
            "What a request would cost",
            resp,
            resp.status_code,
            estimate,
        )
        await asyncio.sleep(1)  # the ledger records a moment after the answers
        resp = await http.get("/v1/usage", params={"group_by": "model"})
        c.ok("getUsage", "by_model", "Spend by model", resp, 200)
        resp = await http.get("/v1/me")
        c.ok("getCaller", "me", "The calling key, its team and budgets", resp, 200)
        trace_id = plain["sluice"]["trace_id"]
        for _ in range(100):  # spans reach the local files a moment after the answer
            resp = await http.get(f"/v1/traces/{trace_id}")
            if resp.status_code == 200:
                break
            await asyncio.sleep(0.1)
        c.ok("getTrace", "trace", "A chat completion's trace", resp, 200)
        cached = {**CHAT, "temperature": 0}
        await http.post("/v1/chat/completions", json=cached)
        invalidate = {"request": cached}
        resp = await http.post("/v1/cache/invalidate", json=invalidate)
        c.ok(
            "invalidateCache", "request", "A request's cached answer removed", resp, 200, invalidate
        )
        resp = await http.get("/v1/providers")
        c.ok("listProviders", "providers", "Routes, breakers and recent calls", resp, 200)
        resp = await http.get("/healthz")
        c.ok("getHealth", "live", "Alive", resp, 200)
        resp = await http.get("/readyz")
        c.ok("getReadiness", "ready", "Every service answers", resp, 200)
        resp = await http.get("/metrics")
        lines = [line for line in resp.text.splitlines() if "sluice_requests" in line][:12]
        c.ok(
            "getMetrics",
            "abridged",
            "Some of the gateway's metrics (abridged)",
            resp,
            200,
            value="\n".join(lines) + "\n",
        )
        resp = await http.get("/docs/asyncapi")
        doc = resp.json()
        abridged = {
            "asyncapi": doc["asyncapi"],
            "info": doc["info"],
            "channels": [*sorted(doc["channels"])[:3], "... (abridged)"],
        }
        c.ok(
            "getAsyncApi", "abridged", "The AsyncAPI document (abridged)", resp, 200, value=abridged
        )

    async with c.client(c.admin_key) as ops:
        resp = await ops.get("/v1/cache")
        c.ok("getCacheStats", "stats", "The cache's counters (operators)", resp, 200)

    async with c.client(c.admin_key) as ops:
        team = {"team_id": "acme", "name": "Acme", "budgets": {"usd_per_month": "200"}}
        resp = await ops.post("/v1/admin/teams/", json=team)
        c.ok("adminCreateTeam", "team", "A team", resp, 201, team)
        resp = await ops.get("/v1/admin/teams/")
        c.ok("adminListTeams", "teams", "Every team", resp, 200)
        resp = await ops.get("/v1/admin/teams/acme")
        c.ok("adminGetTeam", "team", "One team, with what applies to it", resp, 200)
        change = {"limits": {"requests_per_minute": 600}}
        resp = await ops.patch("/v1/admin/teams/acme", json=change)
        c.ok("adminUpdateTeam", "limits", "A team's limits changed", resp, 200, change)
        key_body = {"team_id": "acme", "name": "ci", "scopes": ["chat", "jobs"]}
        resp = await ops.post("/v1/admin/keys/", json=key_body)
        key = resp.json()
        c.ok(
            "adminCreateKey",
            "key",
            "A key (its secret shown once)",
            resp,
            201,
            key_body,
            redact_secret(dict(key)),
        )
        resp = await ops.get("/v1/admin/keys/", params={"team_id": "acme"})
        c.ok("adminListKeys", "keys", "A team's keys", resp, 200)
        resp = await ops.get(f"/v1/admin/keys/{key['key_id']}")
        c.ok("adminGetKey", "key", "One key", resp, 200)
        key_change: dict[str, Any] = {"model_allow": ["sim-*"]}
        resp = await ops.patch(f"/v1/admin/keys/{key['key_id']}", json=key_change)
        c.ok("adminUpdateKey", "models", "A key's models changed", resp, 200, key_change)
        rotate = {"grace_seconds": 3600}
        resp = await ops.post(f"/v1/admin/keys/{key['key_id']}/rotate", json=rotate)
        fresh = resp.json()
        c.ok(
            "adminRotateKey",
            "rotated",
            "The new key",
            resp,
            201,
            rotate,
            redact_secret(dict(fresh)),
        )
        resp = await ops.post(f"/v1/admin/keys/{fresh['key_id']}/revoke")
        c.ok("adminRevokeKey", "revoked", "A revoked key", resp, 200)
        resp = await ops.get("/v1/admin/audit/", params={"team_id": "acme", "limit": 3})
        c.ok("adminListAudit", "page", "A team's latest audit records", resp, 200)
        resp = await ops.post(f"/v1/admin/keys/{fresh['key_id']}/rotate", json=rotate)
        c.error(ErrorCode.CONFLICT, "adminRotateKey", resp, rotate)


async def key_for(c: Capture, **body: Any) -> str:
    async with c.client(c.admin_key) as ops:
        resp = await ops.post("/v1/admin/keys/", json={"name": "k-" + uuid.uuid4().hex[:6], **body})
        if resp.status_code != 201:
            raise SystemExit(f"key: {resp.text}")
        secret: str = resp.json()["secret"]
        return secret


async def errors(c: Capture) -> None:
    async with c.client() as http:

        async def chat(code: ErrorCode, body: Any, **headers: str) -> None:
            resp = await http.post("/v1/chat/completions", json=body, headers=headers)
            c.error(code, "createChatCompletion", resp, body)

        await chat(ErrorCode.INVALID_REQUEST, {"model": "sim-fast", "messages": "hi"})
        resp = await http.post(
            "/v1/chat/completions",
            content=b'{"model": "sim-fast", "messages": [',
            headers={"content-type": JSON},
        )
        c.error(ErrorCode.INVALID_JSON, "createChatCompletion", resp)
        resp = await http.post(
            "/v1/chat/completions", content=b"hello", headers={"content-type": "text/plain"}
        )
        c.error(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "createChatCompletion", resp)
        resp = await http.post(
            "/v1/chat/completions",
            content=b"[" + b"0," * (5 * 1024 * 1024 + 8) + b"0]",
            headers={"content-type": JSON},
        )
        c.error(ErrorCode.PAYLOAD_TOO_LARGE, "createChatCompletion", resp)
        await chat(ErrorCode.MODEL_NOT_FOUND, {**CHAT, "model": "no-such-model"})
        await chat(ErrorCode.CONTEXT_LENGTH_EXCEEDED, {**CHAT, "sim": {"fault": "context_length"}})
        await chat(
            ErrorCode.INSUFFICIENT_CONFIDENCE,
            {**CHAT, "sim": {"logprob": -0.05}},
            **{"x-sluice-min-confidence": "0.99"},
        )
        card = {**CHAT, "messages": [{"role": "user", "content": "My card is 4111 1111 1111 1111"}]}
        await chat(ErrorCode.CONTENT_FILTER_TRIGGERED, card)
        image = {
            "model": "qwen2.5-coder-0.5b",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    ],
                }
            ],
        }
        await chat(ErrorCode.UNSUPPORTED_CONTENT, image)
        await chat(ErrorCode.UNSUPPORTED_API_VERSION, CHAT, **{"sluice-version": "2019-01-01"})

        resp = await http.get("/v1/jobs/job_0000000000000000")
        c.error(ErrorCode.NOT_FOUND, "getJob", resp)
        resp = await http.delete("/v1/models")
        c.error(ErrorCode.METHOD_NOT_ALLOWED, "listModels", resp)
        resp = await http.get("/v1/usage", params={"team_id": "acme"})
        c.error(ErrorCode.FORBIDDEN, "getUsage", resp)

        key = str(uuid.uuid4())
        slow = {**CHAT, "sim": {"ttft_ms": 3000}}
        first = asyncio.create_task(
            http.post("/v1/chat/completions", json=slow, headers={"idempotency-key": key})
        )
        await asyncio.sleep(1.0)
        resp = await http.post("/v1/chat/completions", json=slow, headers={"idempotency-key": key})
        c.error(ErrorCode.IDEMPOTENCY_KEY_IN_USE, "createChatCompletion", resp, slow)
        await first
        resp = await http.post("/v1/chat/completions", json=CHAT, headers={"idempotency-key": key})
        c.error(ErrorCode.IDEMPOTENCY_KEY_REUSED, "createChatCompletion", resp, CHAT)

        cut = {**CHAT, "stream": True, "sim": {"fault": "cut", "cut_after": 3}}
        resp = await http.post("/v1/chat/completions", json=cut)
        data = resp.text.split("event: error\n", 1)[1].split("data: ", 1)[1].split("\n", 1)[0]
        event = json.loads(data)
        c.error_value(
            ErrorCode.UPSTREAM_STREAM_INTERRUPTED,
            "createChatCompletion",
            int(event.get("status", 502)),
            event,
        )

    async with c.client(None) as anon:
        resp = await anon.post("/v1/chat/completions", json=CHAT)
        c.error(ErrorCode.UNAUTHORIZED, "createChatCompletion", resp, CHAT)
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
    async with c.client(token) as jwt:
        resp = await jwt.post("/v1/chat/completions", json=CHAT)
        c.error(ErrorCode.INVALID_TOKEN, "createChatCompletion", resp, CHAT)

    chat_only = await key_for(c, team_id="acme", scopes=["chat"])
    async with c.client(chat_only) as http:
        resp = await http.post("/v1/jobs", json={"request": CHAT})
        c.error(ErrorCode.INSUFFICIENT_SCOPE, "createJob", resp, {"request": CHAT})
    allow = await key_for(c, team_id="acme", scopes=["chat"], model_allow=["gpt-4o*"])
    async with c.client(allow) as http:
        resp = await http.post("/v1/chat/completions", json=CHAT)
        c.error(ErrorCode.MODEL_NOT_ALLOWED, "createChatCompletion", resp, CHAT)
    expiring = await key_for(c, team_id="acme", scopes=["chat"], expires_in_seconds=1)
    await asyncio.sleep(2.2)
    async with c.client(expiring) as http:
        resp = await http.post("/v1/chat/completions", json=CHAT)
        c.error(ErrorCode.KEY_EXPIRED, "createChatCompletion", resp, CHAT)
    limited = await key_for(c, team_id="acme", scopes=["chat"], limits={"requests_per_minute": 1})
    async with c.client(limited) as http:
        await http.post("/v1/chat/completions", json=CHAT)
        resp = await http.post("/v1/chat/completions", json=CHAT)
        c.error(ErrorCode.RATE_LIMITED, "createChatCompletion", resp, CHAT)

    async with c.client(c.admin_key) as ops:
        team = {"team_id": "frugal", "budgets": {"usd_per_day": "0.00001"}}
        if (await ops.post("/v1/admin/teams/", json=team)).status_code != 201:
            raise SystemExit("team frugal")
    frugal = await key_for(c, team_id="frugal", scopes=["chat"])
    async with c.client(frugal) as http:
        for _ in range(20):
            resp = await http.post("/v1/chat/completions", json=CHAT)
            if resp.status_code == 429:
                break
        c.error(ErrorCode.BUDGET_EXCEEDED, "createChatCompletion", resp, CHAT)

    # Last: failing calls count against the deployment's breaker.
    async with c.client() as http:
        for code, fault in (
            (ErrorCode.UPSTREAM_RATE_LIMITED, "429"),
            (ErrorCode.UPSTREAM_ERROR, "500"),
            (ErrorCode.UPSTREAM_UNAVAILABLE, "503"),
        ):
            body = {**CHAT, "sim": {"fault": fault}}
            resp = await http.post("/v1/chat/completions", json=body)
            c.error(code, "createChatCompletion", resp, body)


async def capture(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="sluice-examples-") as root:
        async with full_stack(
            Path(root),
            gateway_env={"SLUICE_GATEWAY_SSE_HEARTBEAT_SECONDS": "30"},
        ) as stack:
            admin_key = (stack.stack.state_dir / "admin-key").read_text().strip()
            c = Capture(stack, admin_key)
            await operations(c)
            await errors(c)
    missing = {str(code) for code in ErrorCode} - set(c.errors) - {str(k) for k in NOT_CAPTURED}
    if missing:
        raise SystemExit(f"no example for {sorted(missing)}")
    document = {
        "captured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "operations": dict(sorted(c.operations.items())),
        "errors": dict(sorted(c.errors.items())),
        "not_captured": {str(k): v for k, v in sorted(NOT_CAPTURED.items())},
    }
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    await asyncio.to_thread(out.write_text, text, encoding="utf-8")
    sys.stdout.write(
        f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}: "
        f"{sum(map(len, c.operations.values()))} operation examples, {len(c.errors)} errors\n"
    )


if __name__ == "__main__":
    asyncio.run(capture(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
