"""The catalogue's routes: the shipped file, the older one-deployment form, and errors
that name the file and the line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from sluice.catalog import Catalog, CatalogError, parse_catalog

from tests.support.stack import REPO

BASE = """\
providers:
  sim:
    kind: openai
    base_url: http://127.0.0.1:1/v1
models:
"""


def test_shipped_catalogue_gives_the_local_model_a_chain() -> None:
    catalog = Catalog.load(REPO / "config" / "providers.yaml")
    route = catalog.models["qwen2.5-coder-0.5b"]
    chain = [d for _, step in catalog.chain(route) for d in step.deployments]
    providers = [d.provider for d in chain]
    # Two local deployments (the same server, other settings), then the simulator.
    assert providers[:2] == ["local-llama", "local-llama"] and providers[-1] == "simulator"
    assert len({d.name for d in chain}) == len(chain)
    assert chain[0].params_json != chain[1].params_json
    assert route.deadline_seconds is not None and route.last_resort is not None


def test_older_form_is_a_one_deployment_route_named_after_the_model() -> None:
    catalog = parse_catalog(
        BASE
        + """\
  a:
    provider: sim
    upstream_model: up-a
    fallbacks: [b]
  b:
    provider: sim
    upstream_model: up-b
"""
    )
    a = catalog.models["a"]
    assert a.provider == "sim" and a.upstream_model == "up-a"
    assert [(served, [d.name for d in step.deployments]) for served, step in catalog.chain(a)] == [
        ("a", ["a"]),
        ("b", ["b"]),
    ]


def test_chain_steps_weights_bounds_budget_lifecycle() -> None:
    catalog = parse_catalog(
        BASE
        + """\
  r:
    deadline_seconds: 20
    retry_budget: {seconds: 5, usd: 0.002}
    last_resort: {template: "busy", retry_after_seconds: 7}
    deprecated_at: 2026-01-01T00:00:00Z
    sunset_at: 2030-01-01
    replacement: s
    chain:
      - balance: latency
        deployments:
          - {name: one, provider: sim, upstream_model: m1, weight: 3, ttft_timeout_seconds: 1.5}
          - {name: two, provider: sim, upstream_model: m2, timeout_seconds: 9, attempts: 1}
      - {name: three, provider: sim, upstream_model: m3, params: {top_k: 1}}
  s:
    provider: sim
    upstream_model: m4
rules:
  - name: big
    models: [r]
    when: {min_input_tokens: 1000, tools: true, tiers: [pro], hint: long}
    route: s
"""
    )
    r = catalog.models["r"]
    assert r.deadline_seconds == 20 and r.retry_budget_seconds == 5
    assert r.retry_budget_usd == Decimal("0.002")
    assert r.last_resort is not None and r.last_resort.template == "busy"
    assert r.lifecycle.sunset_at == datetime(2030, 1, 1, tzinfo=UTC)
    first, second = r.steps
    assert first.balance == "latency" and [d.weight for d in first.deployments] == [3.0, 1.0]
    assert first.deployments[0].ttft_timeout_seconds == 1.5
    assert first.deployments[1].attempts == 1
    assert second.deployments[0].params_json == '{"top_k": 1}'
    [rule] = catalog.rules
    assert rule.tools is True and rule.tiers == ("pro",) and rule.min_input_tokens == 1000
    # A deployment may be asked for by name: an exact pin, one deployment, no chain.
    pin = catalog.model("two")
    assert pin is not None and pin.pinned and [d.name for d in pin.deployments()] == ["two"]
    assert catalog.chain(pin)[0][0] == "r"


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ("  r:\n    provider: nope\n    upstream_model: x\n", 7, "unknown provider 'nope'"),
        ("  r:\n    chain:\n      - {provider: sim, upstream_model: x}\n", 8, "'name' is missing"),
        (
            "  r:\n    chain:\n      - {name: a, provider: sim, upstream_model: x, weight: -1}\n",
            8,
            "weight must be above 0",
        ),
        ("  r:\n    provider: sim\n    upstream_model: x\n    deadline: 3\n", 9, "unknown key"),
        (
            "  r:\n    provider: sim\n    upstream_model: x\n    sunset_at: soon\n",
            9,
            "ISO 8601",
        ),
        (
            "  r:\n    provider: sim\n    upstream_model: x\n    fallbacks: [ghost]\n",
            9,
            "unknown model 'ghost'",
        ),
        (
            "  r:\n    provider: sim\n    upstream_model: x\nrules:\n  - {name: a, route: ghost}\n",
            10,
            "unknown model 'ghost'",
        ),
        (
            "  r:\n    chain:\n      - balance: fastest\n"
            "        deployments: [{name: a, provider: sim, upstream_model: x}]\n",
            8,
            "balance must be one of",
        ),
    ],
)
def test_mistakes_name_the_file_and_line(body: str, line: int, words: str) -> None:
    with pytest.raises(CatalogError) as err:
        parse_catalog(BASE + body, "providers.yaml")
    message = str(err.value)
    assert message.startswith(f"providers.yaml:{line}: "), message
    assert words in message


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"providers\.yaml: cannot read it"):
        Catalog.load(tmp_path / "providers.yaml")


def test_a_service_started_on_a_bad_catalogue_names_the_line_and_stops(tmp_path: Path) -> None:
    shutil.copytree(REPO / "config", tmp_path, dirs_exist_ok=True)
    text = (tmp_path / "providers.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    line = next(i for i, x in enumerate(lines) if x.strip().startswith("ttft_timeout_seconds:"))
    lines[line] = lines[line].split(":")[0] + ": soon"
    (tmp_path / "providers.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {
        **os.environ,
        "SLUICE_CONFIG_DIR": str(tmp_path),
        "SLUICE_STATE_DIR": str(tmp_path / "state"),
        "SLUICE_NATS_URL": "nats://127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.inference_worker"],
        check=False,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"providers.yaml:{line + 1}: " in done.stderr
    assert "ttft_timeout_seconds must be a number" in done.stderr
    assert "Traceback" not in done.stderr
