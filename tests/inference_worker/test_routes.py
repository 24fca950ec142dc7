"""Routes in the worker over the simulator: a slow deployment is cut at its bound and
the next one answers, latency opens its breaker, an interrupted stream marks its
deployment, the deadline's 504, the retry budget, and the last resort."""

from __future__ import annotations

from pathlib import Path

from sluice.bus import Bus

from services.inference_worker.domain.circuit import CircuitState
from tests.inference_worker.conftest import WorkerFactory, new_work, run, usage_events


async def test_slow_deployment_is_cut_at_its_bound_and_the_next_answers(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    worker = await make_worker(circuit_failure_threshold=2)
    for stream in (True, False):
        work = new_work(model="route-chain", stream=stream)
        # As the gateway sends it when a routing rule chose the route.
        work.route, work.route_rule = "route-chain", "a-rule"
        result = await run(bus, work)
        final = result.final
        assert (final.deployment, final.attempts, final.model_served) == ("rc-ok", 2, "route-chain")
        # Nothing of the slow deployment reached the stream; the first delta names who
        # answered.
        assert all(e.WhichOneof("body") != "failure" for e in result.events)
        if stream:
            assert result.deltas[0].deployment == "rc-ok"
            assert not any(d.deployment for d in result.deltas[1:])
        [usage] = await usage_events(bus, work.key_id)
        assert (usage.route, usage.route_rule) == ("route-chain", "a-rule")
        assert (usage.deployment, usage.attempts) == ("rc-ok", 2)
        assert usage.outcome == "completed"
    slow = worker.circuits.get("rc-slow")
    # Two attempts over the bound (the first token's, then the whole answer's): open.
    assert slow.current() is CircuitState.OPEN and slow.reason == "latency"
    assert slow.latency_failures_total == 2
    result = await run(bus, new_work(model="route-chain"))
    assert (result.final.deployment, result.final.attempts) == ("rc-ok", 1)


async def test_interrupted_stream_is_not_retried_and_marks_its_deployment(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    worker = await make_worker()
    result = await run(bus, new_work(model="route-cut", stream=True))
    assert result.deltas, "output reached the client before the cut"
    assert result.failure.problem.code == "upstream_stream_interrupted"
    breaker = worker.circuits.get("cut-first")
    assert breaker.avoided() and breaker.reason == "stream_interrupted"
    assert breaker.failures_total == 1
    # The next request avoids the deployment: the other one answers, first try.
    result = await run(bus, new_work(model="route-cut", stream=True))
    assert (result.final.deployment, result.final.attempts) == ("cut-spare", 1)


async def test_route_deadline_is_a_504_with_elapsed_and_deadline(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    await make_worker()
    for stream in (False, True):
        result = await run(bus, new_work(model="route-deadline", stream=stream))
        problem = result.failure.problem
        assert (problem.code, problem.http_status) == ("model_timeout", 504)
        assert problem.details["deadline_ms"] == "600"
        assert 600 <= int(problem.details["elapsed_ms"]) < 2000


async def test_retry_budget_in_seconds_stops_retries_and_fallbacks(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    await make_worker()
    result = await run(bus, new_work(model="route-budget"))
    problem = result.failure.problem
    assert problem.code == "upstream_unavailable"
    assert problem.details["cause"] == "retry_budget_exhausted"
    assert problem.details["budget"] == "seconds"


async def test_retry_budget_in_dollars(
    bus: Bus, make_worker: WorkerFactory, config_dir: Path
) -> None:
    with (config_dir / "prices.yaml").open("a", encoding="utf-8") as prices:
        prices.write("  route-usd:\n    input_per_mtok: 1.0\n    output_per_mtok: 2.0\n")
    await make_worker()
    result = await run(bus, new_work(model="route-usd"))
    problem = result.failure.problem
    assert problem.details["cause"] == "retry_budget_exhausted"
    assert problem.details["budget"] == "usd"
    assert int(problem.details["next_call_usd_nanos"]) > 0


async def test_last_resort_template_is_marked_degraded(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    await make_worker()
    work = new_work(model="route-resort")
    result = await run(bus, work)
    final = result.final
    assert final.degraded_reason and final.deployment == "last_resort:template"
    assert final.choices[0].content == "Busy; try later." and final.usage.output_tokens == 0
    [usage] = await usage_events(bus, work.key_id)
    assert (usage.outcome, usage.deployment) == ("degraded", "last_resort:template")
    stream = await run(bus, new_work(model="route-resort", stream=True))
    assert [d.content for d in stream.deltas] == ["Busy; try later."]
    assert all(d.degraded for d in stream.deltas)
    assert stream.final.degraded_reason and not stream.final.choices


async def test_without_a_last_resort_answer_it_is_503_with_retry_after(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    await make_worker()
    result = await run(bus, new_work(model="route-503"))
    problem = result.failure.problem
    assert (problem.code, problem.http_status, problem.retry_after_ms) == (
        "upstream_unavailable",
        503,
        9000,
    )
    assert problem.details["route"] == "route-503"


async def test_a_client_error_is_never_replaced_by_a_last_resort(
    bus: Bus, make_worker: WorkerFactory
) -> None:
    await make_worker()
    result = await run(bus, new_work(model="route-client", sim={"fault": "context_length"}))
    assert result.failure.problem.code == "context_length_exceeded"
