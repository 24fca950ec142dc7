"""Tenancy's domain without any transport: tiers, the levels of a request, scopes and
key states, JWT claims, and which reservations may use an admission lease."""

from __future__ import annotations

from pathlib import Path

import pytest
from sluice.errors import ErrorCode, SluiceError
from sluice.keys.v1 import keys_pb2
from sluice.limiter.v1 import limiter_pb2
from sluice.tenancy.v1 import tenancy_pb2
from sluice.topology import PriorityClass

from services.gateway.domain.leases import lease_key, lease_terms
from services.gateway.domain.tenancy.identity import ClaimsMapping, caller_from_claims
from services.gateway.domain.tenancy.limits import usd_to_nanos
from services.gateway.domain.tenancy.policy import (
    Scope,
    check_model_allowed,
    check_usable,
    entitlements,
    require_scope,
)
from services.gateway.domain.tenancy.tiers import TierFileError, TierTable, parse_tiers

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_tiers_file_loads() -> None:
    table = TierTable.load(REPO / "config" / "tiers.yaml")
    assert table.default in table.tiers
    assert table.tiers["free"].priorities == {PriorityClass.INTERACTIVE}


def test_no_tiers_file_is_no_tiers(tmp_path: Path) -> None:
    # A configuration folder made before tiers existed still starts a gateway.
    assert TierTable.load(tmp_path / "tiers.yaml").tiers == {}


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("tiers:\n  a:\n    team:\n      budgets:\n        usd_per_day: -1\n", 5, "below zero"),
        ("tiers:\n  a:\n    teem: {}\n", 3, "unknown key 'teem'"),
        ("tiers:\n  a:\n    priorities: [fast]\n", 3, "unknown priority class 'fast'"),
        (
            "tiers:\n  a:\n    team:\n      limits:\n        requests_per_minute: many\n",
            5,
            "whole number",
        ),
        ("default_tier: gold\ntiers:\n  a: {}\n", 1, "not one of the tiers"),
        ("tiers:\n  a: [\n", 3, "not valid YAML"),
    ],
)
def test_a_bad_tiers_file_names_its_line(text: str, line: int, words: str) -> None:
    with pytest.raises(TierFileError) as err:
        parse_tiers(text, "tiers.yaml")
    assert f"tiers.yaml:{line}:" in str(err.value)
    assert words in str(err.value)


def test_budgets_are_exact_nanos_and_never_negative() -> None:
    assert usd_to_nanos("0.000000001") == 1
    assert usd_to_nanos(12.5) == 12_500_000_000
    for bad in (-1, "1e-10", "lots", True):
        with pytest.raises(ValueError):
            usd_to_nanos(bad)


TIERS = parse_tiers(
    "tiers:\n"
    "  std:\n"
    "    priorities: [interactive]\n"
    "    team:\n"
    "      limits: {requests_per_minute: 600, concurrent_requests: 8}\n"
    "      budgets: {usd_per_month: 100}\n"
    "    end_user:\n"
    "      limits: {requests_per_minute: 10}\n"
)


def test_levels_key_over_team_over_tier_and_the_end_user_from_the_team() -> None:
    team = tenancy_pb2.Team(
        team_id="acme",
        tier="std",
        limits=tenancy_pb2.Limits(requests_per_minute=300),
        end_user_budgets=tenancy_pb2.Budgets(usd_nanos_per_day=5),
    )
    key = keys_pb2.ApiKeyRecord(
        key_id="k", team_id="acme", limits=tenancy_pb2.Limits(concurrent_requests=2)
    )
    found = entitlements(
        key, team, TIERS.get("std"), end_user="u1", priority=PriorityClass.INTERACTIVE
    )
    assert found.team.limits.requests_per_minute == 300  # the team's own
    assert found.team.limits.concurrent_requests == 8  # the tier's
    assert found.team.budgets.usd_nanos_per_month == 100_000_000_000
    assert found.key.limits.concurrent_requests == 2  # the key's own
    assert found.key.limits.requests_per_minute == 300  # its team's
    assert found.end_user.limits.requests_per_minute == 10
    assert found.end_user.budgets.usd_nanos_per_day == 5
    reserve = limiter_pb2.ReserveRequest()
    found.fill(reserve)
    assert reserve.end_user == "u1" and reserve.priority == "interactive"
    assert reserve.team_limits.requests_per_minute == 300
    assert reserve.end_user_limits.requests_per_minute == 10
    # A lease granted under these levels ends when any of them changes.
    changed = limiter_pb2.ReserveRequest()
    changed.CopyFrom(reserve)
    assert lease_terms(changed) == lease_terms(reserve)
    changed.team_budgets.usd_nanos_per_day += 1
    assert lease_terms(changed) != lease_terms(reserve)


def test_no_end_user_no_end_user_level_and_a_tier_refuses_other_classes() -> None:
    team = tenancy_pb2.Team(team_id="acme", tier="std")
    key = keys_pb2.ApiKeyRecord(key_id="k", team_id="acme")
    found = entitlements(
        key, team, TIERS.get("std"), end_user="", priority=PriorityClass.INTERACTIVE
    )
    assert not found.end_user.any
    with pytest.raises(SluiceError) as err:
        entitlements(key, team, TIERS.get("std"), end_user="", priority=PriorityClass.BATCH)
    assert err.value.code is ErrorCode.FORBIDDEN and "batch" in err.value.detail
    team.disabled = True
    with pytest.raises(SluiceError):
        entitlements(key, team, TIERS.get("std"), end_user="", priority=PriorityClass.INTERACTIVE)


def test_leases_are_per_user_model_and_priority_class() -> None:
    key = keys_pb2.ApiKeyRecord(key_id="dev", team_id="dev", scopes=["*"])
    found = entitlements(key, None, None, end_user="u", priority=PriorityClass.INTERACTIVE)
    reserve = limiter_pb2.ReserveRequest(key_id="dev", team_id="dev", model="m")
    found.fill(reserve)
    for change in ("end_user", "model", "priority"):
        other = limiter_pb2.ReserveRequest()
        other.CopyFrom(reserve)
        setattr(other, change, "something else")
        assert lease_key(reserve) != lease_key(other), change


def test_scopes_models_and_key_states() -> None:
    key = keys_pb2.ApiKeyRecord(key_id="k", scopes=["chat"], model_allow=["qwen*"])
    require_scope(key, Scope.CHAT)
    with pytest.raises(SluiceError) as err:
        require_scope(key, Scope.JOBS)
    assert err.value.code is ErrorCode.INSUFFICIENT_SCOPE and err.value.details["scope"] == "jobs"
    require_scope(keys_pb2.ApiKeyRecord(scopes=["*"]), Scope.ADMIN)
    check_model_allowed(key, "qwen2.5-coder-0.5b")
    with pytest.raises(SluiceError) as err:
        check_model_allowed(key, "gpt-4o-mini")
    assert err.value.code is ErrorCode.MODEL_NOT_ALLOWED and "gpt-4o-mini" in err.value.detail

    check_usable(keys_pb2.ApiKeyRecord(expires_unix=200), 100)
    with pytest.raises(SluiceError) as err:
        check_usable(keys_pb2.ApiKeyRecord(expires_unix=200), 200)
    assert err.value.code is ErrorCode.KEY_EXPIRED and "expired" in err.value.detail
    rotated = keys_pb2.ApiKeyRecord(replaced_by="key_new", grace_until_unix=150)
    check_usable(rotated, 149)
    with pytest.raises(SluiceError) as err:
        check_usable(rotated, 150)
    assert "rotated" in err.value.detail
    with pytest.raises(SluiceError) as err:
        check_usable(keys_pb2.ApiKeyRecord(revoked_unix=1, disabled=True), 100)
    assert err.value.code is ErrorCode.UNAUTHORIZED and "revoked" in err.value.detail


MAPPING = ClaimsMapping(
    name="okta", issuer="https://idp.example", team_claim="org.team", scopes_claim="scp"
)


def test_claims_map_to_team_scopes_and_end_user() -> None:
    caller = caller_from_claims(
        MAPPING, {"sub": "alice", "org": {"team": "acme"}, "scp": ["chat", "*", "made-up"]}
    )
    assert caller.key.team_id == "acme"
    assert list(caller.key.scopes) == ["chat"]  # "*" and unknown scopes are never taken
    assert caller.end_user == "alice"
    assert caller.actor == "jwt:https://idp.example:alice"
    assert caller.key.key_id == "jwt-okta"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"sub": "a"}, "missing_team_claim"),
        ({"org": {"team": "acme"}}, "missing_subject"),
        ({"sub": "a", "org": {"team": "admin"}}, "reserved_team"),
    ],
)
def test_claims_without_what_is_needed_are_refused(claims: dict[str, object], reason: str) -> None:
    with pytest.raises(SluiceError) as err:
        caller_from_claims(MAPPING, claims)
    assert err.value.code is ErrorCode.INVALID_TOKEN and err.value.details["reason"] == reason
