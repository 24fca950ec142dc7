"""Streams that survive a worker SIGKILL, a gateway SIGKILL and a client disconnect,
against real processes and a real NATS (the simulator paces tokens so that kills land
mid-answer)."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from typing import Any

import httpx
import pytest
from sluice.devtools.simulator import _TOKEN_TEXT, Simulator

from tests.resilience.conftest import (
    DEV_KEY,
    HEARTBEAT_SECONDS,
    OTHER_TEAM_KEY,
    Cluster,
    SseEvent,
    SseReader,
    content_of,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AUTH = {"Authorization": f"Bearer {DEV_KEY}"}


def expected_text(seed: int, tokens: int) -> str:
    return "".join(_TOKEN_TEXT[w] for w in Simulator._words({"seed": seed}, tokens))


def body(sim: dict[str, Any], seed: int, *, include_usage: bool = True) -> dict[str, Any]:
    return {
        "model": "sim-fast",
        "stream": True,
        "stream_options": {"include_usage": include_usage},
        "seed": seed,
        "messages": [{"role": "user", "content": f"tell me a story {seed}"}],
        "sim": sim,
    }


async def read_until(
    response: httpx.Response, reader: SseReader, *, events: int | None = None
) -> None:
    """Reads ``response`` until ``events`` events arrived (or the end of the stream)."""
    async for chunk in response.aiter_text():
        reader.feed(chunk)
        if events is not None and len(reader.events) >= events:
            return


async def consume(
    http: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[httpx.Response, SseReader]:
    reader = SseReader()
    async with http.stream(method, url, **kwargs) as response:
        if response.status_code == 200:
            await read_until(response, reader)
        else:
            await response.aread()
    return response, reader


def ended_with_done(reader: SseReader) -> bool:
    return bool(reader.events) and reader.events[-1].data == "[DONE]"


def sequences(events: list[SseEvent]) -> list[int]:
    """Event sequences in arrival order, one per SSE event id (a final event's several
    chunks share one id)."""
    out: list[int] = []
    for e in events:
        if e.id is not None and (not out or out[-1] != e.sequence):
            out.append(e.sequence)
    return out


async def eventually(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


async def test_worker_sigkill_mid_stream_resumes_exactly_once(cluster: Cluster) -> None:
    seed, total = 1001, 60
    sim_id = f"failover-{secrets.token_hex(4)}"
    request = body({"id": sim_id, "output_tokens": total, "tokens_per_second": 8}, seed)
    victim = cluster.workers[-1]
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http:
        first = SseReader()
        async with http.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            await read_until(response, first, events=5)
        # The client is gone (policy continue). A second worker joins, the first dies.
        survivor = cluster.start_worker()
        await cluster.wait_log(survivor, "worker ready")
        killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)
        victim.process.wait(10)
        last_id = first.events[-1].id
        # The client comes back with Last-Event-ID while the request is being failed over.
        stored_at_kill = max(e.sequence for e in await cluster.stored_events(request_id))
        second = SseReader()
        failover_seconds = 0.0
        async with http.stream(
            "GET", f"/v1/streams/{request_id}", headers={"Last-Event-ID": last_id or ""}
        ) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_text():
                for event in second.feed(chunk):
                    if not failover_seconds and event.id and event.sequence > stored_at_kill:
                        failover_seconds = time.monotonic() - killed_at
    assert ended_with_done(second), second.events[-3:]
    seen = sequences(first.events) + sequences(second.events)
    assert seen == list(range(1, len(seen) + 1)), "every event once, in order"
    assert content_of(first.events) + content_of(second.events) == expected_text(seed, total)
    stats = await cluster.sim_stats()
    assert stats["by_id"][sim_id] == 2 and stats["prefill_by_id"][sim_id] == 1
    usage = await eventually(lambda: cluster.usage_events(request_id))
    assert len(usage) == 1, "billed exactly once"
    assert usage[0].outcome == "completed"
    assert usage[0].usage.output_tokens >= total
    assert usage[0].usage.input_tokens > 0
    print(f"worker failover: first new token {failover_seconds:.1f}s after SIGKILL")


async def test_gateway_sigkill_resume_on_a_new_gateway(cluster: Cluster) -> None:
    seed, total = 2002, 40
    request = body({"output_tokens": total, "tokens_per_second": 10}, seed)
    old = cluster.gateways[-1]
    first = SseReader()
    async with (
        httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        request_id = response.headers["x-request-id"]
        await read_until(response, first, events=6)
        old.signal(signal.SIGKILL)
        old.process.wait(10)
    new = cluster.start_gateway()
    await cluster.wait_http(new)
    after = sequences(first.events)[-1]
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http:
        response, second = await consume(http, "GET", f"/v1/streams/{request_id}?after={after}")
    assert response.status_code == 200
    assert ended_with_done(second)
    seen = sequences(first.events) + sequences(second.events)
    assert seen == list(range(1, len(seen) + 1))
    assert content_of(first.events) + content_of(second.events) == expected_text(seed, total)


async def test_disconnect_with_cancel_stops_upstream_and_bills_partial(cluster: Cluster) -> None:
    seed, total = 3003, 80
    sim_id = f"cancel-{secrets.token_hex(4)}"
    request = body({"id": sim_id, "output_tokens": total, "tokens_per_second": 20}, seed)
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http:
        reader = SseReader()
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            json=request,
            headers={"x-sluice-on-disconnect": "cancel"},
        ) as response:
            request_id = response.headers["x-request-id"]
            await read_until(response, reader, events=5)
        # Gone: the gateway cancels, the worker closes the upstream stream.
        stats = await eventually(lambda: _stat(cluster, "aborted_by_id", sim_id), timeout=10)
        assert stats, "the simulator saw its stream closed early"
        usage = await eventually(lambda: cluster.usage_events(request_id))
        assert len(usage) == 1
        assert usage[0].outcome == "cancelled"
        assert 0 < usage[0].usage.output_tokens < total
        tokens_sent = (await cluster.sim_stats())["tokens_by_id"][sim_id]
        assert tokens_sent < total
        # The stored stream ends with the cancelled error event, and replays so.
        response, replay = await consume(http, "GET", f"/v1/streams/{request_id}")
    assert replay.events[-1].event == "error"
    problem = replay.events[-1].json()
    assert problem["code"] == "cancelled"


async def _stat(cluster: Cluster, name: str, sim_id: str) -> int:
    return int((await cluster.sim_stats())[name].get(sim_id, 0))


async def test_disconnect_with_continue_completes_and_replays(cluster: Cluster) -> None:
    seed, total = 4004, 30
    request = body({"output_tokens": total, "tokens_per_second": 30}, seed)
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http:
        first = SseReader()
        async with http.stream("POST", "/v1/chat/completions", json=request) as response:
            request_id = response.headers["x-request-id"]
            await read_until(response, first, events=3)
        usage = await eventually(lambda: cluster.usage_events(request_id))
        assert [u.outcome for u in usage] == ["completed"]
        assert usage[0].usage.output_tokens == total
        response, replay = await consume(http, "GET", f"/v1/streams/{request_id}")
    assert ended_with_done(replay)
    assert content_of(replay.events) == expected_text(seed, total)


async def test_finished_stream_replays_whole_and_after_n(cluster: Cluster) -> None:
    seed, total = 5005, 12
    # Paced, so that tokens reach the worker apart and leave as several events.
    request = body({"output_tokens": total, "tokens_per_second": 100}, seed)
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http:
        response, live = await consume(http, "POST", "/v1/chat/completions", json=request)
        request_id = response.headers["x-request-id"]
        assert ended_with_done(live)
        live_sequences = sequences(live.events)
        assert len(live_sequences) >= 3
        # Resume from the middle of what the live stream saw.
        cut = live_sequences[len(live_sequences) // 2 - 1]
        response, replay = await consume(http, "GET", f"/v1/streams/{request_id}")
        assert response.status_code == 200
        assert replay.events[0].retry is not None, "the stream opens with a retry hint"
        response, tail = await consume(http, "GET", f"/v1/streams/{request_id}?after={cut}")
        response, by_header = await consume(
            http,
            "GET",
            f"/v1/streams/{request_id}?after=1",
            headers={"Last-Event-ID": f"{request_id}:{cut}"},
        )
    strip = [e.data for e in live.events if e.data != "[DONE]"]
    assert [e.id for e in replay.events] == [e.id for e in live.events]
    assert content_of(replay.events) == content_of(live.events) == expected_text(seed, total)
    # The final chunk (usage) is the same; only latency figures in `sluice` may differ.
    assert replay.events[-2].json()["usage"] == live.events[-2].json()["usage"]
    assert len(strip) == len(replay.events) - 1
    assert sequences(tail.events)[0] == cut + 1 and ended_with_done(tail)
    missed = [e for e in live.events if e.id and e.sequence > cut]
    assert content_of(tail.events) == content_of(missed)
    assert sequences(by_header.events) == sequences(tail.events), "Last-Event-ID wins"


async def test_idle_stream_gets_heartbeats_and_retry_hint(cluster: Cluster) -> None:
    request = body({"output_tokens": 3, "ttft_ms": HEARTBEAT_SECONDS * 1000 * 3}, 6006)
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http:
        response, reader = await consume(http, "POST", "/v1/chat/completions", json=request)
    assert response.status_code == 200
    assert "keep-alive" in reader.comments, "a heartbeat while the first token is pending"
    assert reader.events[0].retry == 2000
    assert ended_with_done(reader)


async def test_resume_by_another_team_or_unknown_id_is_404(cluster: Cluster) -> None:
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http:
        response, _ = await consume(
            http, "POST", "/v1/chat/completions", json=body({"output_tokens": 4}, 7007)
        )
        request_id = response.headers["x-request-id"]
        other = await http.get(
            f"/v1/streams/{request_id}", headers={"Authorization": f"Bearer {OTHER_TEAM_KEY}"}
        )
        unknown = await http.get("/v1/streams/req_doesnotexist0000")
        bad_id = await http.get(
            f"/v1/streams/{request_id}", headers={"Last-Event-ID": "someone-else:3"}
        )
    for resp in (other, unknown):
        assert resp.status_code == 404
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.json()["code"] == "not_found"
    assert bad_id.status_code == 400


async def test_stream_cut_upstream_ends_with_an_error_event(cluster: Cluster) -> None:
    sim = {"output_tokens": 20, "tokens_per_second": 50, "fault": "cut", "cut_after": 6}
    request = body(sim, 8008)
    async with httpx.AsyncClient(base_url=cluster.gateway_url, headers=AUTH, timeout=60) as http:
        response, reader = await consume(http, "POST", "/v1/chat/completions", json=request)
    assert response.status_code == 200
    assert not ended_with_done(reader), "never a silent [DONE]"
    last = reader.events[-1]
    assert last.event == "error"
    problem = last.json()
    assert problem["code"] == "upstream_stream_interrupted"
    assert int(problem["details"]["partial_usage"]["output_tokens"]) > 0


async def test_bench_reconnect_measures_the_first_replayed_event(cluster: Cluster) -> None:
    from bench.resume import measure_reconnect

    figures = await measure_reconnect(cluster.gateway_url, DEV_KEY, 30)
    print(f"reconnect to first replayed event: {figures}")
    assert figures["samples"] == 30
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] < 2000


async def test_bench_sections_run_on_a_small_scale(cluster: Cluster) -> None:
    """The jobs, priority and open-streams sections of ``python -m bench``, shrunk: they
    run end to end and print their tables (figures are not checked: shared machines)."""
    from bench.jobs import priority_table, submission_table
    from bench.streams import streams_table

    url = cluster.gateway_url
    submitted = await submission_table(url, DEV_KEY, rate=20, seconds=0.5)
    print(submitted)
    assert "10/10" in submitted
    priority = await priority_table(
        url,
        DEV_KEY,
        batch_jobs=6,
        batch_seconds=(0.2, 0.4),
        interactive_rate=10,
        interactive_seconds=0.5,
        baseline_seconds=0.5,
        timeout=30,
    )
    print(priority)
    assert "6/6" in priority
    pids = {
        "gateway": cluster.gateways[-1].process.pid,
        "inference_worker": cluster.workers[-1].process.pid,
    }
    opened = await streams_table(
        url, DEV_KEY, pids, streams=5, tokens_per_second=20, seconds=0.5, open_rate=50
    )
    print(opened)
    assert "5/5" in opened
    assert "incomplete" not in opened
