"""The AsyncAPI document of the published events (sluice.events): current in the
repository, complete, and describing what the services really put on the wire."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import orjson
import pytest
from google.protobuf import json_format
from sluice import events
from sluice.common.v1 import chat_pb2
from sluice.cost.v1 import cost_pb2
from sluice.inference.v1 import inference_pb2, lifecycle_pb2
from sluice.topology import ServiceName, Subjects

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "docs" / "asyncapi.json"


def test_the_committed_document_is_current() -> None:
    assert COMMITTED.read_bytes() == events.asyncapi_json() + b"\n", (
        "docs/asyncapi.json is stale: run `make asyncapi` and commit it"
    )


def test_every_event_is_a_channel_with_its_subject_parameters_and_guarantee() -> None:
    document = orjson.loads(events.asyncapi_json())
    assert document["asyncapi"] == "3.0.0"
    assert document["defaultContentType"] == "application/x-protobuf"
    assert set(document["channels"]) == {event.name for event in events.EVENTS}
    for event in events.EVENTS:
        channel = document["channels"][event.name]
        assert channel["address"] == event.subject
        # Every parameter in the address is declared, and only those.
        assert set(channel["parameters"]) == set(re.findall(r"\{(\w+)\}", channel["address"]))
        assert f"Published by the {event.publisher}" in channel["description"]
        assert "Delivery: at " in channel["description"]
        assert document["operations"][event.name]["action"] == "send"
    assert document["channels"]["usage"]["address"] == Subjects.usage("{key_id}")
    assert "SLUICE_USAGE" in document["channels"]["usage"]["description"]
    assert "Core NATS only" in document["channels"]["cost.recorded"]["description"]


def payload_schema(document, name: str):
    return document["components"]["schemas"][f"{name}:Message:Payload"]


EXAMPLES = {
    "cost.recorded": cost_pb2.CostEvent(
        request_id="req_1",
        key_id="key_1",
        team_id="team_1",
        model="qwen2.5-coder-0.5b",
        provider="llamacpp",
        usage=chat_pb2.Usage(input_tokens=12, output_tokens=30),
        input_cost_usd=0.000012,
        output_cost_usd=0.00006,
        total_cost_usd=0.000072,
        price_version="2026-01",
        occurred_unix_nanos=1_790_000_000_000_000_000,
        cache_hit=False,
        outcome="completed",
    ),
    "usage": cost_pb2.UsageEvent(
        request_id="req_1",
        key_id="key_1",
        model_served="qwen2.5-coder-0.5b",
        usage=chat_pb2.Usage(input_tokens=12, output_tokens=30, cached_input_tokens=4),
        outcome="completed",
        trace_id="0af7651916cd43dd8448eb211c80319c",
    ),
    "lifecycle": lifecycle_pb2.LifecycleEvent(
        request_id="job_1",
        at_unix_nanos=1,
        finished=lifecycle_pb2.Finished(
            outcome="failed",
            attempt=2,
            failure=inference_pb2.Failure(
                problem=chat_pb2.Problem(code="upstream_error", details={"cause": "x"}),
                partial_usage=chat_pb2.Usage(output_tokens=3),
            ),
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_payload_schema_accepts_the_json_mapping_of_a_real_event(name: str) -> None:
    document = orjson.loads(events.asyncapi_json())
    schema = payload_schema(document, name)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.Draft202012Validator(schema).validate(json_format.MessageToDict(EXAMPLES[name]))


def test_both_bodies_of_a_lifecycle_event_at_once_are_refused() -> None:
    schema = payload_schema(orjson.loads(events.asyncapi_json()), "lifecycle")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate({"started": {}, "finished": {}})


def test_a_new_event_slots_in_as_one_more_declaration() -> None:
    budget_alert = events.EventSpec(
        name="budget.alert",
        subject=f"{Subjects.cost_recorded('{key_id}')}.budget",
        payload=chat_pb2.Problem,
        publisher=ServiceName.COST_TRACKER,
        when="when a key crosses a share of its budget.",
        delivery="at most once.",
        parameters=(events.KEY_ID,),
    )
    document = events.asyncapi_document((*events.EVENTS, budget_alert))
    assert document["channels"]["budget.alert"]["address"].endswith(".budget")
    assert "budget.alert:Message:Payload" in document["components"]["schemas"]
    assert set(document["channels"]) == {e.name for e in events.EVENTS} | {"budget.alert"}
