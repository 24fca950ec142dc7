"""The floor section (bench/floor.py) at a tiny size: every pipeline starts as its
processes, answers every request through them, and the JetStream pipelines deliver one
usage event per answer to each consumer. No timing is asserted."""

from __future__ import annotations

import pytest

from bench import floor


@pytest.mark.slow
async def test_every_pipeline_answers_through_its_processes_and_settles_its_usage() -> None:
    rounds = await floor.measure_floor(rounds=1, rate=5, seconds=0.5, in_flight=2, warmup=3)
    (runs,) = rounds
    assert [r.pipeline for r in runs] == [p.name for p in floor.PIPELINES]
    for pipeline, run in zip(floor.PIPELINES, runs, strict=True):
        assert run.sent > 3 and run.ok == run.sent, run
        processes = {name for name, _ in pipeline.parts} | ({"nats"} if pipeline.nats else set())
        assert set(run.cpu_open) == set(run.cpu_closed) == processes
        if pipeline.usage_consumers:
            # One usage event per answer (deduplicated by request id), acked by each.
            assert run.usage_stored == run.ok
            assert run.usage_acked == dict.fromkeys(
                floor.USAGE_DURABLES[: pipeline.usage_consumers], run.ok
            )
        else:
            assert run.usage_stored == 0 and run.usage_acked == {}
    text = floor.floor_report(rounds, rate=5, in_flight=2)
    for pipeline in floor.PIPELINES:
        assert pipeline.name in text
    assert "CPU ms per request, by process" in text


async def test_a_pipeline_refuses_a_request_without_its_key() -> None:
    import aiohttp

    with floor.simulator() as upstream:
        async with (
            floor.started(floor.PIPELINES[0], upstream) as pipe,
            aiohttp.ClientSession() as session,
        ):
            for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
                async with session.post(pipe.url, data=b"{}", headers=headers) as resp:
                    assert resp.status == 401
