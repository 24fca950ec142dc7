"""The Anthropic Messages API through every real service process, with the official
``anthropic`` SDK against the simulated provider: a message, a stream, the trace and
cost they leave, and the errors the SDK raises."""

from __future__ import annotations

import secrets

import anthropic
import pytest

from tests.e2e.conftest import DEV_KEY, RunningStack
from tests.e2e.test_end_to_end import wait_for_trace

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def client(e2e: RunningStack, api_key: str = DEV_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=e2e.gateway_url, api_key=api_key, max_retries=0)


async def test_anthropic_sdk_message_stream_and_errors(e2e: RunningStack) -> None:
    sdk = client(e2e)
    raw = await sdk.messages.with_raw_response.create(
        model="sim-fast",
        max_tokens=16,
        system="You answer briefly.",
        messages=[{"role": "user", "content": f"Say hello {secrets.token_hex(4)}."}],
        # Deterministic, so the exact cache takes part in the request too.
        extra_body={"temperature": 0},
    )
    message = await raw.parse()
    assert message.type == "message" and message.model == "sim-fast"
    assert message.content and message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in {"end_turn", "max_tokens"}
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message._request_id == raw.headers["x-request-id"]
    # The SDK sends a traceparent of its own when the process has an OpenTelemetry
    # tracer, so the trace is the one the gateway names.
    trace_id = raw.headers["traceparent"].split("-")[1]
    assert raw.headers["x-sluice-cache"] == "miss"
    assert int(raw.headers["anthropic-ratelimit-tokens-remaining"]) >= 0
    sluice = (message.model_extra or {})["sluice"]
    assert (sluice["model_served"], sluice["provider"]) == ("sim-fast", "simulator")
    assert sluice["usage"]["output_tokens"] == message.usage.output_tokens
    assert sluice["cost_usd"] > 0 and sluice["trace_id"] == trace_id
    spans = await wait_for_trace(
        e2e.state_dir, trace_id, {"gateway", "cache", "inference-worker", "cost-tracker"}
    )
    assert {"gateway", "cache", "inference-worker", "cost-tracker"} <= {s["service"] for s in spans}

    async with sdk.messages.stream(
        model="sim-fast",
        max_tokens=20,
        messages=[{"role": "user", "content": "Count to ten."}],
        extra_body={"temperature": 0.7},
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason in {"end_turn", "max_tokens"}
    assert final.usage.output_tokens > 0

    events = await sdk.messages.create(
        model="sim-fast",
        max_tokens=8,
        messages=[{"role": "user", "content": "Stream raw events."}],
        stream=True,
    )
    types = [event.type async for event in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in types

    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        await client(e2e, api_key="sk-not-a-key").messages.create(
            model="sim-fast", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert bad_key.value.type == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await sdk.messages.create(
            model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}]
        )
    assert unknown.value.type == "not_found_error"
    assert unknown.value.request_id and unknown.value.request_id.startswith("req_")
