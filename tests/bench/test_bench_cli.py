"""``python -m bench`` options: sections to run and the quick presets (no product)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.__main__ import FULL, QUICK, SECTIONS, parse_args


def test_every_section_runs_by_default_with_the_full_figures() -> None:
    args = parse_args([])
    assert args.only == set(SECTIONS)
    assert (args.batch_jobs, args.streams, args.seconds) == (FULL[3], FULL[5], FULL[0])


def test_only_picks_sections_and_quick_shortens_what_is_not_given() -> None:
    args = parse_args(["--only", "jobs,resume,streams", "--quick", "--streams", "50"])
    assert args.only == {"jobs", "resume", "streams"}
    assert args.streams == 50
    assert (args.batch_jobs, args.stream_seconds, args.seconds) == (QUICK[3], QUICK[7], QUICK[0])


@pytest.mark.parametrize("value", ["", "jobs,nope", ","])
def test_unknown_sections_are_refused(value: str) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--only", value])


def test_span_table_times_both_tracers_and_writes_their_spans() -> None:
    from bench import spans

    text = spans.spans_table(rounds=1, spans=50)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines()[2:4]}
    assert set(rows) == {"sdk", "local"}
    assert "local / sdk:" in text


def test_consumer_options_follow_the_presets() -> None:
    full, quick = parse_args([]), parse_args(["--quick", "--consumer-rounds", "2"])
    assert (full.consumer_rounds, full.consumer_requests, full.consumer_messages) == FULL[8:11]
    assert (quick.consumer_rounds, quick.consumer_messages) == (2, QUICK[10])


def test_ledger_options_follow_the_presets() -> None:
    full, quick = parse_args([]), parse_args(["--quick", "--ledger-events", "3000"])
    assert (full.ledger_rounds, full.ledger_events) == FULL[11:13]
    assert (quick.ledger_rounds, quick.ledger_events) == (QUICK[11], 3000)


def test_chaos_options_follow_the_presets() -> None:
    full, quick = parse_args(["--only", "chaos"]), parse_args(["--quick", "--chaos-rate", "10"])
    assert full.only == {"chaos"} and (full.chaos_seconds, full.chaos_rate) == (FULL[13], 40)
    assert (quick.chaos_seconds, quick.chaos_rate) == (QUICK[13], 10)


def test_mcp_options_follow_the_presets() -> None:
    full, quick = parse_args([]), parse_args(["--quick"])
    assert (full.mcp_calls, quick.mcp_calls) == (FULL[14], QUICK[14])
    assert parse_args(["--only", "mcp", "--mcp-calls", "20"]).mcp_calls == 20


def test_memory_options_follow_the_presets() -> None:
    full, quick = parse_args(["--only", "memory"]), parse_args(["--quick"])
    assert full.only == {"memory"} and (full.memory_seconds, full.memory_rate) == (FULL[15], 100)
    assert quick.memory_seconds == QUICK[15]


def _named_tree(root: subprocess.Popen[bytes], want: set[str]) -> dict[str, int]:
    from bench import memory

    deadline = time.monotonic() + 10
    while True:
        named = memory.product_pids(root.pid, {"gateway": 1})
        if want <= set(named) or time.monotonic() > deadline:
            return named
        time.sleep(0.05)


def _stop_tree(root: subprocess.Popen[bytes]) -> None:
    from bench import memory

    for pid in memory.product_pids(root.pid, {}).values():
        if pid != root.pid:
            os.kill(pid, signal.SIGKILL)
    root.kill()
    root.wait()


SLEEPER = "import time; time.sleep(30)"


def test_the_memory_table_names_every_process_of_the_tree() -> None:
    """``product_pids`` names the ``sluice up`` process the supervisor and finds the
    simulator under it by its command line; the services come named."""
    from bench import memory

    supervisor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"m = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, 'cli', 'simulator'])\n"
            "time.sleep(30)\n",
        ]
    )
    try:
        named = _named_tree(supervisor, {"simulator"})
        assert named["supervisor"] == supervisor.pid and named["gateway"] == 1
        assert "simulator" in named and "launcher" not in named
        assert memory.rss_mib(supervisor.pid) > 0 and memory.pss_mib(supervisor.pid) > 0
    finally:
        _stop_tree(supervisor)


def test_an_older_checkouts_launcher_is_counted_with_its_supervisor() -> None:
    """A checkout whose ``sluice up`` forked its supervisor (a child running ``up`` too):
    both are named, so an A/B against it sums the same tree a user runs."""
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"s = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, 'up', '--x'])\n"
            "time.sleep(30)\n",
        ]
    )
    try:
        named = _named_tree(launcher, {"launcher"})
        assert named["launcher"] == launcher.pid
        assert named["supervisor"] != launcher.pid
    finally:
        _stop_tree(launcher)


@pytest.mark.slow
async def test_consumer_tables_measure_every_variant_and_settle_every_message() -> None:
    from bench import consumers

    # pull_round raises when a variant leaves a message unacked.
    text = await consumers.consumers_tables(rounds=1, requests=200, messages=256)
    for label in [*consumers.CORE_VARIANTS.values(), *consumers.PULL_VARIANTS.values()]:
        assert label in text
    assert "AckAll saves, per message:" in text


def test_wakeups_and_syscalls_count_this_process_reading_and_waiting(tmp_path: Path) -> None:
    import os
    import threading

    from bench.__main__ import wakeups_and_syscalls

    before = wakeups_and_syscalls(os.getpid())
    target = tmp_path / "probe"
    for _ in range(20):
        target.write_bytes(b"x")
        target.read_bytes()
    # A thread that waits and is woken: a voluntary switch or more.
    done = threading.Event()
    waiter = threading.Thread(target=done.wait)
    waiter.start()
    done.set()
    waiter.join()
    after = wakeups_and_syscalls(os.getpid())
    assert after[1] - before[1] >= 40  # at least the 20 writes and 20 reads
    assert after[0] > before[0]


def test_floor_options_follow_the_presets() -> None:
    full, quick = parse_args(["--only", "floor"]), parse_args(["--quick", "--floor-rate", "50"])
    assert full.only == {"floor"}
    assert (full.floor_rounds, full.floor_seconds, full.floor_rate) == (*FULL[16:18], 200)
    assert (quick.floor_rounds, quick.floor_seconds, quick.floor_rate) == (*QUICK[16:18], 50)
    assert full.floor_in_flight == 32
