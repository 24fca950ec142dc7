"""The input guard: its rules (checked at start, naming the rule at fault), the
detectors, redaction and blocking in both dialects and for jobs, and images sent to a
text-only model; errors never echo what matched."""

from __future__ import annotations

import asyncio

import pytest
from sluice.catalog import ModelConfig
from sluice.common.v1 import chat_pb2
from sluice.errors import SluiceError

from services.gateway.adapters.guard_rules import load_guard
from services.gateway.domain.guard import (
    DETECTORS,
    Guard,
    card_scheme_allows,
    luhn_valid,
    parse_rules,
)
from tests.gateway.harness import REPO, Gateway
from tests.tenancy.test_http import admin, as_key, make_key, make_team

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
CARD = "4111 1111 1111 1111"  # a test Visa number: passes Luhn
SECRET_MAIL = "jane.doe@example.com"


def guard(*rules: dict[str, object]) -> Guard:
    return Guard(parse_rules({"rules": list(rules)}, "guard.yaml"))


def request(*texts: str) -> chat_pb2.ChatRequest:
    req = chat_pb2.ChatRequest(model="m")
    for text in texts:
        req.messages.append(chat_pb2.Message(role="user", text=text))
    return req


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")


def test_detectors_redact_in_place():
    g = guard(
        {"name": "email", "detector": "email", "action": "redact"},
        {"name": "card", "detector": "card_number", "action": "redact"},
    )
    req = request(f"mail {SECRET_MAIL} or a@b.io", f"card {CARD}, order 1234 5678 9012 3456")
    req.messages.append(
        chat_pb2.Message(
            role="assistant",
            tool_calls=[chat_pb2.ToolCall(name="f", arguments='{"to": "x@y.org"}')],
        )
    )
    req.messages.append(
        chat_pb2.Message(role="user", parts=[chat_pb2.ContentPart(type="text", text=SECRET_MAIL)])
    )
    done = g.inspect(req, None)
    assert done.redacted == ("email", "card")
    assert req.messages[0].text == "mail [REDACTED:email] or [REDACTED:email]"
    # A number that fails the Luhn check is not a card.
    assert req.messages[1].text == "card [REDACTED:card], order 1234 5678 9012 3456"
    assert req.messages[2].tool_calls[0].arguments == '{"to": "[REDACTED:email]"}'
    assert req.messages[3].parts[0].text == "[REDACTED:email]"


def test_block_names_the_rule_and_where_never_the_match():
    g = guard({"name": "secret_word", "pattern": r"swordfish\d+", "action": "block"})
    with pytest.raises(SluiceError) as caught:
        g.inspect(request("fine", "the code is SwordFish42"), None)
    err = caught.value
    assert err.code == "content_filter_triggered"
    assert err.status == 400
    assert err.details == {"rule": "secret_word", "location": "messages.1.content"}
    assert "SwordFish42" not in str(err)
    # Case-sensitive when asked.
    strict = guard({"name": "s", "pattern": "swordfish", "action": "block", "case_sensitive": True})
    assert strict.inspect(request("SWORDFISH"), None).redacted == ()


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"name": "a", "action": "block"}], "rules.0: Value error, give exactly one"),
        (
            [{"name": "a", "pattern": "(", "action": "block"}],
            "rules.0: Value error, pattern is not a valid regular expression",
        ),
        ([{"name": "a", "detector": "ssn", "action": "block"}], "rules.0: Value error, detector"),
        ([{"name": "a", "pattern": "x", "action": "warn"}], "rules.0.action"),
        ([{"name": "Bad Name", "pattern": "x", "action": "block"}], "rules.0.name"),
        (
            [
                {"name": "a", "pattern": "x", "action": "block"},
                {"name": "a", "pattern": "y", "action": "block"},
            ],
            "rule names must be unique: a",
        ),
    ],
)
def test_bad_rules_are_refused_naming_the_rule(rules, message):
    with pytest.raises(ValueError, match=r"^guard\.yaml: ") as caught:
        parse_rules({"rules": rules}, "guard.yaml")
    assert message in str(caught.value)


def test_the_shipped_rules_load():
    shipped = load_guard(None, REPO / "config")
    assert {r.name for r in shipped.rules} == {"card_number", "private_key", "email"}
    with pytest.raises(SluiceError, match="card_number"):
        shipped.inspect(request(f"pay with {CARD}"), None)


def test_an_image_for_a_text_only_model():
    text_only = ModelConfig(name="tiny", provider="p", upstream_model="t", input=("text",))
    req = chat_pb2.ChatRequest(model="tiny")
    req.messages.append(
        chat_pb2.Message(
            role="user",
            parts=[
                chat_pb2.ContentPart(type="text", text="what is this?"),
                chat_pb2.ContentPart(type="image_url", image_url="https://x.test/a.png"),
            ],
        )
    )
    with pytest.raises(SluiceError) as caught:
        Guard().inspect(req, text_only)
    err = caught.value
    assert err.code == "unsupported_content"
    assert err.param == "messages.0.content.1"
    assert "text only" in str(err)
    undeclared = ModelConfig(name="any", provider="p", upstream_model="a")
    assert Guard().inspect(req, undeclared).redacted == ()


# --- over HTTP (the shipped config/guard.yaml) ------------------------------------------


async def test_redaction_reaches_the_provider_and_is_announced(gw: Gateway):
    async with gw.authed() as http:
        resp = await http.post(
            CHAT,
            json={
                "model": "sim-fast",
                "messages": [{"role": "user", "content": f"write to {SECRET_MAIL}"}],
            },
        )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-sluice-guard"] == "redacted=email"
    sent = gw.fake.work[-1].request.messages[0].text
    assert sent == "write to [REDACTED:email]"


@pytest.mark.parametrize("path", [CHAT, MESSAGES, "/v1/jobs"])
async def test_a_card_number_is_blocked_on_every_door(gw: Gateway, path: str):
    chat = {
        "model": "sim-fast",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": f"charge {CARD} please"}],
    }
    body = {"request": chat} if path == "/v1/jobs" else chat
    async with gw.authed() as http:
        resp = await http.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert CARD not in resp.text and "4111" not in resp.text
    data = resp.json()
    assert data["code"] == "content_filter_triggered"
    assert data["details"]["rule"] == "card_number"
    if path == MESSAGES:
        assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    else:
        assert data["error"]["param"].startswith("messages.0.content")
    # Refused before anything cost: no reservation, no work.
    assert not gw.fake.reserves and not gw.fake.work


async def test_an_image_to_the_text_only_local_model_is_400(gw: Gateway):
    image = "data:image/png;base64,iVBORw0KGgo="
    async with gw.authed() as http:
        openai_resp = await http.post(
            CHAT,
            json={
                "model": "qwen2.5-coder-0.5b",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is it?"},
                            {"type": "image_url", "image_url": {"url": image}},
                        ],
                    }
                ],
            },
        )
        anthropic_resp = await http.post(
            MESSAGES,
            json={
                "model": "qwen2.5-coder-0.5b",
                "max_tokens": 8,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "iVBORw0KGgo=",
                                },
                            }
                        ],
                    }
                ],
            },
        )
    assert openai_resp.status_code == 400
    problem = openai_resp.json()
    assert problem["code"] == "unsupported_content"
    assert "qwen2.5-coder-0.5b" in problem["detail"] and "text only" in problem["detail"]
    assert anthropic_resp.status_code == 400
    assert anthropic_resp.json()["code"] == "unsupported_content"
    assert not gw.fake.work


def test_scrub_applies_every_rule():
    g = guard(
        {"name": "email", "detector": "email", "action": "redact"},
        {"name": "card", "detector": "card_number", "action": "block"},
    )
    raw = f'{{"content": "{SECRET_MAIL} pays with {CARD}"}}'
    assert g.scrub(raw) == '{"content": "[REDACTED:email] pays with [REDACTED:card]"}'


async def test_an_audited_prompt_keeps_nothing_the_guard_keeps_from_providers(gw, tmp_path):
    async with admin(gw, tmp_path) as ops:
        team = await make_team(ops)
        loud = await make_key(ops, team, audit_prompts=True)
        async with as_key(gw, loud["secret"]) as user:
            blocked = await user.post(
                CHAT,
                json={"model": "sim-fast", "messages": [{"role": "user", "content": CARD}]},
            )
            assert blocked.status_code == 400
            sent = await user.post(
                MESSAGES,
                json={
                    "model": "sim-fast",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": f"mail {SECRET_MAIL}"}],
                },
            )
            assert sent.status_code == 200
        await asyncio.sleep(0.2)  # the records are core publishes the stream stores
        records = (
            await ops.get(
                "/v1/admin/audit/", params={"key_id": loud["key_id"], "action": "request"}
            )
        ).json()["data"]
    prompts = [r["prompt"] for r in records]
    assert len(prompts) == 2
    assert all(CARD not in p and SECRET_MAIL not in p for p in prompts)
    assert "[REDACTED:card_number]" in prompts[0] and "[REDACTED:email]" in prompts[1]


def test_a_long_number_no_card_scheme_issues_is_not_a_card() -> None:
    cards = DETECTORS["card_number"]
    # Luhn-valid, but no scheme issues these prefixes and lengths: timestamps, ids.
    for number in ("8000000000000003", "1796419795000007", "99999999999999996"):
        assert luhn_valid(number) and not card_scheme_allows(number)
        assert list(cards(f"bench stream {number}: go")) == []
    # Test numbers of the schemes are cards.
    schemes = ("4111111111111111", "5500 0000 0000 0004", "378282246310005", "6011111111111117")
    for number in schemes:
        assert list(cards(f"pay with {number}")), number
