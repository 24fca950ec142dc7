"""Many open streams at once: ``streams`` SSE completions opened at ``open_rate`` per
second, each paced by the simulator at ``tokens_per_second`` and long enough that all of
them are open together for ``seconds`` after the last one opened (they end in the order
they opened, at the same pace: no artificial burst of endings).

Reports the gateway's (and the worker's) resident memory before and at the peak, the
CPU each process spent, and the inter-chunk gaps the client saw against the pacing: a
gap longer than ``1 / tokens_per_second`` is delay added on the way (worker, NATS,
gateway relay, and the client itself, which shares the machine).

The product for this section needs room for that many requests at once: worker slots
(``SLUICE_WORKER_CONCURRENCY``), connections from the worker to the simulator
(``max_connections`` of the provider) and file descriptors; ``product_env`` and
``raise_fd_limit`` give them.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.load import percentile
from bench.report import table

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config"


def raise_fd_limit(wanted: int) -> int:
    """Raises this process's soft RLIMIT_NOFILE towards ``wanted`` (children inherit it);
    returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def product_env(config_dir: Path, streams: int) -> dict[str, str]:
    """Environment of the product for ``streams`` concurrent streams: enough worker
    slots, and a copy of the provider catalogue whose simulator allows that many
    connections."""
    source = Path(os.environ.get("SLUICE_CONFIG_DIR") or REPO_CONFIG)
    shutil.copytree(source, config_dir, dirs_exist_ok=True)
    path = config_dir / "providers.yaml"
    catalog = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    simulator = catalog.setdefault("providers", {}).setdefault("simulator", {})
    simulator["max_connections"] = max(int(simulator.get("max_connections", 0)), streams + 256)
    path.write_text(yaml.safe_dump(catalog, sort_keys=False), encoding="utf-8")
    return {
        "SLUICE_CONFIG_DIR": str(config_dir),
        "SLUICE_WORKER_CONCURRENCY": str(streams + 64),
    }


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Held:
    """One stream as the client saw it."""

    expected: int = 0
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    chunks: int = 0
    gaps_s: list[float] = field(default_factory=list)
    done: bool = False
    # Worker queue wait, from the last chunk's ``sluice.latency_ms.queue``.
    queue_ms: float | None = None


class Gauge:
    """Streams open right now (first chunk received, last not yet), and the peak."""

    def __init__(self) -> None:
        self.open = 0
        self.peak = 0

    def up(self) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)

    def down(self) -> None:
        self.open -= 1


async def _hold(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    gauge: Gauge,
) -> Held:
    """Reads one stream in whatever pieces arrive (cheaper than line by line: the client
    shares the machine); events that arrive in one piece arrived together."""
    held = Held(expected=int(body["sim"]["output_tokens"]))
    started = time.perf_counter()
    last: float | None = None
    pending = b""
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            held.status = resp.status
            if resp.status != 200:
                held.error = f"HTTP {resp.status}"
                await resp.read()
                return held
            try:
                async for piece in resp.content.iter_any():
                    now = time.perf_counter()
                    *events, pending = (pending + piece).split(b"\n\n")
                    for event in events:
                        if b"data: [DONE]" in event:
                            held.done = True
                        elif b'"sluice"' in event:
                            held.queue_ms = _queue_ms(event)
                        elif b'"content"' not in event or b"data:" not in event:
                            continue
                        elif last is None:
                            held.ttft_s = now - started
                            gauge.up()
                            last = now
                            held.chunks += 1
                        else:
                            held.gaps_s.append(now - last)
                            last = now
                            held.chunks += 1
            finally:
                if last is not None:
                    gauge.down()
    except (TimeoutError, aiohttp.ClientError) as exc:
        held.error = type(exc).__name__
    return held


def _queue_ms(event: bytes) -> float | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                chunk = json.loads(line[5:])
                return float(chunk["sluice"]["latency_ms"]["queue"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def simulator_pid(port: int) -> int | None:
    """The simulator serving ``port`` (the launcher starts it with ``--port N``)."""
    wanted = f"simulator\0--port\0{port}\0".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


async def streams_table(
    gateway_url: str,
    api_key: str,
    pids: dict[str, int],
    *,
    streams: int = 1000,
    tokens_per_second: float = 20,
    seconds: float = 15,
    open_rate: float = 100,
) -> str:
    """Opens ``streams`` streams at ``open_rate`` per second, each ``tokens_per_second``
    until ``seconds`` after the last one opened; the gaps between chunks, and memory and
    CPU of the processes in ``pids`` (by name) and of this one."""
    url = f"{gateway_url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    ramp_s = streams / open_rate
    # Each outlives the ramp: all are open together from the last opening on.
    output_tokens = max(2, round(tokens_per_second * (ramp_s + seconds)))
    pacing_s = 1 / tokens_per_second
    # The services on the path first, then the rest, then this process (the client).
    order = ["gateway", "inference_worker", "nats", "simulator"]
    names = [n for n in order if n in pids] + sorted(set(pids) - set(order))
    watched = {**{name: pids[name] for name in names}, "bench client": os.getpid()}
    tag = f"bench stream {time.monotonic_ns()}"

    def body(i: int) -> dict[str, Any]:
        return {
            "model": "sim-fast",
            "messages": [{"role": "user", "content": f"{tag} {i}: a long answer, please"}],
            "max_tokens": output_tokens,
            "temperature": 0.7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "sim": {
                "output_tokens": output_tokens,
                "ttft_ms": 0,
                "tokens_per_second": tokens_per_second,
            },
        }

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=(ramp_s + seconds) * 4 + 120, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Warm up (connections, key cache), then let the services settle.
        warm = {**body(-1), "sim": {"output_tokens": 4, "ttft_ms": 0, "tokens_per_second": 0}}
        await asyncio.gather(*(_hold(session, url, warm, headers, Gauge()) for _ in range(8)))
        await asyncio.sleep(1)

        rss_before = {name: rss_mib(pid) for name, pid in watched.items()}
        rss_peak = dict(rss_before)
        cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
        gauge = Gauge()
        sampling = True

        async def sample() -> None:
            while sampling:
                for name, pid in watched.items():
                    rss_peak[name] = max(rss_peak[name], rss_mib(pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        began = time.perf_counter()
        tasks: list[asyncio.Task[Held]] = []
        for i in range(streams):
            delay = began + i / open_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_hold(session, url, body(i), headers, gauge)))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - began
        sampling = False
        await sampler
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in watched.items()}
        await asyncio.sleep(2)
        rss_after = {name: rss_mib(pid) for name, pid in watched.items()}

    ok = [h for h in results if h.status == 200 and h.done and h.chunks == h.expected]
    complete = {id(h) for h in ok}
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for h in results:
        if id(h) not in complete:
            if h.error:
                reason = h.error
            elif not h.done:
                reason = "no [DONE]"
            else:
                reason = "content chunks != tokens"
                examples.setdefault(reason, f"{h.chunks}/{h.expected}")
            errors[reason] = errors.get(reason, 0) + 1
    gaps = [g * 1000 for h in results for g in h.gaps_s]
    ttft = [h.ttft_s * 1000 for h in results if h.ttft_s is not None]
    queue = [h.queue_ms for h in results if h.queue_ms is not None]
    pacing_ms = pacing_s * 1000
    opening = table(
        [
            "streams",
            "opened /s",
            "complete",
            "open at once (peak)",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "worker queue p50 ms",
            "worker queue p99 ms",
            "wall s",
        ],
        [
            [
                streams,
                open_rate,
                f"{len(ok)}/{len(results)}",
                gauge.peak,
                percentile(ttft, 50),
                percentile(ttft, 99),
                percentile(queue, 50),
                percentile(queue, 99),
                wall,
            ]
        ],
    )
    relay = table(
        [
            "tokens/s each",
            "pacing ms",
            "gaps",
            "gap p50 ms",
            "gap p99 ms",
            "added gap p50 ms",
            "added gap p99 ms",
        ],
        [
            [
                tokens_per_second,
                pacing_ms,
                len(gaps),
                percentile(gaps, 50),
                percentile(gaps, 99),
                percentile(gaps, 50) - pacing_ms,
                percentile(gaps, 99) - pacing_ms,
            ]
        ],
    )
    memory = table(
        [
            "process",
            "RSS before MiB",
            "RSS peak MiB",
            "growth MiB",
            "RSS after MiB",
            "CPU s",
            "cores busy",
        ],
        [
            [
                name,
                rss_before[name],
                rss_peak[name],
                rss_peak[name] - rss_before[name],
                rss_after[name],
                cpu[name],
                cpu[name] / wall,
            ]
            for name in watched
        ],
    )
    text = f"{opening}\n\n{relay}\n\n{memory}"
    if errors:
        text += "\n\nincomplete streams: " + ", ".join(
            f"{k}: {v}" + (f" (e.g. {examples[k]})" if k in examples else "")
            for k, v in errors.items()
        )
    return text
