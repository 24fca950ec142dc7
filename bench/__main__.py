"""``make bench``: gateway overhead over the simulated provider, with every service on
the path, on this machine. Prints tables; asserts nothing (machines are shared and
noisy: read medians, compare within one run).

It starts the product the way a user does (``sluice up --simulator --no-model``, on
free ports, in a temporary state directory), then measures the same load sent straight
to the simulator and through the gateway.

Sections (``--only a,b``; ``--quick`` for a short run of each): ``overhead`` (the tables
above), ``jobs`` (job submission latency, bench/jobs.py), ``resume`` (reconnect to the
first replayed event, bench/resume.py), ``mcp`` (a chat through ``/mcp`` beside one over
HTTP, bench/mcp.py), ``coalesce`` (a burst of identical requests:
provider calls and latency, coalesced and not, bench/coalesce.py), ``priority``
(interactive queue wait behind 1,000 batch jobs, on a product of its own), ``streams``
(1,000 streams open at once, bench/streams.py, on a product with room for them),
``semcache`` (the semantic cache's similarity threshold on labelled pairs,
bench/semcache.py, no product) and ``consumers`` (CPU per message of faststream against
nats-py, core request/reply and JetStream pulls, bench/consumers.py, on a NATS server of
its own) and ``ledger`` (usage events per second the cost-trackers drain into SQLite and
PostgreSQL, bench/ledger.py, on a NATS and a PostgreSQL server of their own) and ``chaos``
(a route whose primary fails 5% of its calls and stalls 5%, over the simulator: share
answered and p99 against the primary's, bench/chaos.py, on a product of its own) and
``memory`` (RSS of every Sluice process idle and under load, bench/memory.py, on a
product of its own, started as a user starts it) and
``floor`` (CPU per request of minimal pipelines built from the same libraries: a direct
proxy, one NATS hop, JetStream as Sluice uses it, with one and two usage consumers,
bench/floor.py, beside a product of its own under the same load).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sluice.devtools.embedded import free_port

from bench import (
    chaos,
    coalesce,
    consumers,
    floor,
    jobs,
    ledger,
    mcp,
    memory,
    resume,
    semcache,
    spans,
    stages,
    streams,
    tail,
)
from bench.load import (
    Sample,
    Target,
    closed_loop,
    median,
    one_request,
    paired_open_loop,
    percentile,
)
from bench.report import table

THROUGHPUT_IN_FLIGHT = (16, 64)
API_KEY = "sk-sluice-bench-" + secrets.token_hex(8)
ADMIN_KEY = "sk-sluice-bench-admin-" + secrets.token_hex(8)
SERVICE_MODULES = (
    "services.gateway",
    "services.limiter",
    "services.cache",
    "services.inference_worker",
    "services.cost_tracker",
)
SERVICE_ENV_PREFIX = ("LIMITER", "CACHE", "WORKER", "COST")


# This checkout; ``--against`` names another (with its own .venv) to compare with.
REPO = Path(__file__).resolve().parents[1]


class RunningProduct:
    def __init__(
        self,
        state_dir: Path,
        extra_env: Mapping[str, str] | None = None,
        checkout: Path = REPO,
    ) -> None:
        self.state_dir = state_dir
        self.checkout = checkout
        # The key the load runs under: the dev key, or one of a team (use_team_key).
        self.api_key = API_KEY
        self.gateway_port = free_port()
        self.sim_port = free_port()
        self.nats_monitor_port = free_port()
        env = dict(os.environ)
        env.update(
            {
                "SLUICE_STATE_DIR": str(state_dir),
                "SLUICE_GATEWAY_PORT": str(self.gateway_port),
                "SLUICE_GATEWAY_GRPC_PORT": str(free_port()),
                "SLUICE_SIM_PORT": str(self.sim_port),
                "SLUICE_NATS_PORT": str(free_port()),
                "SLUICE_NATS_MONITOR_PORT": str(self.nats_monitor_port),
                "SLUICE_DEV_API_KEY": API_KEY,
                "SLUICE_ADMIN_API_KEY": ADMIN_KEY,
                "SLUICE_LOG_LEVEL": "WARNING",
                # The bench measures overhead, not admission: lift the default quotas.
                "SLUICE_LIMITER_DEFAULT_TOKENS_PER_MINUTE": str(10**12),
                "SLUICE_LIMITER_DEFAULT_REQUESTS_PER_MINUTE": str(10**9),
            }
        )
        for prefix in SERVICE_ENV_PREFIX:
            env[f"SLUICE_{prefix}_GRPC_PORT"] = str(free_port())
            env[f"SLUICE_{prefix}_METRICS_PORT"] = str(free_port())
        env.pop("SLUICE_NATS_URL", None)
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        env.update(extra_env or {})
        self.log = (state_dir / "launcher.log").open("wb")
        # The checkout's own `sluice` command, in its own directory: the product of that
        # checkout as its user starts it, whatever module path the command has there.
        sluice = (
            Path(sys.executable).parent / "sluice"
            if checkout == REPO
            else checkout / ".venv" / "bin" / "sluice"
        )
        # As a user starts it (a checkout from before the supervisor ran in `sluice up`'s
        # own process forks it from a launcher there; the bench counts both).
        self.proc = subprocess.Popen(
            [str(sluice), "up", "--simulator", "--no-model"],
            cwd=checkout,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def nats_monitor(self) -> str:
        return f"http://127.0.0.1:{self.nats_monitor_port}"

    @property
    def simulator(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    async def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log_tail())
                try:
                    async with session.get(f"{self.gateway}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.25)
        raise TimeoutError(self.log_tail())

    def log_tail(self) -> str:
        return (self.state_dir / "launcher.log").read_text(errors="replace")[-3000:]

    def pids(self) -> dict[str, int]:
        """Service processes (and NATS) started by the launcher, by short name."""
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if str(self.state_dir).encode() not in environ and str(
                self.state_dir
            ).encode() not in b" ".join(cmdline):
                continue
            text = b" ".join(cmdline).decode(errors="replace")
            for module in SERVICE_MODULES:
                if f"-m {module}" in text:
                    found[module.split(".")[1]] = int(entry.name)
            if "nats-server" in text:
                found["nats"] = int(entry.name)
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def wakeups_and_syscalls(pid: int) -> tuple[int, int]:
    """Voluntary context switches of every thread of ``pid`` (each one a wait for I/O or
    a lock: a wake-up) and its read and write system calls (sockets and files)."""
    switches = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    switches += int(line.split()[1])
    calls = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("syscr", "syscw"):
                calls += int(value)
    return switches, calls


class CpuMeter:
    """CPU seconds each process spends while inside ``counting()``, summed; and its
    wake-ups and read/write system calls, which a busy machine does not blur the way it
    blurs CPU time (the same work makes the same calls)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.spent = dict.fromkeys(self.pids, 0.0)
        self.wakeups = dict.fromkeys(self.pids, 0)
        self.syscalls = dict.fromkeys(self.pids, 0)

    @contextlib.asynccontextmanager
    async def counting(self) -> AsyncIterator[None]:
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        calls_before = {name: wakeups_and_syscalls(pid) for name, pid in self.pids.items()}
        yield
        for name, pid in self.pids.items():
            self.spent[name] += cpu_seconds(pid) - before[name]
            switches, calls = wakeups_and_syscalls(pid)
            self.wakeups[name] += switches - calls_before[name][0]
            self.syscalls[name] += calls - calls_before[name][1]


class MessageMeter:
    """NATS messages each connection (one per service, named ``sluice-<service>``) sends
    and receives while inside ``counting()``, from the embedded server's ``/connz``."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.moved: dict[str, list[int]] = {}

    async def snapshot(self) -> dict[str, tuple[int, int]]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.monitor}/connz", params={"limit": "1024"}) as resp,
        ):
            body = await resp.json()
        counts: dict[str, tuple[int, int]] = {}
        for conn in body.get("connections", []):
            name = str(conn.get("name") or "unnamed").removeprefix("sluice-")
            sent, received = counts.get(name, (0, 0))
            counts[name] = (sent + int(conn["in_msgs"]), received + int(conn["out_msgs"]))
        return counts

    @contextlib.asynccontextmanager
    async def counting(self) -> AsyncIterator[None]:
        before = await self.snapshot()
        yield
        for name, (sent, received) in (await self.snapshot()).items():
            was = before.get(name, (0, 0))
            moved = self.moved.setdefault(name, [0, 0])
            moved[0] += sent - was[0]
            moved[1] += received - was[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def chat_body(stream: bool, output_tokens: int, tps: float = 0) -> Callable[[int], dict[str, Any]]:
    def build(i: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "sim-fast",
            "messages": [{"role": "user", "content": f"benchmark request {i}: say something"}],
            "max_tokens": output_tokens,
            "temperature": 0.7,
            "sim": {"output_tokens": output_tokens, "ttft_ms": 0, "tokens_per_second": tps},
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    return build


def ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


async def warm_up(url: str, headers: dict[str, str], stream: bool) -> None:
    async with aiohttp.ClientSession() as session:
        for i in range(50):
            await one_request(session, url, chat_body(stream, 16)(i), headers)


@dataclass
class OverheadRun:
    """One open-loop run at one rate, through the gateway and straight to the provider."""

    mode: str
    rate: int
    sent: int
    ok: int
    direct_p50_ms: float
    gateway_p50_ms: float
    added_p50_ms: float
    added_p99_ms: float
    added_ttft_p50_ms: float
    # CPU ms per request of each process, and NATS messages per request of each
    # connection (sent to the server, received from it).
    cpu_ms: dict[str, float]
    messages: dict[str, tuple[float, float]]
    # Per request, by process: voluntary context switches and read/write system calls.
    wakeups: dict[str, float] = field(default_factory=dict)
    syscalls: dict[str, float] = field(default_factory=dict)

    @property
    def cpu_ms_total(self) -> float:
        return sum(self.cpu_ms.values())


# A team with every level the admission checks set (requests, tokens, concurrency, USD
# per day and month), each far above what the bench sends: admission does all its work
# and nothing binds.
BENCH_TEAM = {
    "tier": "enterprise",
    "limits": {
        "requests_per_minute": 10**9,
        "input_tokens_per_minute": 10**12,
        "output_tokens_per_minute": 10**12,
        "concurrent_requests": 10**6,
    },
    "budgets": {"usd_per_day": "1000000", "usd_per_month": "10000000"},
}


async def use_team_key(product: RunningProduct) -> str:
    """Runs the load under a key of a team with limits and budgets (``--team-key``):
    admission with key, team and budgets on the path. A checkout without the admin API
    keeps its dev key. Returns which key the load runs under."""
    team = "bench-" + secrets.token_hex(3)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession(base_url=product.gateway, headers=admin) as http:
        async with http.post("/v1/admin/teams/", json={"team_id": team, **BENCH_TEAM}) as r:
            if r.status in (401, 404):
                return "the dev key (no admin API in this checkout)"
            if r.status != 201:
                raise RuntimeError(f"creating the bench team: {r.status} {await r.text()}")
        key_body = {
            "team_id": team,
            "name": "bench",
            "scopes": ["chat"],
            "limits": BENCH_TEAM["limits"],
            "budgets": BENCH_TEAM["budgets"],
        }
        async with http.post("/v1/admin/keys/", json=key_body) as r:
            if r.status != 201:
                raise RuntimeError(f"creating the bench key: {r.status} {await r.text()}")
            product.api_key = str((await r.json())["secret"])
    return f"a key of team {team} (tier enterprise, limits and budgets at key and team)"


async def measure_overhead(
    product: RunningProduct, rates: list[int], seconds: float
) -> list[OverheadRun]:
    gw_url = f"{product.gateway}/v1/chat/completions"
    sim_url = f"{product.simulator}/v1/chat/completions"
    gw_headers = {"Authorization": f"Bearer {product.api_key}", "Content-Type": "application/json"}
    sim_headers = {"Content-Type": "application/json"}
    await warm_up(gw_url, gw_headers, False)
    await warm_up(gw_url, gw_headers, True)
    runs: list[OverheadRun] = []
    pids = product.pids()
    direct_target = Target(sim_url, sim_headers)
    via_target = Target(gw_url, gw_headers)
    for stream in (False, True):
        for rate in rates:
            meter = CpuMeter(pids)
            messages = MessageMeter(product.nats_monitor)

            @contextlib.asynccontextmanager
            async def counting(
                meter: CpuMeter = meter, messages: MessageMeter = messages
            ) -> AsyncIterator[None]:
                async with meter.counting(), messages.counting():
                    yield

            direct, via = await paired_open_loop(
                direct_target,
                via_target,
                chat_body(stream, 16),
                rate,
                seconds,
                around_via=counting,
            )
            sent = max(1, len(via))
            ok = [s for s in via if s.ok]
            d_tot = [s.total_s for s in direct if s.ok]
            g_tot = [s.total_s for s in ok]
            ttft = float("nan")
            if stream:
                d_ttft = [s.ttft_s for s in direct if s.ok and s.ttft_s is not None]
                g_ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
                ttft = ms(g_ttft, 50) - ms(d_ttft, 50)
            runs.append(
                OverheadRun(
                    mode="stream" if stream else "non-stream",
                    rate=rate,
                    sent=len(via),
                    ok=len(ok),
                    direct_p50_ms=ms(d_tot, 50),
                    gateway_p50_ms=ms(g_tot, 50),
                    added_p50_ms=ms(g_tot, 50) - ms(d_tot, 50),
                    added_p99_ms=ms(g_tot, 99) - ms(d_tot, 99),
                    added_ttft_p50_ms=ttft,
                    cpu_ms={name: secs * 1000 / sent for name, secs in meter.spent.items()},
                    wakeups={name: n / sent for name, n in meter.wakeups.items()},
                    syscalls={name: n / sent for name, n in meter.syscalls.items()},
                    messages={
                        name: (moved_sent / sent, received / sent)
                        for name, (moved_sent, received) in messages.moved.items()
                    },
                )
            )
    return runs


def overhead_table(runs: list[OverheadRun]) -> str:
    return table(
        [
            "mode",
            "req/s",
            "ok",
            "direct p50 ms",
            "gateway p50 ms",
            "added p50 ms",
            "added p99 ms",
            "CPU ms/req (all services)",
            "added TTFT p50 ms",
        ],
        [
            [
                r.mode,
                r.rate,
                f"{r.ok}/{r.sent}",
                r.direct_p50_ms,
                r.gateway_p50_ms,
                r.added_p50_ms,
                r.added_p99_ms,
                r.cpu_ms_total,
                r.added_ttft_p50_ms,
            ]
            for r in runs
        ],
    )


def cpu_table(runs: list[OverheadRun]) -> str:
    names = sorted({name for r in runs for name in r.cpu_ms})
    return table(
        ["mode", "req/s", *names],
        [[r.mode, r.rate, *[r.cpu_ms.get(n, float("nan")) for n in names]] for r in runs],
    )


def wakeups_table(runs: list[OverheadRun]) -> str:
    names = sorted({name for r in runs for name in r.wakeups})
    return table(
        ["mode", "req/s", *names, "all"],
        [
            [
                r.mode,
                r.rate,
                *[f"{r.wakeups.get(n, 0.0):.1f} / {r.syscalls.get(n, 0.0):.1f}" for n in names],
                f"{sum(r.wakeups.values()):.1f} / {sum(r.syscalls.values()):.1f}",
            ]
            for r in runs
        ],
    )


def messages_table(runs: list[OverheadRun]) -> str:
    conns = sorted({name for r in runs for name in r.messages})
    return table(
        ["mode", "req/s", *conns, "all sent"],
        [
            [
                r.mode,
                r.rate,
                *["{:.2f} / {:.2f}".format(*r.messages.get(name, (0.0, 0.0))) for name in conns],
                sum(sent for sent, _ in r.messages.values()),
            ]
            for r in runs
        ],
    )


async def chunk_table(product: RunningProduct, rate: int, seconds: float) -> str:
    """Inter-chunk gaps of streams paced by the provider at 200 tokens/s (5 ms apart):
    what the gateway adds to the gaps is relay delay."""
    gw_url = f"{product.gateway}/v1/chat/completions"
    sim_url = f"{product.simulator}/v1/chat/completions"
    direct, via = await paired_open_loop(
        Target(sim_url, {"Content-Type": "application/json"}),
        Target(gw_url, {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}),
        chat_body(True, 40, tps=200),
        rate,
        seconds,
    )
    d_gaps = [g for s in direct if s.ok for g in s.gaps_s]
    g_gaps = [g for s in via if s.ok for g in s.gaps_s]
    rows = [
        ["direct", len(d_gaps), ms(d_gaps, 50), ms(d_gaps, 99)],
        ["gateway", len(g_gaps), ms(g_gaps, 50), ms(g_gaps, 99)],
        ["added", "", ms(g_gaps, 50) - ms(d_gaps, 50), ms(g_gaps, 99) - ms(d_gaps, 99)],
    ]
    return table(["path", "gaps", "gap p50 ms", "gap p99 ms"], rows)


async def measure_throughput(
    product: RunningProduct, seconds: float
) -> list[tuple[int, float, str, float, float]]:
    """(in flight, req/s sustained, ok/sent, p50 ms, p99 ms) of closed-loop runs."""
    gw_url = f"{product.gateway}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {product.api_key}", "Content-Type": "application/json"}
    rows: list[tuple[int, float, str, float, float]] = []
    for concurrency in THROUGHPUT_IN_FLIGHT:
        samples, rps = await closed_loop(
            gw_url, chat_body(False, 16), headers, concurrency, seconds
        )
        ok: list[Sample] = [s for s in samples if s.ok]
        rows.append(
            (
                concurrency,
                rps,
                f"{len(ok)}/{len(samples)}",
                ms([s.total_s for s in ok], 50),
                ms([s.total_s for s in ok], 99),
            )
        )
    return rows


def throughput_table(rows: list[tuple[int, float, str, float, float]]) -> str:
    return table(["in flight", "req/s sustained", "ok", "p50 ms", "p99 ms"], rows)


async def overhead_report(product: RunningProduct, args: argparse.Namespace) -> None:
    pids = product.pids()
    gateway_pid = pids["gateway"]
    rss_start = rss_mib(gateway_pid)
    print("Sluice gateway overhead over the simulated provider (zero delay, 16 tokens)")
    print(f"all five services and NATS on this machine; {os.cpu_count()} cores\n")
    runs = await measure_overhead(product, args.rates, args.seconds)
    print(overhead_table(runs))
    print("\nCPU ms per request, by process")
    print(cpu_table(runs))
    print(
        "\nWake-ups / read and write system calls per request, by process"
        " (voluntary context switches of all its threads / syscr + syscw)"
    )
    print(wakeups_table(runs))
    print("\nNATS messages per request, by connection (sent to NATS / received from it)")
    print(messages_table(runs))
    print("\nStream relay: inter-chunk gaps, provider paced at 200 tokens/s")
    print(await chunk_table(product, 20, args.seconds))
    print("\nMaximum sustained throughput (closed loop, non-stream)")
    print(throughput_table(await measure_throughput(product, args.seconds)))
    rss_end = rss_mib(gateway_pid)
    print(
        f"\nGateway resident memory: {rss_start:.0f} MiB at start, {rss_end:.0f} MiB after the runs"
    )


@contextlib.asynccontextmanager
async def running(
    extra_env: Mapping[str, str] | None = None, checkout: Path = REPO
) -> AsyncIterator[RunningProduct]:
    """The product on free ports in a temporary state directory, stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        product = RunningProduct(Path(tmp), extra_env, checkout)
        try:
            await product.wait_ready()
            yield product
        finally:
            product.stop()


def section(title: str) -> None:
    print(f"\n{title}", flush=True)


Throughput = list[tuple[int, float, str, float, float]]


def _revision(checkout: Path) -> str:
    found = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.stdout.strip() or "?"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


async def ab_report(args: argparse.Namespace) -> None:
    """``--against DIR``: this checkout and another (a worktree of an earlier commit,
    with its own .venv), each started afresh, in alternating rounds (ABBA...), so that
    the machine's drift falls on both; medians of the rounds, with their range."""
    builds = {"this": REPO, "against": args.against.resolve()}
    print(
        f"A/B, {args.rounds} rounds: this = {_revision(REPO)}, "
        f"against = {_revision(builds['against'])} ({os.cpu_count()} cores)",
        flush=True,
    )
    results: dict[str, list[tuple[list[OverheadRun], Throughput]]] = {b: [] for b in builds}
    for round_ in range(args.rounds):
        order = list(builds) if round_ % 2 == 0 else list(reversed(builds))
        for build in order:
            async with running(checkout=builds[build]) as product:
                if args.team_key:
                    under = await use_team_key(product)
                    if round_ == 0:
                        print(f"  {build}: the load runs under {under}", flush=True)
                runs = await measure_overhead(product, args.rates, args.seconds)
                closed = await measure_throughput(product, args.seconds)
            results[build].append((runs, closed))
            print(f"  round {round_ + 1}: {build} measured", flush=True)

    def run_of(runs: list[OverheadRun], mode: str, rate: int) -> OverheadRun:
        return next(r for r in runs if r.mode == mode and r.rate == rate)

    # (label, read from one round's runs and closed-loop rows)
    metrics: list[tuple[str, Callable[[list[OverheadRun], Throughput], float]]] = []

    def overhead_metric(mode: str, rate: int, attr: str) -> Callable[..., float]:
        return lambda runs, _closed: float(getattr(run_of(runs, mode, rate), attr))

    def closed_metric(index: int) -> Callable[..., float]:
        return lambda _runs, closed: float(closed[index][1])

    for mode in ("non-stream", "stream"):
        for rate in args.rates:
            for label, attr in (
                ("added p50 ms", "added_p50_ms"),
                ("added p99 ms", "added_p99_ms"),
                ("added TTFT p50 ms", "added_ttft_p50_ms"),
                ("CPU ms/req, all processes", "cpu_ms_total"),
            ):
                if mode == "non-stream" and attr == "added_ttft_p50_ms":
                    continue
                metrics.append((f"{mode} {rate}/s {label}", overhead_metric(mode, rate, attr)))
    for index, in_flight in enumerate(THROUGHPUT_IN_FLIGHT):
        metrics.append((f"closed loop req/s, {in_flight} in flight", closed_metric(index)))
    rows: list[list[object]] = []
    for label, read in metrics:
        this = [read(runs, closed) for runs, closed in results["this"]]
        that = [read(runs, closed) for runs, closed in results["against"]]
        rows.append([label, _spread(this), _spread(that), median(this) / median(that)])
    print("\nMedians of the rounds (min-max)")
    print(table(["", "this", "against", "this / against"], rows))

    names = sorted(
        {n for build in results.values() for runs, _ in build for r in runs for n in r.cpu_ms}
    )
    cpu_rows: list[list[object]] = []
    for mode in ("non-stream", "stream"):
        for rate in args.rates:
            for name in names:
                this = [
                    run_of(runs, mode, rate).cpu_ms.get(name, 0.0) for runs, _ in results["this"]
                ]
                that = [
                    run_of(runs, mode, rate).cpu_ms.get(name, 0.0) for runs, _ in results["against"]
                ]
                cpu_rows.append([f"{mode} {rate}/s", name, median(this), median(that)])
    print("\nCPU ms per request by process (medians of the rounds)")
    print(table(["run", "process", "this", "against"], cpu_rows))


async def main_async(args: argparse.Namespace) -> int:
    only = args.only
    # Every stream holds a socket in this process and in each service on the path.
    streams.raise_fd_limit(4 * args.streams + 1024)
    if args.against is not None:
        await ab_report(args)
        return 0
    if only & {"overhead", "jobs", "resume", "coalesce", "mcp", "stages", "tail"}:
        async with running() as product:
            if "overhead" in only:
                if args.team_key:
                    print(f"The load runs under {await use_team_key(product)}.")
                await overhead_report(product, args)
            if "stages" in only:
                section(
                    f"Where the CPU goes, by stage: py-spy over {args.rates[0]} non-streamed "
                    f"requests/s for {args.seconds:g} s (bench/stages.py)"
                )
                print(
                    await stages.stage_report(
                        product.gateway,
                        product.api_key,
                        product.pids(),
                        args.rates[0],
                        args.seconds,
                        meter_for=CpuMeter,
                        body_for=chat_body(False, 16),
                    )
                )
            if "tail" in only:
                if args.team_key and "overhead" not in only:
                    print(f"The load runs under {await use_team_key(product)}.")
                rate = args.rates[-1]
                section(
                    f"The latency tail: {rate} non-streamed requests/s for "
                    f"{args.seconds:g} s, split by each answer's latency_ms (bench/tail.py)"
                )
                await warm_up(
                    f"{product.gateway}/v1/chat/completions",
                    {
                        "Authorization": f"Bearer {product.api_key}",
                        "Content-Type": "application/json",
                    },
                    False,
                )
                span_file = product.state_dir / "spans" / "gateway.jsonl"
                offset = span_file.stat().st_size if span_file.exists() else 0
                print(
                    await tail.tail_report(
                        product.gateway, product.api_key, chat_body(False, 16), rate, args.seconds
                    )
                )
                await asyncio.sleep(1.0)  # the span writer's last lines
                print("\nThe same requests' admission, from the gateway's spans")
                print(tail.round_trips(tail.span_lines_after(span_file, offset)))
            if "jobs" in only:
                section(
                    f"Job submission: 202 latency at {args.job_rate:g}/s for "
                    f"{args.job_seconds:g} s (open loop)"
                )
                print(
                    await jobs.submission_table(
                        product.gateway, API_KEY, rate=args.job_rate, seconds=args.job_seconds
                    )
                )
            if "resume" in only:
                section("Resumable streams: reconnect (Last-Event-ID) to the first replayed event")
                print(await resume.resume_table(product.gateway, API_KEY, samples=args.reconnects))
            if "coalesce" in only:
                section(
                    f"Coalescing: {args.coalesce_burst} identical requests at once, against "
                    "the same burst with Cache-Control: no-cache (bench/coalesce.py)"
                )
                print(
                    await coalesce.coalesce_table(
                        product.gateway, product.simulator, API_KEY, size=args.coalesce_burst
                    )
                )
            if "mcp" in only:
                section(
                    f"MCP: a chat through /mcp beside the same chat over HTTP, one at a time, "
                    f"{args.mcp_calls} of each (bench/mcp.py)"
                )
                print(await mcp.mcp_table(product.gateway, API_KEY, calls=args.mcp_calls))
    if "priority" in only:
        low, high = jobs.BATCH_SECONDS
        async with running(jobs.product_env()) as product:
            section(
                f"Priority: {args.batch_jobs:,} batch jobs ({low:g}-{high:g} s each, "
                f"{jobs.PRIORITY_CONCURRENCY} worker slots), interactive requests at "
                f"{args.interactive_rate:g}/s for {args.interactive_seconds:g} s"
            )
            print(
                await jobs.priority_table(
                    product.gateway,
                    API_KEY,
                    batch_jobs=args.batch_jobs,
                    interactive_rate=args.interactive_rate,
                    interactive_seconds=args.interactive_seconds,
                    baseline_seconds=min(3.0, args.interactive_seconds),
                )
            )
    if "streams" in only:
        with tempfile.TemporaryDirectory(prefix="sluice-bench-config-") as config:
            env = streams.product_env(Path(config), args.streams)
            async with running(env) as product:
                pids = product.pids()
                simulator = streams.simulator_pid(product.sim_port)
                if simulator is not None:
                    pids["simulator"] = simulator
                section(
                    f"Open streams: {args.streams:,} opened at {args.stream_open_rate:g}/s, "
                    f"{args.stream_tps:g} tokens/s each, all open together for "
                    f"{args.stream_seconds:g} s"
                )
                print(
                    await streams.streams_table(
                        product.gateway,
                        API_KEY,
                        pids,
                        streams=args.streams,
                        tokens_per_second=args.stream_tps,
                        seconds=args.stream_seconds,
                        open_rate=args.stream_open_rate,
                    )
                )
    if "chaos" in only:
        with tempfile.TemporaryDirectory(prefix="sluice-bench-config-") as config:
            async with running(chaos.product_env(Path(config))) as product:
                section(
                    f"Chaos: a route's primary fails {chaos.ERROR_RATE:.0%} (5xx) and stalls "
                    f"{chaos.STALL_RATE:.0%} of its calls, {args.chaos_rate:g} requests/s for "
                    f"{args.chaos_seconds:g} s each run (bench/chaos.py)"
                )
                print(
                    await chaos.chaos_table(
                        product.gateway,
                        product.simulator,
                        API_KEY,
                        rate=args.chaos_rate,
                        seconds=args.chaos_seconds,
                    )
                )
    if "memory" in only:
        async with running() as product:
            section(
                f"Memory: RSS of every Sluice process idle and under {args.memory_rate:g} "
                f"requests/s (every other one streamed) for {args.memory_seconds:g} s "
                "(bench/memory.py)"
            )
            await warm_up(
                f"{product.gateway}/v1/chat/completions",
                {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
                False,
            )
            pids = memory.product_pids(product.proc.pid, product.pids())
            print(
                await memory.memory_table(
                    product.gateway,
                    API_KEY,
                    pids,
                    lambda i: chat_body(i % 2 == 1, 16)(i),
                    rate=args.memory_rate,
                    seconds=args.memory_seconds,
                )
            )
    if "spans" in only:
        section("Tracing: one span, started, ended and serialised (bench/spans.py)")
        print(spans.spans_table())
    if "consumers" in only:
        section(
            "Consumers: CPU per message, faststream against nats-py, A/B in alternating "
            "rounds (bench/consumers.py)"
        )
        print(
            await consumers.consumers_tables(
                rounds=args.consumer_rounds,
                requests=args.consumer_requests,
                messages=args.consumer_messages,
            )
        )
    if "ledger" in only:
        section(
            "Ledger: usage events per second drained into the cost ledger, one tracker on "
            "SQLite, one and two on PostgreSQL (bench/ledger.py)"
        )
        print(await ledger.ledger_table(rounds=args.ledger_rounds, events=args.ledger_events))
    if "floor" in only:
        section(
            f"The architectural floor: minimal pipelines from Sluice's libraries, "
            f"{args.floor_rate:g} requests/s and {args.floor_in_flight} in flight, "
            f"{args.floor_seconds:g} s each, {args.floor_rounds} alternating rounds, medians "
            f"(bench/floor.py; {os.cpu_count()} cores)"
        )
        print(
            await floor.floor_tables(
                rounds=args.floor_rounds,
                rate=args.floor_rate,
                seconds=args.floor_seconds,
                in_flight=args.floor_in_flight,
                product=not args.floor_without_sluice,
            )
        )
    if "semcache" in only:
        section("Semantic cache: similarity threshold on the labelled pairs (bench/semcache.py)")
        semcache.report()
    return 0


SECTIONS = (
    "overhead",
    "jobs",
    "resume",
    "coalesce",
    "mcp",
    "priority",
    "streams",
    "spans",
    "semcache",
    "consumers",
    "ledger",
    "chaos",
    "memory",
    "stages",
    "floor",
    "tail",
)
# Full run, and --quick: (seconds, job seconds, reconnects, batch jobs, interactive
# seconds, streams, stream tokens/s, stream seconds, consumer rounds, consumer requests,
# consumer messages, ledger rounds, ledger events, chaos seconds, MCP calls, memory
# seconds, floor rounds, floor seconds).
# fmt: off
FULL = (
    10.0, 4.0, 200, 1000, 15.0, 1000, 20.0, 15.0, 5, 5000, 8192, 3, 20000, 25.0, 300, 20.0,
    3, 10.0,
)
# fmt: on
QUICK = (3.0, 2.0, 50, 300, 5.0, 200, 10.0, 5.0, 3, 1000, 2048, 1, 5000, 8.0, 100, 8.0, 1, 3.0)


def _sections(value: str) -> set[str]:
    chosen = {name.strip() for name in value.split(",") if name.strip()}
    unknown = chosen - set(SECTIONS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"sections are a comma-separated subset of {','.join(SECTIONS)}"
        )
    return chosen


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "--only",
        type=_sections,
        default=set(SECTIONS),
        help=f"run only these sections (comma-separated: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run: fewer seconds, jobs and streams"
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[100, 200])
    parser.add_argument(
        "--against",
        type=Path,
        help="another checkout (with its own .venv) to compare the overhead section with, "
        "in alternating rounds",
    )
    parser.add_argument("--rounds", type=int, default=4, help="A/B rounds per build (4)")
    parser.add_argument("--seconds", type=float, help="per overhead run (10; quick 3)")
    parser.add_argument("--job-rate", type=float, default=50, help="job submissions per second")
    parser.add_argument("--job-seconds", type=float, help="of job submissions (4; quick 2)")
    parser.add_argument("--reconnects", type=int, help="resume samples (200; quick 50)")
    parser.add_argument(
        "--coalesce-burst", type=int, default=100, help="identical requests sent at once (100)"
    )
    parser.add_argument("--mcp-calls", type=int, help="chats of each kind (300; quick 100)")
    parser.add_argument(
        "--team-key",
        action="store_true",
        help="overhead A/B under a key of a team with limits and budgets (admin API)",
    )
    parser.add_argument("--batch-jobs", type=int, help="batch jobs queued (1000; quick 300)")
    parser.add_argument(
        "--interactive-rate", type=float, default=10, help="interactive requests per second"
    )
    parser.add_argument(
        "--interactive-seconds", type=float, help="behind the batch backlog (15; quick 5)"
    )
    parser.add_argument("--streams", type=int, help="streams open at once (1000; quick 200)")
    parser.add_argument("--stream-tps", type=float, help="tokens per second (20; quick 10)")
    parser.add_argument(
        "--stream-seconds", type=float, help="all streams open together this long (15; quick 5)"
    )
    parser.add_argument(
        "--stream-open-rate", type=float, default=100, help="streams opened per second"
    )
    parser.add_argument("--consumer-rounds", type=int, help="alternating rounds (5; quick 3)")
    parser.add_argument(
        "--consumer-requests", type=int, help="core requests per variant and round (5000)"
    )
    parser.add_argument(
        "--consumer-messages", type=int, help="JetStream messages per variant and round (8192)"
    )
    parser.add_argument("--ledger-rounds", type=int, help="rounds of each ledger (3; quick 1)")
    parser.add_argument(
        "--ledger-events", type=int, help="usage events per ledger run (20000; quick 5000)"
    )
    parser.add_argument(
        "--chaos-rate", type=float, default=40, help="chaos requests per second (40)"
    )
    parser.add_argument(
        "--memory-rate", type=float, default=100, help="requests per second under load (100)"
    )
    parser.add_argument(
        "--memory-seconds", type=float, help="of load for the memory table (20; quick 8)"
    )
    parser.add_argument("--chaos-seconds", type=float, help="per chaos run (25; quick 8)")
    parser.add_argument("--floor-rounds", type=int, help="floor rounds (3; quick 1)")
    parser.add_argument(
        "--floor-seconds", type=float, help="per floor run and pipeline (10; quick 3)"
    )
    parser.add_argument(
        "--floor-rate", type=float, default=200, help="floor open-loop requests per second"
    )
    parser.add_argument(
        "--floor-in-flight", type=int, default=32, help="floor closed-loop requests in flight"
    )
    parser.add_argument(
        "--floor-without-sluice",
        action="store_true",
        help="floor: leave out Sluice's own row (the product under the same load)",
    )
    args = parser.parse_args(argv)
    names = (
        "seconds",
        "job_seconds",
        "reconnects",
        "batch_jobs",
        "interactive_seconds",
        "streams",
        "stream_tps",
        "stream_seconds",
        "consumer_rounds",
        "consumer_requests",
        "consumer_messages",
        "ledger_rounds",
        "ledger_events",
        "chaos_seconds",
        "mcp_calls",
        "memory_seconds",
        "floor_rounds",
        "floor_seconds",
    )
    for name, value in zip(names, QUICK if args.quick else FULL, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.exit(asyncio.run(main_async(parse_args(sys.argv[1:]))))
