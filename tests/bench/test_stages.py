"""The stage classifier of ``python -m bench --only stages`` on py-spy's raw lines."""

from __future__ import annotations

from bench.stages import EVENT_LOOP, NATIVE, shares, stage_of, stage_table

ROOT = "<module> (services/gateway/__main__.py:6);run_service (sluice/service.py:191)"


def test_a_specific_stage_wins_over_the_code_that_called_it() -> None:
    frames = [
        ROOT,
        "ChatService.complete (services/gateway/domain/chat.py:162)",
        "count_chat (sluice/tokens.py:40)",
        "Encoding.encode_ordinary (tiktoken/core.py:76)",
    ]
    assert stage_of(";".join(frames).split(";")) == "token counting"
    publish = [ROOT, "Bus.publish (sluice/bus.py:346)", "Client.publish (nats/aio/client.py:990)"]
    assert stage_of(";".join(publish).split(";")) == "NATS client (publish, flush, read)"


def test_otherwise_the_innermost_of_service_framework_and_server_decides() -> None:
    in_framework = [
        ROOT,
        "Edge.__call__ (services/gateway/handlers/http/middleware.py:129)",
        "Litestar.__call__ (litestar/app.py:623)",
        "HTTPRoute.handle (litestar/routes/http.py:81)",
    ]
    assert stage_of(";".join(in_framework).split(";")) == "HTTP framework (litestar)"
    in_handler = [*in_framework, "create_chat (services/gateway/handlers/http/chat.py:91)"]
    assert stage_of(";".join(in_handler).split(";")) == "service code, other"


def test_the_entry_point_alone_is_the_event_loop_and_no_frame_is_native() -> None:
    assert stage_of([*ROOT.split(";"), "Runner.run (asyncio/runners.py:118)"]) == EVENT_LOOP
    assert stage_of([]) == NATIVE
    assert stage_of([""]) == NATIVE


def test_shares_add_the_counts_and_the_table_turns_them_into_microseconds() -> None:
    raw = "\n".join(
        [
            f"{ROOT};Client._flusher (nats/aio/client.py:2363) 30",
            f"{ROOT};Runner.run (asyncio/runners.py:118) 50",
            " 20",
        ]
    )
    counts = shares(raw)
    assert counts == {"NATS client (publish, flush, read)": 30, EVENT_LOOP: 50, NATIVE: 20}
    text = stage_table({"gateway": raw}, {"gateway": 2.0})
    # 50 % of 2 ms is 1000 µs; 30 % is 600 µs.
    assert "1000" in text
    assert "600" in text
